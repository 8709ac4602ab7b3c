"""Replicated vs sharded reduction of the per-task gradient signals (mtu_dist/distributed/gradstep.py).

Analytic bytes sent per rank per step (ring collectives) and per-rank memory of the reduced signals,
from ParamLayout, for world sizes 1, 2, 4, 8; then measured with real ranks (1 in this process, 2
launched with `torchrun --standalone`, OMP_NUM_THREADS=1; gloo on CPU, NCCL with one GPU per rank):
time of `reduce_signals` + `gather_update` on the model's K = 6 buffer, tensor/storage bytes of the
reduced block, and bytes actually sent per rank (loopback interface counters, /proc/net/dev). Both
modes interleaved; the sharded block is checked against the replicated one.

    .venv/bin/python bench/sharded_vs_replicated.py            # full run
    .venv/bin/python bench/sharded_vs_replicated.py --quick    # 24x32 images, 5 repeats
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from synthetic import (
    REPO,
    STEP_K,
    TASK_NAMES,
    Spec,
    fmt_b,
    footer,
    make_model,
    measure_with,
    ms,
    parser,
    quick_spec,
    stats,
    threads_line,
    timed,
)
from timing import ordered

from mtu_dist.distributed.gradstep import ParamLayout, gather_update, reduce_signals
from mtu_dist.utils.fileio import atomic_write_json

WORLDS = (1, 2, 4, 8)
MODES = ("replicated", "sharded")


def analytic_comm(params, k: int, elem: int, nF: int, gram_dim: int) -> list[dict]:
    rows = []
    for n in WORLDS:
        lay = ParamLayout(params, n)
        s, full = lay.shard, k * n * lay.shard
        ring = (n - 1) / n
        # sharded only: Gram (+ the pre-projection norm) and the projection's before/after norms
        small = 2 * ring * (gram_dim * gram_dim + 1 + 2 * nF) * elem
        rep_bytes = 2 * ring * full * elem
        rs, ag = ring * full * elem, ring * n * s * elem
        shd_bytes = rs + ag + small
        rep_mem, shd_mem = full * elem, k * s * elem
        rows.append(
            {
                "world": n,
                "P": lay.total,
                "S": s,
                "pad_elems": n * s - lay.total,
                "replicated_bytes": rep_bytes,
                "sharded_bytes": shd_bytes,
                "sharded_reduce_scatter_bytes": rs,
                "sharded_all_gather_bytes": ag,
                "sharded_small_bytes": small,
                "bytes_ratio": shd_bytes / rep_bytes if rep_bytes else None,
                "bytes_ratio_limit": (k + 1) / (2 * k),
                "replicated_block_bytes": rep_mem,
                "sharded_block_bytes": shd_mem,
                "memory_ratio": shd_mem / rep_mem,
                "one_over_n": 1 / n,
                "pack_buffer_bytes_both_modes": full * elem,  # [N, K, S] before the collective, every rank
                "gathered_update_bytes_both_modes": n * s * elem,
            }
        )
    return rows


def lo_tx_bytes() -> int | None:
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            if line.strip().startswith("lo:"):
                return int(line.split(":", 1)[1].split()[8])
    except (OSError, ValueError, IndexError):
        return None
    return None


def measure_reduction(rank: int, world: int, repeats: int, spec: Spec) -> dict | None:
    """Time reduce_signals + gather_update on the model's K = 6 buffer, both modes interleaved.
    world > 1 needs an initialised process group; world 1 touches none (both calls return at once)."""
    import torch.distributed as dist

    params = [p for p in make_model(spec).parameters() if p.requires_grad]
    layout = ParamLayout(params, world)
    g = torch.Generator().manual_seed(1000 + rank)
    src = torch.randn(world, STEP_K, layout.shard, generator=g).to(spec.device)
    res = {m: {"reduce_s": [], "gather_s": [], "total_s": [], "lo_bytes_per_rank": []} for m in MODES}
    mem = {}
    # correctness: the sharded block is this rank's slice of the replicated (all-reduced) buffer
    ref = reduce_signals(src.clone(), "replicated", rank, world)[rank].clone()
    shd = reduce_signals(src.clone(), "sharded", rank, world)
    torch.testing.assert_close(shd, ref, rtol=1e-5, atol=1e-5)
    for rep in range(-1, repeats):
        for mode in ordered(MODES, max(rep, 0)):
            buf = src.clone()
            if world > 1:
                dist.barrier()
            lo0 = lo_tx_bytes() if rank == 0 else None
            t_reduce, out = timed(reduce_signals, buf, mode, rank, world)
            x = out if out.dim() == 3 else out[None]
            update = 0.5 * x[:, 3:].sum(1) - 0.5 * x[:, :3].sum(1)
            t_gather, full = timed(gather_update, update, mode, world)
            tt = torch.tensor([t_reduce, t_gather, t_reduce + t_gather], dtype=torch.float64, device=spec.device)
            if world > 1:
                dist.all_reduce(tt, op=dist.ReduceOp.MAX)  # the slowest rank sets the step
                dist.barrier()
            lo1 = lo_tx_bytes() if rank == 0 else None
            assert full.shape == (world, layout.shard)
            if rep < 0:
                continue
            for key, v in zip(("reduce_s", "gather_s", "total_s"), tt.tolist()):
                res[mode][key].append(v)
            if lo0 is not None and lo1 is not None:
                res[mode]["lo_bytes_per_rank"].append((lo1 - lo0) / world)
            mem[mode] = {
                "block_shape": list(out.shape),
                "block_bytes": out.numel() * out.element_size(),
                "block_storage_bytes": out.untyped_storage().nbytes(),
                "pack_buffer_bytes": buf.numel() * buf.element_size(),
                "gathered_update_bytes": full.numel() * full.element_size(),
            }
    if rank != 0:
        return None
    summary = {
        "world": world,
        "S": layout.shard,
        "K": STEP_K,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "modes": {},
    }
    for mode in MODES:
        r = res[mode]
        summary["modes"][mode] = {
            **{k: stats(r[k]) for k in ("reduce_s", "gather_s", "total_s")},
            "lo_bytes_per_rank": stats(r["lo_bytes_per_rank"]) if r["lo_bytes_per_rank"] else None,
            **mem[mode],
        }
    return summary


def worker(repeats: int, out_path: str, spec: Spec) -> int:
    """One rank of the measured reduction (launched by torchrun): gloo on CPU, NCCL with one GPU per rank."""
    import torch.distributed as dist

    warnings.simplefilter("ignore", FutureWarning)  # reduce_scatter_tensor / all_gather_into_tensor deprecation
    if spec.device.startswith("cuda"):
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        spec = Spec(**{**spec.__dict__, "device": f"cuda:{local}"})
    dist.init_process_group("nccl" if spec.device.startswith("cuda") else "gloo")
    try:
        summary = measure_reduction(dist.get_rank(), dist.get_world_size(), repeats, spec)
        if summary is not None:
            Path(out_path).write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()
    return 0


def launch_workers(nproc: int, repeats: int, tmp: Path, spec: Spec) -> dict:
    out = tmp / f"reduce-{nproc}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(Path(__file__).resolve()),
        "--worker",
        "--repeats",
        str(repeats),
        "--worker-spec",
        spec.to_json(),
        "--worker-out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    res = json.loads(out.read_text())
    res["launch_wall_s"] = time.perf_counter() - t0
    res["command"] = (
        "OMP_NUM_THREADS=1 "
        + " ".join(os.path.relpath(c, REPO) if c.startswith(str(REPO)) else c for c in cmd[:-1])
        + " <tmp.json>"
    )
    return res


def bench_reduction(dist_repeats: int, tmp: Path, spec: Spec, two_ranks: bool = True) -> dict:
    """`two_ranks` False (say one GPU: NCCL needs a device per rank): analytic figures and 1 rank only."""
    params = [p for p in make_model(spec).parameters() if p.requires_grad]
    analytic = analytic_comm(params, STEP_K, 4, len(TASK_NAMES), 2 + len(TASK_NAMES))  # Gram of [g_f; g_r; span]
    # 1 rank: in this process (no process group: both calls return before any collective); 2: torchrun
    one = measure_reduction(0, 1, dist_repeats, spec)
    one["command"] = "in-process (world 1)"
    measured = {"1": one}
    if two_ranks:
        measured["2"] = launch_workers(2, dist_repeats, tmp, spec)
    for n, m in measured.items():
        row = next(r for r in analytic if r["world"] == int(n))
        for mode in MODES:
            m["modes"][mode]["analytic_ring_bytes"] = (
                row["replicated_bytes"] if mode == "replicated" else row["sharded_bytes"] - row["sharded_small_bytes"]
            )
    return {"K": STEP_K, "elem_bytes": 4, "analytic": analytic, "measured": measured}


def measure(
    spec: Spec | None = None, *, dist_repeats: int = 20, two_ranks: bool = True, threads: int = 1, quick: bool = False
) -> dict:
    """{"reduction": ...} with the environment; what main() writes. `two_ranks` False: 1 rank only."""
    spec = spec or Spec()

    def body(section):
        with tempfile.TemporaryDirectory(prefix="mtu-bench-") as tmp:
            return {
                "reduction": section(
                    "reduction",
                    f"1{' and 2' if two_ranks else ''} rank(s), {dist_repeats} repeats",
                    lambda: bench_reduction(dist_repeats, Path(tmp), spec, two_ranks),
                )
            }

    return measure_with(
        "sharded_vs_replicated", spec, body, threads=threads, quick=quick, config={"dist_repeats": dist_repeats}
    )


def tables(res: dict) -> str:
    r = res["reduction"]
    L = [
        f"### Replicated vs sharded (K = {r['K']}, float32; analytic, ring collectives)",
        "",
        "| world N | S | replicated sent/rank | sharded sent/rank | sharded/replicated | reduced block replicated | "
        "sharded | memory ratio | 1/N |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in r["analytic"]:
        br = "-" if a["bytes_ratio"] is None else f"{a['bytes_ratio']:.3f}"
        L.append(
            f"| {a['world']} | {a['S']} | {fmt_b(a['replicated_bytes'])} | {fmt_b(a['sharded_bytes'])} | {br} | "
            f"{fmt_b(a['replicated_block_bytes'])} | {fmt_b(a['sharded_block_bytes'])} | "
            f"{a['memory_ratio']:.3f} | {a['one_over_n']:.3f} |"
        )
    L += [
        "",
        f"Sent bytes, sharded/replicated -> (K+1)/(2K) = {r['analytic'][-1]['bytes_ratio_limit']:.3f} "
        "for every N "
        "(reduce-scatter of K signals + all-gather of one update, vs all-reduce of K signals); "
        "memory of the reduced signals is 1/N.",
        "",
        "Measured (gloo; 2 ranks: torchrun --standalone, OMP_NUM_THREADS=1, time = slowest rank; "
        "1 rank: in-process, no collective runs):",
        "",
        "| ranks | mode | reduce_signals ms | gather_update ms | total ms | reduced block | block storage | "
        "sent/rank measured (lo) | analytic ring |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, m in r["measured"].items():
        for mode, d in m["modes"].items():
            lo = d["lo_bytes_per_rank"]
            L.append(
                f"| {n} | {mode} | {ms(d['reduce_s']['median'])} | {ms(d['gather_s']['median'])} | "
                f"{ms(d['total_s']['median'])} | {fmt_b(d['block_bytes'])} | {fmt_b(d['block_storage_bytes'])} | "
                f"{fmt_b(lo['min']) if lo else '-'} | {fmt_b(d['analytic_ring_bytes'])} |"
            )
    if "2" in r["measured"]:
        m2 = r["measured"]["2"]["modes"]
        sh, rp = m2["sharded"], m2["replicated"]
        L += [
            "",
            "| Ratio (2 ranks, measured) | value |",
            "|---|---:|",
            f"| time sharded / replicated | {sh['total_s']['median'] / rp['total_s']['median']:.2f} |",
            f"| reduced block bytes sharded / replicated | {sh['block_bytes'] / rp['block_bytes']:.3f} |",
        ]
        if m2["sharded"]["lo_bytes_per_rank"] and m2["replicated"]["lo_bytes_per_rank"]:
            L.append(
                f"| bytes sent sharded / replicated (lo, min) | "
                f"{sh['lo_bytes_per_rank']['min'] / rp['lo_bytes_per_rank']['min']:.3f} |"
            )
    return "\n".join(L)


def main(argv=None) -> int:
    p = parser(__doc__, "sharded_vs_replicated")
    p.add_argument("--dist-repeats", type=int, help="repeats of the measured reduction per mode (default 20; quick 5)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=str, help=argparse.SUPPRESS)
    p.add_argument("--worker-spec", type=str, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, help=argparse.SUPPRESS)  # a worker's repeats
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.repeats or 20, a.worker_out, Spec.from_json(a.worker_spec))
    dist_repeats = a.dist_repeats or (5 if a.quick else 20)
    if dist_repeats < 1:
        p.error("repeats must be >= 1")
    res = measure(quick_spec(a.quick), dist_repeats=dist_repeats, threads=a.threads, quick=a.quick)
    atomic_write_json(a.out, res)
    print(threads_line(res) + "\n\n" + tables(res))
    print(footer(res, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

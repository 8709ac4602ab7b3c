"""End-to-end runner figures: training step time at 1 vs 2 ranks, unlearning vs retrain wall time, and
the demo's wall time and peak memory.

1. `mtu train` on the same global batch with 1 process and with 2 ranks (real `accelerate launch`:
   launch/accelerate/cpu_1proc.yaml / cpu_2proc.yaml, gloo, OMP_NUM_THREADS=1; gpu_1proc.yaml /
   gpu_1node.yaml, NCCL, on CUDA), interleaved, `--repeats` times: step time from the runs' own training
   timers (metrics.json `time_s` over the loader's steps); ratio 2-rank / 1-rank step time (goal <= 0.6 on
   2 cores).
2. Unlearning vs retrain, in this process through the real commands (tracking off): an original model
   (`--original-epochs`, default 2: the unlearning cost does not depend on how long the original trained,
   the step budget is fixed), a full-task request of 5% of the instances, `retrain` with the config's
   epochs, then `unlearn` with each of `--methods` (default iamu). Wall times are the runs' own timers
   (retrain: the training loop; unlearning: setup + steps); ratio unlearning / retrain (goal <= 1/20).
3. `--demo`: `mtu demo` in a fresh folder (every registered method, both settings): total wall time,
   peak RSS of the largest process, each run's wall time and its ratio to the retrain of its setting.

    .venv/bin/python bench/runner.py            # 1 + 2 (about 5 minutes on 2 cores)
    .venv/bin/python bench/runner.py --demo     # + 3 (about 10 more)
    .venv/bin/python bench/runner.py --quick    # tiny data and model (configs/tiny.yaml), 1 repeat
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import ForeignLoad, median, ordered  # noqa: E402 (bench/ is on sys.path)

from mtu_dist.utils.fileio import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
STEP_GOAL = 0.6  # 2-rank / 1-rank step time on 2 cores
COST_GOAL = 1 / 20  # unlearning / retrain wall time
SHARDS = {
    "full": {"train": 384, "val": 128, "height": 48, "width": 64},  # the demo's data
    "tiny": {"train": 40, "val": 16, "height": 16, "width": 24},
}  # the tests' data


def run(cmd, cwd, env=None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if p.returncode:
        raise RuntimeError(f"failed: {' '.join(map(str, cmd))}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return time.perf_counter() - t0


def make_shards(root: Path, size: str = "full", dataset: str = "synth-indoor") -> Path:
    """The synthetic dataset the runner figures train on (written once per root)."""
    from mtu_dist.data.synth_cmd import synth

    if not (root / dataset / "manifest.json").is_file():
        synth(
            [dataset],
            root,
            test=0,
            seed=0,
            shard_size=8 if size == "tiny" else 64,
            workers=2,
            overwrite=True,
            progress=lambda *_: None,
            **SHARDS[size],
        )
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_prefix(nproc: int, device: str) -> list:
    """`accelerate launch` that really starts `nproc` ranks: gloo on CPU, one GPU per rank (NCCL) on CUDA."""
    if device == "cuda":
        cfg = "gpu_1node.yaml" if nproc > 1 else "gpu_1proc.yaml"  # 1 rank: a plain process, no DDP wrapper
    else:
        cfg = "cpu_2proc.yaml" if nproc > 1 else "cpu_1proc.yaml"
    # through this interpreter, not bin/accelerate: in a venv layered over a GPU image's packages
    # (launch/offline/install.sh --venv) accelerate's script lives in the image's bin, not beside python
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        ROOT / "launch" / "accelerate" / cfg,
        "--num_processes",
        nproc,
    ]
    return cmd + (["--main_process_port", free_port()] if nproc > 1 else [])


def train_samples(cfg) -> int:
    from mtu_dist.data.manifest import load_manifest

    return load_manifest(cfg.data.dataset, cfg.data.root).split("train").num_samples


def steps_per_epoch(cfg, world: int) -> int:
    """The loader's steps per epoch for the config's global batch at `world` ranks (padding included)."""
    from mtu_dist.data.manifest import load_manifest
    from mtu_dist.data.stream import BatchLoader

    m = load_manifest(cfg.data.dataset, cfg.data.root)
    return BatchLoader(
        m,
        "train",
        rank=0,
        world=world,
        local_batch=cfg.train.global_batch // world,
        workers=cfg.data.workers,
        seed=cfg.seed,
    ).steps_per_epoch()


def throughput(work: Path, shards: Path, repeats: int, epochs: int, *, files=(), sets=(), device: str = "cpu") -> dict:
    """`mtu train` at 1 and 2 ranks, same global batch, interleaved; step time from the runs' own timers."""
    from mtu_dist.config import load_config

    overrides = [*sets, f"data.root={shards}", f"out={work / 'tp'}", "tracking.enabled=false", f"train.epochs={epochs}"]
    cfg = load_config(list(files), overrides)
    args = [a for f in files for a in ("--config", Path(f).resolve())] + [a for o in overrides for a in ("--set", o)]
    steps = {n: steps_per_epoch(cfg, n) * epochs for n in (1, 2)}
    step_s = {1: [], 2: []}
    for rep in range(repeats):
        for nproc in ordered((1, 2), rep):
            name = f"np{nproc}"
            run(
                [*launch_prefix(nproc, device), "-m", "mtu_dist.cli", "train", *args, "--name", name, "--overwrite"],
                cwd=work,
                env={"OMP_NUM_THREADS": "1"},
            )
            report = json.loads((work / "tp" / cfg.data.dataset / name / "final" / "metrics.json").read_text())
            step_s[nproc].append(report["time_s"] / steps[nproc])
    med = {n: median(v) for n, v in step_s.items()}
    gb = cfg.train.global_batch
    valid = train_samples(cfg) * epochs  # what a run learns from: padding samples are not throughput
    return {
        "global_batch": gb,
        "epochs": epochs,
        "steps": steps,
        "device": device,
        "step_s": step_s,
        "median_step_s": med,
        "median_samples_per_s": {n: valid / (t * steps[n]) for n, t in med.items()},
        "step_time_2rank_over_1rank": med[2] / med[1],
        "goal": STEP_GOAL,
        "command": " ".join(map(str, launch_prefix(2, device)[:5]))
        + " --num_processes N -m mtu_dist.cli train "
        + " ".join(map(str, args)),
    }


def unlearn_vs_retrain(
    work: Path,
    shards: Path,
    *,
    files=(),
    sets=(),
    methods=("iamu",),
    original_epochs: int = 2,
    fraction: float = 0.05,
    threads: int = 1,
) -> dict:
    """Retrain and unlearning wall times through the real commands, in this process (tracking off), with
    `threads` torch threads like the launched ranks (OMP_NUM_THREADS=1): on a shared machine a second
    intra-op thread stalls whenever another process holds a core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {
            **_unlearn_vs_retrain(work, shards, files, sets, methods, original_epochs, fraction),
            "threads": threads,
        }
    finally:
        torch.set_num_threads(before)


def _unlearn_vs_retrain(work, shards, files, sets, methods, original_epochs, fraction) -> dict:
    from mtu_dist.compliance.request import make_request, write_request
    from mtu_dist.config import load_config
    from mtu_dist.data.manifest import load_manifest
    from mtu_dist.runner.commands import retrain_command, train_command, unlearn_command

    def cfg(*extra):
        return load_config(
            list(files), [*sets, f"data.root={shards}", f"out={work / 'runs'}", "tracking.enabled=false", *extra]
        )

    base = cfg()
    common = {"overwrite": True, "tracking_uri": None}
    train_command(cfg(f"train.epochs={original_epochs}"), name="original", resume=False, **common)
    origin = work / "runs" / base.data.dataset / "original"
    request = work / "request.yaml"
    manifest = load_manifest(base.data.dataset, base.data.root)
    write_request(
        make_request(manifest, fraction=fraction, setting="full", tasks=None, seed=0), request, overwrite=True
    )
    t0 = time.perf_counter()
    retrain = retrain_command(cfg(), request=str(request), name="retrain", resume=False, **common)
    out = {
        "retrain_s": retrain["time_s"],
        "retrain_command_s": time.perf_counter() - t0,
        "retrain_epochs": base.train.epochs,
        "retrain_steps": steps_per_epoch(base, 1) * base.train.epochs,
        "original_epochs": original_epochs,
        "request_fraction": fraction,
        "unlearn_steps": base.unlearn.steps,
        "unlearn_s": {},
        "unlearn_command_s": {},
        "stop_reason": {},
        "unlearn_over_retrain": {},
        "goal": COST_GOAL,
    }
    for method in methods:
        t0 = time.perf_counter()
        report = unlearn_command(
            cfg(f"unlearn.method={method}"),
            request=str(request),
            origin=str(origin),
            name=f"unlearn-{method}",
            **common,
        )
        out["unlearn_command_s"][method] = time.perf_counter() - t0
        out["unlearn_s"][method] = report["time_s"]
        out["stop_reason"][method] = report.get("stop_reason")
        out["unlearn_over_retrain"][method] = report["time_s"] / retrain["time_s"]
    return out


def demo(work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    wall = run(
        [
            sys.executable,
            "-m",
            "mtu_dist.cli",
            "demo",
            "--root",
            work / "shards",
            "--out",
            work / "runs",
            "--tracking-uri",
            f"sqlite:///{work / 'mlflow.db'}",
        ],
        cwd=work,
    )
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    times = {}
    for metrics in sorted((work / "runs" / "synth-indoor").glob("*/final/metrics.json")):
        times[metrics.parent.parent.name] = json.loads(metrics.read_text())["time_s"]
    ratios = {
        k: v / times[f"retrain-{k.rsplit('-', 1)[1]}"]
        for k, v in times.items()
        if not k.startswith(("retrain", "original"))
    }
    return {"demo_wall_s": wall, "demo_peak_rss_mib": peak_mib, "time_s": times, "unlearn_over_retrain": ratios}


def measure(
    work: Path,
    *,
    repeats: int = 3,
    epochs: int = 2,
    shards: str = "full",
    files=(),
    sets=(),
    methods=("iamu",),
    original_epochs: int = 2,
    with_demo: bool = False,
    device: str = "cpu",
) -> dict:
    """Sections 1 and 2 (and 3 with `with_demo`) in `work`; each with the load other processes put on the machine."""
    root = make_shards(work / "shards", shards)
    out, load = {}, {}
    with ForeignLoad() as fl:
        out["throughput"] = throughput(work, root, repeats, epochs, files=files, sets=sets, device=device)
    load["throughput"] = fl.result
    with ForeignLoad() as fl:
        out["unlearn_vs_retrain"] = unlearn_vs_retrain(
            work, root, files=files, sets=sets, methods=methods, original_epochs=original_epochs
        )
    load["unlearn_vs_retrain"] = fl.result
    if with_demo:
        with ForeignLoad() as fl:
            out["demo"] = demo(work / "demo")
        load["demo"] = fl.result
    out["machine_load"] = load
    return out


def table(res: dict) -> str:
    tp, ur = res["throughput"], res["unlearn_vs_retrain"]
    lines = [
        "| figure | value |",
        "|---|---|",
        f"| train step, 1 rank (median ms; samples/s) | {1e3 * tp['median_step_s'][1]:.1f}; "
        f"{tp['median_samples_per_s'][1]:.1f} |",
        f"| train step, 2 ranks (median ms; samples/s) | {1e3 * tp['median_step_s'][2]:.1f}; "
        f"{tp['median_samples_per_s'][2]:.1f} |",
        f"| step time 2 ranks / 1 rank (goal <= {STEP_GOAL}) | {tp['step_time_2rank_over_1rank']:.2f} |",
        f"| retrain ({ur['retrain_epochs']} epochs, {ur['retrain_steps']} steps) s | {ur['retrain_s']:.1f} |",
    ]
    for m, v in ur["unlearn_s"].items():
        lines += [
            f"| unlearn {m} ({ur['unlearn_steps']} steps) s | {v:.1f} |",
            f"| unlearn {m} / retrain (goal <= 1/20) | {ur['unlearn_over_retrain'][m]:.3f} |",
        ]
    if "demo" in res:
        d = res["demo"]
        lines += [
            f"| demo wall time s | {d['demo_wall_s']:.0f} |",
            f"| demo peak RSS MiB | {d['demo_peak_rss_mib']:.0f} |",
        ]
        lines += [f"| demo: {k} wall s | {v:.1f} |" for k, v in d["time_s"].items()]
        lines += [f"| demo: {k} / retrain | {v:.3f} |" for k, v in d["unlearn_over_retrain"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--quick", action="store_true", help="tiny data and model (configs/tiny.yaml), 1 repeat")
    ap.add_argument("--repeats", type=int, help="launches per world size (default 3; quick 1)")
    ap.add_argument("--epochs", type=int, help="epochs per throughput launch (default 2; quick 1)")
    ap.add_argument("--original-epochs", type=int, default=2, help="epochs of the original model (default 2)")
    ap.add_argument("--methods", default="iamu", help="unlearning methods, comma-separated (default iamu)")
    ap.add_argument("--demo", action="store_true", help="also run `mtu demo` (about 10 minutes)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "runner.json")
    a = ap.parse_args(argv)
    files = [str(ROOT / "configs" / "tiny.yaml")] if a.quick else []
    with tempfile.TemporaryDirectory(prefix="mtu-bench-") as tmp:
        res = measure(
            Path(tmp),
            repeats=a.repeats or (1 if a.quick else 3),
            epochs=a.epochs or (1 if a.quick else 2),
            shards="tiny" if a.quick else "full",
            files=files,
            methods=tuple(a.methods.split(",")),
            original_epochs=a.original_epochs,
            with_demo=a.demo,
        )
    atomic_write_json(a.out, res)
    print(table(res))
    print(f"\nresults: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

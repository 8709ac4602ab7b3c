"""The distributed per-task gradient step: signal engines, iamu step overhead, reduction modes, setup cost.

Measures, side by side in one run (variants interleaved within every repeat, order alternated between
repeats so slow drift of a shared machine hits all variants alike), on synthetic random batches
(tasks seg/depth/normal, 13 classes, 48x64, default model config, float32):

1. Engines: `batched` vs `sequential` signal computation (mtu_dist/distributed/signals.py) for
   K = 2, 4, 6, 8 losses from ONE forward over a batch of 24 (loss k: task k mod 3 on the k-th of K
   disjoint sample subsets), time per engine call (gradients + packing). Both engines must give the
   same buffer (allclose, rtol = atol = 1e-5, float32). Ratio sequential/batched = speed of batched.
   When batched is the slower one at K = 6 (or with --profile), one call of each engine is profiled
   (torch.profiler, top ops and call counts).
2. One `iamu` step (default options, after `setup`; world 1, sequential engine, replicated) on a
   forget batch of 8 + retain batch of 16, vs its floor: one forward of the concatenated batch, the
   same losses, and K = 3 forget + 3 retain separate single-signal `torch.autograd.grad` calls over
   the same graph. Overhead (projection, orthogonalization, packing, update) = iamu/floor - 1
   (goal <= 15%); also iamu / `neggrad_plus` step (expected about K/2..K). The overhead pieces are
   also timed on their own (same tensors, many calls), which resolves a few-percent overhead that the
   noisy step-time ratio cannot. When the overhead misses the goal (or with --profile), one iamu step
   is profiled with cProfile and the top costs are reported with file:line.
3. Replicated vs sharded reduction: analytic bytes sent per rank per step (ring collectives) and
   per-rank memory of the reduced signals, from ParamLayout, for world sizes 1, 2, 4, 8; then measured
   with real gloo ranks (1 and 2 processes, `torchrun --standalone`, OMP_NUM_THREADS=1): time of
   `reduce_signals` + `gather_update` on the default model's K = 6 buffer, tensor/storage bytes of the
   reduced block, and bytes actually sent per rank (loopback interface counters, /proc/net/dev).
4. Subspace computation (`Iamu.setup`, default subspace_batches = 8, retain batch 16; sequential
   engine, and the config default `auto`, which first times both engines) vs one epoch of training
   over the retain data (384 samples / batch 16 = 24 forward + backward + AdamW steps).

Threads: torch runs with ONE intra-op thread unless --threads says otherwise. On a shared 2-core
machine, two intra-op threads stall whenever another process holds a core (every parallel region
waits for the descheduled thread): one forward + backward at batch 24 took 1.7 s with 2 threads vs
0.23 s with 1 while another job ran. A short check of both settings is recorded (`threads_check`).

Figures are medians over repeats; results go to bench/results/gradstep.json and Markdown tables are
printed. `measure(Spec(...), parts=...)` runs any of the sections on another model (a run config's model
section), image size, batches or device (CUDA: NCCL for the 2-rank reduction); bench/suite.py uses it.

    .venv/bin/python bench/gradstep.py            # full run (2-5 minutes on 2 shared cores)
    .venv/bin/python bench/gradstep.py --quick    # smaller run (24x32 images, fewer repeats), < 1 min
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import cProfile
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's device-probe errors off stderr (CPU only)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mtu_dist.config import ModelConfig, RunConfig
from mtu_dist.distributed import signals as engines
from mtu_dist.distributed.gradstep import ParamLayout, gather_update, reduce_signals
from mtu_dist.utils.fileio import atomic_write_json
from mtu_dist.methods.base import StepContext
from mtu_dist.methods.iamu import Iamu
from mtu_dist.methods.neggrad_plus import NegGradPlus
from mtu_dist.model import build_model
from mtu_dist.runner.objective import global_counts, normalised_losses
from mtu_dist.tasks import TASKS
from timing import ForeignLoad, describe_load, median, ordered, synchronize  # noqa: E402 (bench/ is on sys.path)

TASK_NAMES = ("seg", "depth", "normal")
NUM_CLASSES = 13
HEIGHT, WIDTH = 48, 64
RETAIN_SAMPLES = 384             # one epoch = RETAIN_SAMPLES / retain batch training steps
STEP_K = 2 * len(TASK_NAMES)     # iamu signals: 3 forget (targets) + 3 retain (tasks)
OVERHEAD_GOAL = 0.15
WORLDS = (1, 2, 4, 8)
MODES = ("replicated", "sharded")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gradstep.json"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Spec:
    """What is measured on: a run config's model section, image size, the unlearning batches (the
    default config's: forget 8, retain 16; the engines use one batch of both) and the device."""
    model: ModelConfig = field(default_factory=ModelConfig)
    height: int = HEIGHT
    width: int = WIDTH
    forget_batch: int = 8
    retain_batch: int = 16
    device: str = "cpu"

    @property
    def engine_batch(self) -> int:
        return self.forget_batch + self.retain_batch

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "model": self.model.model_dump()})

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        d = json.loads(text)
        return cls(**{**d, "model": ModelConfig(**d["model"])})


def stats(ts):
    return {"median": median(ts), "min": min(ts), "max": max(ts), "runs": ts}


def timed(fn, *args, **kwargs):
    synchronize()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    synchronize()
    return time.perf_counter() - t0, out


def make_batch(n: int, seed: int, spec: Spec, forget: bool = False) -> dict:
    """A random batch in the loader's format (255 = ignored seg pixel, depth 0 = invalid), on spec.device."""
    h, w = spec.height, spec.width
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, NUM_CLASSES, (n, h, w), generator=g, dtype=torch.int64)
    seg[torch.rand(n, h, w, generator=g) < 0.1] = 255
    depth = torch.rand(n, 1, h, w, generator=g) * 9.5 + 0.5
    depth[torch.rand(n, 1, h, w, generator=g) < 0.05] = 0
    normal = F.normalize(torch.randn(n, 3, h, w, generator=g), dim=1)
    mask = torch.rand(n, len(TASK_NAMES), generator=g) < (0.6 if forget else 0.85)
    mask[0] = True  # every task supervised at least once
    batch = {"image": torch.rand(n, 3, h, w, generator=g), "seg": seg, "depth": depth, "normal": normal,
             "mask": mask, "valid": torch.ones(n, dtype=torch.bool)}
    return {**{k: v.to(spec.device) for k, v in batch.items()}, "key": [f"synth/{seed}/{i:04d}" for i in range(n)]}


def make_model(spec: Spec, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(spec.model, TASK_NAMES, NUM_CLASSES).to(spec.device)
    model.train()
    return model


def clear_grads(params):
    for p in params:
        p.grad = None


# --------------------------------------------------------------------------- 1. engines

def engine_losses(preds: dict, batch: dict, k: int) -> list[torch.Tensor]:
    """K losses over one graph: loss j = mean per-sample loss of task j mod 3 on sample subset j."""
    per_sample = {t: TASKS[t].per_sample_loss(preds[t], batch[t]) for t in TASK_NAMES}
    chunks = torch.arange(batch["image"].shape[0], device=batch["image"].device).tensor_split(k)
    return [per_sample[TASK_NAMES[j % len(TASK_NAMES)]][chunks[j]].mean() for j in range(k)]


def profile_engines(model, params, layout, batch, k: int, device: str, top: int = 10) -> dict:
    """torch.profiler of one call of each engine at K: the ops that make up the difference."""
    from torch.profiler import ProfilerActivity, profile
    preds = model(batch["image"])
    losses = engine_losses(preds, batch, k)
    out = {"K": k}
    for e, fn in engines.ENGINES.items():
        buf = layout.new_buffer(k, torch.float32, device)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t, _ = timed(fn, losses, params, layout, buf)
        ev = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)
        out[e] = {"wall_s": t, "ops": [{"op": a.key, "calls": a.count, "self_cpu_s": a.self_cpu_time_total / 1e6}
                                       for a in ev[:top]]}
    return out


def bench_engines(ks, repeats: int, spec: Spec, want_profile: bool) -> dict:
    model = make_model(spec)
    params = [p for p in model.parameters() if p.requires_grad]
    layout = ParamLayout(params, 1)
    batch = make_batch(spec.engine_batch, 100, spec)
    times = {(k, e): [] for k in ks for e in engines.ENGINES}
    fwd, diffs, vmap_warnings = [], {k: 0.0 for k in ks}, set()
    variants = [(k, e) for k in ks for e in engines.ENGINES]
    for rep in range(-1, repeats):  # rep -1: warm-up of both engines at the smallest K, not recorded
        t_fwd, preds = timed(model, batch["image"])
        losses = {k: engine_losses(preds, batch, k) for k in ks}
        bufs = {}
        for k, e in (ordered(variants, rep) if rep >= 0 else [(ks[0], e) for e in engines.ENGINES]):
            buf = layout.new_buffer(k, torch.float32, spec.device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t, _ = timed(engines.ENGINES[e], losses[k], params, layout, buf)
            vmap_warnings.update(str(c.message).split("\n")[0][:200] for c in caught)
            bufs[(k, e)] = buf
            if rep >= 0:
                times[(k, e)].append(t)
        for k in ks if rep >= 0 else ks[:1]:
            a, b = bufs[(k, "sequential")], bufs[(k, "batched")]
            if not torch.allclose(a, b, rtol=1e-5, atol=1e-5):
                raise AssertionError(f"engines disagree at K={k}: max |diff| {(a - b).abs().max().item():.3g}")
            assert a.abs().sum() > 0
            diffs[k] = max(diffs[k], (a - b).abs().max().item())
        if rep >= 0:
            fwd.append(t_fwd)
        del preds, losses, bufs
    out = {"batch": spec.engine_batch, "forward_s": stats(fwd), "K": {}, "warnings": sorted(vmap_warnings)}
    for k in ks:
        s, b = median(times[(k, "sequential")]), median(times[(k, "batched")])
        paired = [x / y for x, y in zip(times[(k, "sequential")], times[(k, "batched")])]
        out["K"][str(k)] = {"sequential_s": stats(times[(k, "sequential")]),
                            "batched_s": stats(times[(k, "batched")]),
                            "sequential_over_batched": s / b, "paired_ratio_median": median(paired),
                            "sequential_per_signal_s": s / k, "batched_per_signal_s": b / k,
                            "max_abs_diff": diffs[k], "allclose_1e-5": True}
    # `signal_engine: auto` (the config default) measures both engines twice on the first signals it sees
    out["auto_probe_cost_s"] = {str(k): 2 * (median(times[(k, "sequential")]) + median(times[(k, "batched")]))
                                for k in ks}
    kp = max((k for k in ks if k <= STEP_K), default=ks[0])
    if want_profile or out["K"][str(kp)]["sequential_over_batched"] < 1:  # batched slower: show why
        out["profile"] = profile_engines(model, params, layout, batch, kp, spec.device)
    return out


# --------------------------------------------------------------------------- 2. iamu step vs floor

class Breakdown:
    """Wall time of named calls on one object (instance attributes shadow the class's methods;
    the package code is not touched). Adds about a microsecond per call."""

    def __init__(self):
        self.acc: dict[str, float] = {}
        self.recording = False            # also keep (fn, copies of args) of every call, for `replay`
        self.calls: dict[str, list] = {}

    def wrap(self, obj, name: str, label: str):
        fn = getattr(obj, name)

        def wrapper(*a, **kw):
            if self.recording:
                self.calls.setdefault(label, []).append((fn, clone_args(a), clone_args(kw)))
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.acc[label] = self.acc.get(label, 0.0) + time.perf_counter() - t0
        setattr(obj, name, wrapper)

    def take(self) -> dict[str, float]:
        out, self.acc = self.acc, {}
        return out


def make_ctx(model, engine="sequential", world=1, rank=0, reduction="replicated"):
    cfg = RunConfig().unlearn.model_copy(update={"signal_engine": engine, "reduction": reduction})
    return StepContext(model=model, tasks=TASK_NAMES, world=world, alpha=0.5, step=1, rank=rank,
                       targets=TASK_NAMES, config=cfg)


def floor_step(model, params, forget, retain, split: dict | None = None):
    """One forward of the concatenated batch + the same K losses + K single-signal autograd.grad calls."""
    t0 = time.perf_counter()
    nf = forget["image"].shape[0]
    preds = model(torch.cat([forget["image"], retain["image"]]))
    f = normalised_losses({t: p[:nf] for t, p in preds.items()}, forget, TASK_NAMES, global_counts(forget, 1))
    r = normalised_losses({t: p[nf:] for t, p in preds.items()}, retain, TASK_NAMES, global_counts(retain, 1))
    signals = [f[t] for t in TASK_NAMES] + [r[u] for u in TASK_NAMES]
    t1 = time.perf_counter()
    grads = [torch.autograd.grad(s, params, retain_graph=True, allow_unused=True) for s in signals]
    if split is not None:
        split["forward_losses"] = t1 - t0
        split["grads"] = time.perf_counter() - t1
    return grads


def clone_args(v):
    """Fresh copies of the tensors (and containers) in a recorded call, so in-place calls replay alike."""
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (list, tuple)):
        return type(v)(clone_args(x) for x in v)
    if isinstance(v, dict):
        return {k: clone_args(x) for k, x in v.items()}
    return v


def replay(bd: "Breakdown", labels, n_calls: int) -> dict[str, float]:
    """Median, over n_calls rounds, of the time of every recorded call of each label (summed per round):
    the same work, on the same tensors, as in one real step, without the step's noisy autograd around it."""
    out = {}
    for label in labels:
        rounds = []
        for _ in range(n_calls):
            total = 0.0
            for fn, args, kwargs in bd.calls.get(label, []):
                a, kw = clone_args(args), clone_args(kwargs)
                t, _ = timed(fn, *a, **kw)
                total += t
            rounds.append(total)
        out[label] = median(rounds)
    return out


def profile_step(fn, top: int = 15) -> dict:
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    prof.disable()
    st = pstats.Stats(prof)
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _callers) in st.stats.items():
        rel = os.path.relpath(file, REPO) if file.startswith(str(REPO)) else file
        rows.append({"where": f"{rel}:{line}" if line else rel, "function": func, "calls": nc,
                     "tottime_s": tt, "cumtime_s": ct})
    by_tot = sorted(rows, key=lambda r: -r["tottime_s"])[:top]
    package = sorted((r for r in rows if r["where"].startswith("mtu_dist/")), key=lambda r: -r["cumtime_s"])[:top]
    return {"wall_s": wall, "top_tottime": by_tot, "package_by_cumtime": package}


def bench_step(method: Iamu, model, repeats: int, spec: Spec, n_piece_calls: int, want_profile: bool) -> dict:
    ctx = make_ctx(model)
    params = method.params
    plain = NegGradPlus({})
    forget, retain = make_batch(spec.forget_batch, 200, spec, forget=True), make_batch(spec.retain_batch, 201, spec)
    bd = Breakdown()
    bd.wrap(method, "signals", "signals")
    bd.wrap(method, "_project", "project")
    bd.wrap(method, "_orthogonalize", "orthogonalize")
    bd.wrap(method.layout, "new_buffer", "new_buffer")
    bd.wrap(method.layout, "pack", "pack")
    bd.wrap(method.layout, "unpack_into_grads", "unpack")

    def iamu():
        clear_grads(params)
        return method.step(ctx, forget, retain)

    def floor():
        clear_grads(params)
        return floor_step(model, params, forget, retain, split_now)

    def neggrad():
        clear_grads(params)
        return plain.step(ctx, forget, retain)

    fns = {"iamu": iamu, "floor": floor, "neggrad_plus": neggrad}
    times = {k: [] for k in fns}
    parts, floor_split = [], []
    for rep in range(-1, repeats):  # rep -1: warm-up (one neggrad_plus step), not recorded
        for name in (ordered(fns, rep) if rep >= 0 else ["neggrad_plus"]):
            split_now = {}
            bd.take()
            t, _ = timed(fns[name])
            if rep < 0:
                continue
            times[name].append(t)
            if name == "iamu":
                parts.append({"total": t, **bd.take()})
            if name == "floor":
                floor_split.append(split_now)
    # the overhead pieces on their own: record one more step's calls, replay them many times
    bd.recording = True
    iamu()
    bd.recording = False
    bd.take()
    pieces = replay(bd, ("new_buffer", "pack", "project", "orthogonalize", "unpack"), n_piece_calls)
    bd.calls.clear()
    med = {k: median(v) for k, v in times.items()}
    paired = [a / b for a, b in zip(times["iamu"], times["floor"])]
    sig = median([p["signals"] for p in parts])
    pack = median([p["pack"] for p in parts])
    in_step = {
        "forward + losses (rest)": median([p["total"] - p["signals"] - p["project"]
                                           - p["orthogonalize"] - p["unpack"] for p in parts]),
        "autograd.grad x K (signals - new_buffer - pack)": sig - pack - median([p["new_buffer"] for p in parts]),
        "new_buffer": median([p["new_buffer"] for p in parts]), "pack": pack,
        "project": median([p["project"] for p in parts]),
        "orthogonalize": median([p["orthogonalize"] for p in parts]), "unpack": median([p["unpack"] for p in parts]),
    }
    overhead = med["iamu"] / med["floor"] - 1
    pieces_sum = sum(pieces.values())
    out = {
        "forget_batch": spec.forget_batch, "retain_batch": spec.retain_batch, "K": STEP_K, "engine": "sequential",
        "reduction": "replicated", "world": 1,
        "iamu_s": stats(times["iamu"]), "floor_s": stats(times["floor"]),
        "neggrad_plus_s": stats(times["neggrad_plus"]),
        "floor_split_s": {k: median([s[k] for s in floor_split]) for k in ("forward_losses", "grads")},
        "iamu_breakdown_s": in_step,
        "overhead_pieces_s": pieces, "overhead_pieces_calls": n_piece_calls,
        "overhead_measured": overhead, "overhead_paired_median": median(paired) - 1,
        "overhead_from_pieces": pieces_sum / med["floor"],
        "overhead_goal": OVERHEAD_GOAL,
        "iamu_over_neggrad_plus": med["iamu"] / med["neggrad_plus"],
        "floor_over_neggrad_plus": med["floor"] / med["neggrad_plus"],
        "expected_iamu_over_neggrad_plus": [STEP_K / 2, STEP_K],
    }
    out["overhead_goal_met"] = overhead <= OVERHEAD_GOAL
    out["overhead_goal_met_pieces"] = out["overhead_from_pieces"] <= OVERHEAD_GOAL
    if want_profile or not (out["overhead_goal_met"] and out["overhead_goal_met_pieces"]):
        out["profile"] = profile_step(iamu)
    return out


# --------------------------------------------------------------------------- 3. replicated vs sharded

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
        rows.append({
            "world": n, "P": lay.total, "S": s, "pad_elems": n * s - lay.total,
            "replicated_bytes": rep_bytes, "sharded_bytes": shd_bytes,
            "sharded_reduce_scatter_bytes": rs, "sharded_all_gather_bytes": ag, "sharded_small_bytes": small,
            "bytes_ratio": shd_bytes / rep_bytes if rep_bytes else None,
            "bytes_ratio_limit": (k + 1) / (2 * k),
            "replicated_block_bytes": rep_mem, "sharded_block_bytes": shd_mem, "memory_ratio": shd_mem / rep_mem,
            "one_over_n": 1 / n,
            "pack_buffer_bytes_both_modes": full * elem,     # [N, K, S] before the collective, every rank
            "gathered_update_bytes_both_modes": n * s * elem,
        })
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
            mem[mode] = {"block_shape": list(out.shape), "block_bytes": out.numel() * out.element_size(),
                         "block_storage_bytes": out.untyped_storage().nbytes(),
                         "pack_buffer_bytes": buf.numel() * buf.element_size(),
                         "gathered_update_bytes": full.numel() * full.element_size()}
    if rank != 0:
        return None
    summary = {"world": world, "S": layout.shard, "K": STEP_K, "repeats": repeats,
               "torch_threads": torch.get_num_threads(), "modes": {}}
    for mode in MODES:
        r = res[mode]
        summary["modes"][mode] = {
            **{k: stats(r[k]) for k in ("reduce_s", "gather_s", "total_s")},
            "lo_bytes_per_rank": stats(r["lo_bytes_per_rank"]) if r["lo_bytes_per_rank"] else None,
            **mem[mode]}
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(Path(__file__).resolve()),
           "--worker", "--repeats", str(repeats), "--worker-spec", spec.to_json(), "--worker-out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    res = json.loads(out.read_text())
    res["launch_wall_s"] = time.perf_counter() - t0
    res["command"] = "OMP_NUM_THREADS=1 " + " ".join(os.path.relpath(c, REPO) if c.startswith(str(REPO)) else c
                                                       for c in cmd[:-1]) + " <tmp.json>"
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
            m["modes"][mode]["analytic_ring_bytes"] = (row["replicated_bytes"] if mode == "replicated"
                                                       else row["sharded_bytes"] - row["sharded_small_bytes"])
    return {"K": STEP_K, "elem_bytes": 4, "analytic": analytic, "measured": measured}


# --------------------------------------------------------------------------- 4. setup vs one epoch

def bench_setup(repeats: int, spec: Spec) -> tuple[dict, Iamu, torch.nn.Module]:
    model = make_model(spec)
    ctx = make_ctx(model)
    retain = [make_batch(spec.retain_batch, 300 + i, spec) for i in range(RETAIN_SAMPLES // spec.retain_batch)]
    subspace_batches = Iamu({}).opts.subspace_batches
    train_model = copy.deepcopy(model)
    opt = torch.optim.AdamW(train_model.parameters(), lr=3e-3, weight_decay=1e-4)

    def epoch():
        for b in retain:
            losses = normalised_losses(train_model(b["image"]), b, TASK_NAMES, global_counts(b, 1))
            sum(losses.values()).backward()
            torch.nn.utils.clip_grad_norm_(train_model.parameters(), 5.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    ctx_auto = make_ctx(model, engine="auto")  # the config default: measures both engines on first use
    method, picks = None, []
    times = {"setup": [], "setup_auto": [], "epoch": []}
    parts = []
    for rep in range(repeats):
        for name in ordered(("setup", "epoch", "setup_auto"), rep):
            if name == "setup":
                method = Iamu({})
                bd = Breakdown()
                bd.wrap(method, "_pass", "gradient passes (signals + covariance / sketch sums)")
                bd.wrap(method, "_gradient_bases", "task bases (the passes + eigh / Nystrom)")
                bd.wrap(method, "_bases", "mode bases (orth)")
                t, logs = timed(method.setup, ctx, itertools.cycle(retain), None)
                parts.append(bd.take())
                clear_grads(method.params)
            elif name == "setup_auto":
                m_auto = Iamu({})
                t, _ = timed(m_auto.setup, ctx_auto, itertools.cycle(retain), None)
                picks.append(m_auto.engine)
                clear_grads(m_auto.params)
                del m_auto
            else:
                t, _ = timed(epoch)
            times[name].append(t)
    for attr in ("_pass", "_gradient_bases", "_bases"):  # unwrap for later use
        method.__dict__.pop(attr, None)
    s, e, sa = median(times["setup"]), median(times["epoch"]), median(times["setup_auto"])
    out = {"subspace_batches": subspace_batches, "retain_batch": spec.retain_batch,
           "epoch_samples": RETAIN_SAMPLES, "epoch_steps": len(retain),
           "setup_s": stats(times["setup"]), "epoch_s": stats(times["epoch"]),
           "setup_auto_engine_s": stats(times["setup_auto"]), "auto_engine_picks": picks,
           "setup_breakdown_s": {k: median([p[k] for p in parts]) for k in parts[0]},
           "basis_dim_mean": logs.get("basis_dim_mean"),
           "setup_over_epoch": s / e,
           "paired_ratio_median": median([a / b for a, b in zip(times["setup"], times["epoch"])]),
           "setup_auto_over_epoch": sa / e, "setup_auto_over_setup": sa / s,
           "epoch_step_s": e / len(retain)}
    return out, method, model


# --------------------------------------------------------------------------- report

def fmt_b(n):
    if n is None:
        return "-"
    for unit, f in (("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n:.0f} B"


def ms(x):
    return f"{1e3 * x:.1f}"


def rng(d):
    return f"{1e3 * d['min']:.0f} - {1e3 * d['max']:.0f}"


def tables(res: dict) -> str:
    e, s, r, u = res["engines"], res["step"], res["reduction"], res["setup"]
    sa = u["setup_auto_engine_s"]
    tc = res["threads_check"]
    L = [f"Forward + backward at batch {tc['batch']}, threads check: " + ", ".join(
        f"{k.split('_')[0]} thread(s) {ms(v['median'])} ms" for k, v in tc.items() if k.endswith("_s"))
        + f"; measurements below use {res['env']['torch_threads']} thread(s).", "",
         "### 1. Signal engines (one forward, batch %d; time per call incl. packing)" % e["batch"], "",
         "| K | sequential ms | batched ms | sequential/batched | paired median | max abs diff |",
         "|---:|---:|---:|---:|---:|---:|"]
    for k, d in e["K"].items():
        L.append(f"| {k} | {ms(d['sequential_s']['median'])} ({rng(d['sequential_s'])}) | "
                 f"{ms(d['batched_s']['median'])} ({rng(d['batched_s'])}) | {d['sequential_over_batched']:.2f}x | "
                 f"{d['paired_ratio_median']:.2f}x | {d['max_abs_diff']:.1e} |")
    L.append(f"\nForward (batch {e['batch']}): {ms(e['forward_s']['median'])} ms. Engines agree (allclose 1e-5) at every K.")
    if e["warnings"]:
        L.append("Warnings raised by the engines: " + "; ".join(e["warnings"]))
    if "profile" in e:
        pr = e["profile"]
        L += ["", f"torch.profiler, one call per engine at K = {pr['K']} (top ops by self CPU time):", "",
              "| engine | op | calls | self CPU s |", "|---|---|---:|---:|"]
        for eng_name in engines.ENGINES:
            for row in pr[eng_name]["ops"][:6]:
                L.append(f"| {eng_name} | {row['op']} | {row['calls']} | {row['self_cpu_s']:.3f} |")
    L += ["", f"### 2. iamu step vs its floor (forget {s['forget_batch']} + retain {s['retain_batch']}, K = {s['K']}, "
          "sequential engine, world 1)", "",
          "| Measurement | ms (median) | min - max |", "|---|---:|---:|"]
    for key, label in (("iamu_s", "iamu step"), ("floor_s", "floor: forward + K autograd.grad"),
                       ("neggrad_plus_s", "neggrad_plus step")):
        L.append(f"| {label} | {ms(s[key]['median'])} | {rng(s[key])} |")
    L += ["", "| Part of the iamu step | ms (median) |", "|---|---:|"]
    for k, v in s["iamu_breakdown_s"].items():
        L.append(f"| in step: {k} | {ms(v)} |")
    L.append(f"| floor: forward + losses | {ms(s['floor_split_s']['forward_losses'])} |")
    L.append(f"| floor: autograd.grad x K | {ms(s['floor_split_s']['grads'])} |")
    for k, v in s["overhead_pieces_s"].items():
        L.append(f"| isolated ({s['overhead_pieces_calls']} calls): {k} | {ms(v)} |")
    L += ["", "| Ratio | value | goal |", "|---|---:|---|",
          f"| iamu / floor - 1 (medians) | {100 * s['overhead_measured']:+.1f}% | <= {100 * OVERHEAD_GOAL:.0f}% |",
          f"| iamu / floor - 1 (paired per repeat) | {100 * s['overhead_paired_median']:+.1f}% | |",
          f"| overhead from isolated pieces / floor | {100 * s['overhead_from_pieces']:.1f}% | <= {100 * OVERHEAD_GOAL:.0f}% |",
          f"| iamu / neggrad_plus | {s['iamu_over_neggrad_plus']:.2f}x | about {STEP_K // 2}..{STEP_K}x |",
          f"| floor / neggrad_plus | {s['floor_over_neggrad_plus']:.2f}x | |",
          f"| overhead goal met (measured medians / isolated pieces) | "
          f"{'yes' if s['overhead_goal_met'] else 'no'} / {'yes' if s['overhead_goal_met_pieces'] else 'no'} | |"]
    if "profile" in s:
        L += ["", "cProfile of one iamu step (top by own time):", "",
              "| where | function | calls | own s | cum s |", "|---|---|---:|---:|---:|"]
        for row in s["profile"]["top_tottime"][:12]:
            L.append(f"| {row['where']} | {row['function']} | {row['calls']} | {row['tottime_s']:.3f} "
                     f"| {row['cumtime_s']:.3f} |")
    L += ["", f"### 3. Replicated vs sharded (K = {r['K']}, float32; analytic, ring collectives)", "",
          "| world N | S | replicated sent/rank | sharded sent/rank | sharded/replicated | reduced block replicated | "
          "sharded | memory ratio | 1/N |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a in r["analytic"]:
        br = "-" if a["bytes_ratio"] is None else f"{a['bytes_ratio']:.3f}"
        L.append(f"| {a['world']} | {a['S']} | {fmt_b(a['replicated_bytes'])} | {fmt_b(a['sharded_bytes'])} | {br} | "
                 f"{fmt_b(a['replicated_block_bytes'])} | {fmt_b(a['sharded_block_bytes'])} | "
                 f"{a['memory_ratio']:.3f} | {a['one_over_n']:.3f} |")
    L += ["", f"Sent bytes, sharded/replicated -> (K+1)/(2K) = {r['analytic'][-1]['bytes_ratio_limit']:.3f} for every N "
          "(reduce-scatter of K signals + all-gather of one update, vs all-reduce of K signals); "
          "memory of the reduced signals is 1/N.",
          "", "Measured (gloo; 2 ranks: torchrun --standalone, OMP_NUM_THREADS=1, time = slowest rank; "
          "1 rank: in-process, no collective runs):", "",
          "| ranks | mode | reduce_signals ms | gather_update ms | total ms | reduced block | block storage | "
          "sent/rank measured (lo) | analytic ring |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n, m in r["measured"].items():
        for mode, d in m["modes"].items():
            lo = d["lo_bytes_per_rank"]
            L.append(f"| {n} | {mode} | {ms(d['reduce_s']['median'])} | {ms(d['gather_s']['median'])} | "
                     f"{ms(d['total_s']['median'])} | {fmt_b(d['block_bytes'])} | {fmt_b(d['block_storage_bytes'])} | "
                     f"{fmt_b(lo['min']) if lo else '-'} | {fmt_b(d['analytic_ring_bytes'])} |")
    if "2" in r["measured"]:
        m2 = r["measured"]["2"]["modes"]
        sh, rp = m2["sharded"], m2["replicated"]
        L += ["", "| Ratio (2 ranks, measured) | value |", "|---|---:|",
              f"| time sharded / replicated | {sh['total_s']['median'] / rp['total_s']['median']:.2f} |",
              f"| reduced block bytes sharded / replicated | {sh['block_bytes'] / rp['block_bytes']:.3f} |"]
        if m2["sharded"]["lo_bytes_per_rank"] and m2["replicated"]["lo_bytes_per_rank"]:
            L.append(f"| bytes sent sharded / replicated (lo, min) | "
                     f"{m2['sharded']['lo_bytes_per_rank']['min'] / m2['replicated']['lo_bytes_per_rank']['min']:.3f} |")
    L += ["", f"### 4. Subspace computation vs one training epoch ({u['epoch_samples']} samples, "
          f"{u['epoch_steps']} steps of batch {u['retain_batch']})", "",
          "| Measurement | s (median) | min - max |", "|---|---:|---:|",
          f"| Iamu.setup ({u['subspace_batches']} batches of {u['retain_batch']}) | {u['setup_s']['median']:.2f} | "
          f"{u['setup_s']['min']:.2f} - {u['setup_s']['max']:.2f} |"]
    for k, v in u["setup_breakdown_s"].items():
        L.append(f"| setup: {k} | {v:.2f} | |")
    L += [f"| one epoch (forward + backward + AdamW) | {u['epoch_s']['median']:.2f} | "
          f"{u['epoch_s']['min']:.2f} - {u['epoch_s']['max']:.2f} |",
          f"| Iamu.setup with signal_engine auto (config default; picked "
          f"{', '.join(sorted(set(u['auto_engine_picks'])))}) | {sa['median']:.2f} | {sa['min']:.2f} - {sa['max']:.2f} |",
          f"| setup / epoch | {u['setup_over_epoch']:.2f}x (paired {u['paired_ratio_median']:.2f}x) | |",
          f"| setup (auto engine) / epoch | {u['setup_auto_over_epoch']:.2f}x | |",
          f"| setup auto / setup sequential | {u['setup_auto_over_setup']:.2f}x | |"]
    return "\n".join(L)


def threads_check(threads: list[int], repeats: int, spec: Spec) -> dict:
    """One forward + backward at the engines' batch with each thread count, interleaved."""
    model = make_model(spec)
    batch = make_batch(spec.engine_batch, 7, spec)
    before = torch.get_num_threads()
    times = {n: [] for n in threads}
    try:
        for rep in range(repeats):
            for n in ordered(threads, rep):
                torch.set_num_threads(n)
                t, _ = timed(lambda: sum(p.mean() for p in model(batch["image"]).values()).backward())
                times[n].append(t)
    finally:
        torch.set_num_threads(before)
    return {"batch": spec.engine_batch, **{f"{n}_threads_s": stats(times[n]) for n in threads}}


PARTS = ("iamu", "engines", "reduction")  # iamu: setup vs epoch, then the step vs its floor


def measure(spec: Spec = Spec(), *, parts=PARTS, repeats: int = 7, setup_repeats: int = 7, dist_repeats: int = 20,
            ks=(2, 4, 6, 8), threads: int = 1, profile: bool = False, piece_calls: int = 20,
            two_ranks: bool = True, quick: bool = False) -> dict:
    """The sections of `parts`, side by side; the results dict that main() writes (all parts). `threads`
    0 = torch's default (restored on return)."""
    torch.use_deterministic_algorithms(True, warn_only=True)  # as the runner does (run.deterministic default)
    default_threads = torch.get_num_threads()
    check = threads_check(sorted({1, default_threads}), 3, spec)
    if threads > 0:
        torch.set_num_threads(threads)
    sources = {f: hashlib.sha256((REPO / f).read_bytes()).hexdigest()[:16]
               for f in ("mtu_dist/methods/iamu.py", "mtu_dist/distributed/gradstep.py",
                         "mtu_dist/distributed/signals.py")}
    env = {"package_sources_sha256_16": sources, "torch_default_threads": default_threads,
           "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "loadavg_start": list(os.getloadavg())}
    t_start, load = time.perf_counter(), {}

    def section(name, what, fn):
        print(f"{name}: {what} ...", file=sys.stderr, flush=True)
        with ForeignLoad() as fl:
            out = fn()
        load[name] = fl.result
        print(f"  {fl.result['wall_s']:.0f} s", file=sys.stderr, flush=True)
        return out

    out = {}
    try:
        if "iamu" in parts:
            out["setup"], method, model = section("setup", f"setup vs epoch, {setup_repeats} repeats",
                                                  lambda: bench_setup(setup_repeats, spec))
            out["step"] = section("step", f"iamu step vs floor vs neggrad_plus, {repeats} repeats",
                                  lambda: bench_step(method, model, repeats, spec, piece_calls, profile))
            method = model = None  # free them before the engines section
        if "engines" in parts:
            out["engines"] = section("engines", f"engines K={ks}, {repeats} repeats",
                                     lambda: bench_engines(ks, repeats, spec, profile))
        if "reduction" in parts:
            with tempfile.TemporaryDirectory(prefix="mtu-bench-") as tmp:
                out["reduction"] = section("reduction", f"1{' and 2' if two_ranks else ''} rank(s), "
                                           f"{dist_repeats} repeats",
                                           lambda: bench_reduction(dist_repeats, Path(tmp), spec, two_ranks))
        env["torch_threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(default_threads)
    env["machine_load"] = load
    env["loadavg_end"] = list(os.getloadavg())
    env["wall_s"] = time.perf_counter() - t_start
    return {"benchmark": "gradstep", "quick": quick,
            "config": {"tasks": list(TASK_NAMES), "num_classes": NUM_CLASSES, "resolution": [spec.height, spec.width],
                       "model": spec.model.model_dump(), "dtype": "float32", "device": spec.device,
                       "forget_batch": spec.forget_batch, "retain_batch": spec.retain_batch, "repeats": repeats,
                       "setup_repeats": setup_repeats, "dist_repeats": dist_repeats, "ks": list(ks),
                       "deterministic_algorithms": True},
            "env": env, "threads_check": check, **out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller run: 24x32 images, fewer repeats (< 1 min)")
    p.add_argument("--repeats", type=int, help="repeats of the engine and step measurements (default 7; quick 3)")
    p.add_argument("--setup-repeats", type=int, help="repeats of setup vs epoch (default 7; quick 3)")
    p.add_argument("--dist-repeats", type=int, help="repeats of the measured reduction per mode (default 20; quick 5)")
    p.add_argument("--ks", type=str, default="2,4,6,8", help="engine K values (default 2,4,6,8)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for the measurements (default 1; 0 = torch's default)")
    p.add_argument("--profile", action="store_true",
                   help="profile one iamu step and both engines even when no goal is missed")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT})")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=str, help=argparse.SUPPRESS)
    p.add_argument("--worker-spec", type=str, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.repeats or 20, a.worker_out, Spec.from_json(a.worker_spec))
    q = a.quick
    repeats = a.repeats or (3 if q else 7)
    setup_repeats = a.setup_repeats or (3 if q else 7)
    dist_repeats = a.dist_repeats or (5 if q else 20)
    ks = tuple(int(k) for k in a.ks.split(","))
    if min(repeats, setup_repeats, dist_repeats) < 1 or min(ks) < 1:
        p.error("repeats and K values must be >= 1")
    spec = Spec(height=HEIGHT // 2, width=WIDTH // 2) if q else Spec()
    res = measure(spec, repeats=repeats, setup_repeats=setup_repeats, dist_repeats=dist_repeats, ks=ks,
                  threads=a.threads, profile=a.profile, piece_calls=5 if q else 20, quick=q)
    atomic_write_json(a.out, res)
    print(tables(res))
    env = res["env"]
    print(f"\n{'quick' if q else 'full'} run at {spec.height}x{spec.width}, {repeats} repeats ({setup_repeats} "
          f"setup/epoch, {dist_repeats} reduction), {env['wall_s']:.0f} s wall on {env['cpu_count']} cores; "
          f"cores busy with other processes: {describe_load(env['machine_load'])}; results: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

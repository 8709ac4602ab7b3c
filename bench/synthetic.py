"""Synthetic batches, the model they run on, and the timing harness of the per-task gradient step
benchmarks: signal_engines.py, iamu_step_overhead.py, sharded_vs_replicated.py, iamu_setup_vs_epoch.py.

Batches are random in the loader's format (tasks seg/depth/normal, 13 classes, 48x64 by default,
float32), the model is a run config's model section. Variants inside a benchmark are interleaved
within every repeat, order alternated between repeats, so slow drift of a shared machine hits all
variants alike; figures are medians over repeats.

Threads: torch runs with ONE intra-op thread unless --threads says otherwise. On a shared 2-core
machine, two intra-op threads stall whenever another process holds a core (every parallel region
waits for the descheduled thread): one forward + backward at batch 24 took 1.7 s with 2 threads vs
0.23 s with 1 while another job ran. A short check of both settings is recorded (`threads_check`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's device-probe errors off stderr (CPU only)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timing import ForeignLoad, median, ordered, synchronize  # bench/ is on sys.path

from mtu_dist.config import ModelConfig, RunConfig
from mtu_dist.methods.base import StepContext
from mtu_dist.model import build_model

TASK_NAMES = ("seg", "depth", "normal")
NUM_CLASSES = 13
HEIGHT, WIDTH = 48, 64
STEP_K = 2 * len(TASK_NAMES)  # iamu signals: 3 forget (targets) + 3 retain (tasks)
RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
SOURCES = ("mtu_dist/methods/iamu.py", "mtu_dist/distributed/gradstep.py", "mtu_dist/distributed/signals.py")


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
    def from_json(cls, text: str) -> Spec:
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
    batch = {
        "image": torch.rand(n, 3, h, w, generator=g),
        "seg": seg,
        "depth": depth,
        "normal": normal,
        "mask": mask,
        "valid": torch.ones(n, dtype=torch.bool),
    }
    return {**{k: v.to(spec.device) for k, v in batch.items()}, "key": [f"synth/{seed}/{i:04d}" for i in range(n)]}


def make_model(spec: Spec, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(spec.model, TASK_NAMES, NUM_CLASSES).to(spec.device)
    model.train()
    return model


def clear_grads(params):
    for p in params:
        p.grad = None


def make_ctx(model, engine="sequential", world=1, rank=0, reduction="replicated"):
    cfg = RunConfig().unlearn.model_copy(update={"signal_engine": engine, "reduction": reduction})
    return StepContext(
        model=model, tasks=TASK_NAMES, world=world, alpha=0.5, step=1, rank=rank, targets=TASK_NAMES, config=cfg
    )


class Breakdown:
    """Wall time of named calls on one object (instance attributes shadow the class's methods;
    the package code is not touched). Adds about a microsecond per call."""

    def __init__(self):
        self.acc: dict[str, float] = {}
        self.recording = False  # also keep (fn, copies of args) of every call, for `replay`
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


def clone_args(v):
    """Fresh copies of the tensors (and containers) in a recorded call, so in-place calls replay alike."""
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (list, tuple)):
        return type(v)(clone_args(x) for x in v)
    if isinstance(v, dict):
        return {k: clone_args(x) for k, x in v.items()}
    return v


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


def fmt_b(n):
    if n is None:
        return "-"
    for unit, f in (("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n:.0f} B"


def ms(x):
    return f"{1e3 * x:.1f}"


def rng(d):
    return f"{1e3 * d['min']:.0f} - {1e3 * d['max']:.0f}"


def measure_with(
    benchmark: str, spec: Spec, body, *, threads: int = 1, quick: bool = False, config: dict | None = None
) -> dict:
    """Run `body(section)` (it calls `section(name, what, fn)` for each measured part and returns their
    results by key) with `threads` torch threads (0 = torch's default; restored on return), recording
    the environment and the load other processes put on the machine meanwhile."""
    torch.use_deterministic_algorithms(True, warn_only=True)  # as the runner does (run.deterministic default)
    default_threads = torch.get_num_threads()
    check = threads_check(sorted({1, default_threads}), 3, spec)
    if threads > 0:
        torch.set_num_threads(threads)
    sources = {f: hashlib.sha256((REPO / f).read_bytes()).hexdigest()[:16] for f in SOURCES}
    env = {
        "package_sources_sha256_16": sources,
        "torch_default_threads": default_threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
    }
    t_start, load = time.perf_counter(), {}

    def section(name, what, fn):
        print(f"{name}: {what} ...", file=sys.stderr, flush=True)
        with ForeignLoad() as fl:
            out = fn()
        load[name] = fl.result
        print(f"  {fl.result['wall_s']:.0f} s", file=sys.stderr, flush=True)
        return out

    try:
        out = body(section)
        env["torch_threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(default_threads)
    env["machine_load"] = load
    env["loadavg_end"] = list(os.getloadavg())
    env["wall_s"] = time.perf_counter() - t_start
    return {
        "benchmark": benchmark,
        "quick": quick,
        "config": {
            "tasks": list(TASK_NAMES),
            "num_classes": NUM_CLASSES,
            "resolution": [spec.height, spec.width],
            "model": spec.model.model_dump(),
            "dtype": "float32",
            "device": spec.device,
            "forget_batch": spec.forget_batch,
            "retain_batch": spec.retain_batch,
            "deterministic_algorithms": True,
            **(config or {}),
        },
        "env": env,
        "threads_check": check,
        **out,
    }


def threads_line(res: dict) -> str:
    tc = res["threads_check"]
    return (
        f"Forward + backward at batch {tc['batch']}, threads check: "
        + ", ".join(f"{k.split('_')[0]} thread(s) {ms(v['median'])} ms" for k, v in tc.items() if k.endswith("_s"))
        + f"; measurements below use {res['env']['torch_threads']} thread(s)."
    )


def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The options every one of these benchmarks takes."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller run: 24x32 images, fewer repeats")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for the measurements (default 1; 0 = torch's default)",
    )
    out = RESULTS / f"{name}.json"
    p.add_argument("--out", type=Path, default=out, help=f"results JSON (default {out})")
    return p


def quick_spec(quick: bool) -> Spec:
    return Spec(height=HEIGHT // 2, width=WIDTH // 2) if quick else Spec()


def footer(res: dict, out: Path) -> str:
    from timing import describe_load

    env, c = res["env"], res["config"]
    return (
        f"\n{'quick' if res['quick'] else 'full'} run at {c['resolution'][0]}x{c['resolution'][1]}, "
        f"{env['wall_s']:.0f} s wall on {env['cpu_count']} cores; cores busy with other processes: "
        f"{describe_load(env['machine_load'])}; results: {out}"
    )

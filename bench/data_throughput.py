"""Data-path throughput: shard generator, streaming loader, and training-step consumption.

Measures, side by side in one run (variants interleaved within every repeat, order alternated so
slow drift of a shared machine hits all variants alike):

1. Generator: samples/s of `mtu data synth` (synth-indoor, 48x64, shards of 64) with 1 and 2 writer
   processes, plus the pure render rate (`render_sample`, one process, no encoding) and the PNG/NPY
   encode rate, to show where generator time goes.
2. Loader: decoded samples/s of `BatchLoader` (local batch 16) with 0 (in-process), 1 and 2 worker
   processes, timing whole epochs. Workers are not persistent, so every epoch pays worker start-up;
   epoch 0 is reported separately as warm-up and the time to the first batch is recorded too.
   Two extra variants (0 and 2 workers with the main process at 1 torch thread) show the cost of
   intra-op threading in the main process, where batches are concatenated.
3. Step: samples/s consumed by one forward + backward + AdamW step of the default model on a batch
   of 16 random 3x48x64 images with all three indoor tasks, with 1 torch thread and with the
   default thread count.

Ratios: generator 2 vs 1 processes, loader 2 vs 1 workers, loader (2 workers) / step (goal >= 5x).
Figures are medians over repeats. Besides wall-clock samples/s, every figure also has samples per
CPU-second (this process plus its writer/loader children), and the run records how many cores
other processes kept busy meanwhile (from /proc/stat): on a shared machine wall-clock scaling with
processes is only meaningful when that is near 0. Results go to bench/results/data_throughput.json
and a Markdown table is printed.

    .venv/bin/python bench/data_throughput.py            # full run (a few minutes on 2 cores)
    .venv/bin/python bench/data_throughput.py --quick    # smaller run, to check it works
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import ForeignLoad, cpu_seconds, describe_load, median, ordered, synchronize  # noqa: E402 (bench/ is on sys.path)

from mtu_dist.config import RunConfig
from mtu_dist.data.manifest import load_manifest
from mtu_dist.data.sample import encode_sample
from mtu_dist.data.stream import BatchLoader
from mtu_dist.data.synth import render_sample
from mtu_dist.data.synth_cmd import synth
from mtu_dist.model import build_model
from mtu_dist.tasks import TASKS
from mtu_dist.utils.fileio import atomic_write_json

DATASET = "synth-indoor"
TASK_NAMES = ("seg", "depth", "normal")
NUM_CLASSES = 13
HEIGHT, WIDTH = 48, 64
SHARD_SIZE = 64
BATCH = 16
STEP_GOAL = 5.0
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "data_throughput.json"


def summary(rates, per_cpu):
    """Wall-clock rates (samples/s) and CPU-normalised rates (samples per CPU-second, all processes)."""
    return {
        "median": median(rates),
        "min": min(rates),
        "max": max(rates),
        "runs": rates,
        "per_cpu_s_median": median(per_cpu),
        "per_cpu_s_runs": per_cpu,
    }


# --------------------------------------------------------------------------- generator


def write_shards(out_root, n, workers):
    return synth(
        [DATASET],
        out_root,
        train=n,
        val=0,
        test=0,
        height=HEIGHT,
        width=WIDTH,
        seed=0,
        shard_size=SHARD_SIZE,
        workers=workers,
        overwrite=True,
        progress=lambda *_: None,
    )


def bench_generator(tmp: Path, n: int, n_render: int, repeats: int) -> dict:
    rates, cpu = {1: [], 2: []}, {1: [], 2: []}
    render, encode, render_cpu, encode_cpu = [], [], [], []
    write_shards(tmp / "gen-warmup", SHARD_SIZE, 1)  # imports, first-call caches
    for rep in range(repeats):
        for w in ordered((1, 2), rep):
            t0, c0 = time.perf_counter(), cpu_seconds()
            write_shards(tmp / f"gen-w{w}", n, w)
            rates[w].append(n / (time.perf_counter() - t0))
            cpu[w].append(n / (cpu_seconds() - c0))
        # pure render, one process, no encoding
        t0, c0 = time.perf_counter(), cpu_seconds()
        samples = [render_sample(DATASET, 0, "train", i, HEIGHT, WIDTH) for i in range(n_render)]
        render.append(n_render / (time.perf_counter() - t0))
        render_cpu.append(n_render / (cpu_seconds() - c0))
        # encoding alone (PNG + NPY members), on the samples just rendered
        t0, c0 = time.perf_counter(), cpu_seconds()
        for i, s in enumerate(samples):
            encode_sample(
                s,
                TASK_NAMES,
                {
                    "key": f"{DATASET}/train/{i:06d}",
                    "split": "train",
                    "intrinsics": [float(v) for v in s["intrinsics"]],
                },
            )
        encode.append(n_render / (time.perf_counter() - t0))
        encode_cpu.append(n_render / (cpu_seconds() - c0))
    gen1, gen2, rend = median(rates[1]), median(rates[2]), median(render)
    return {
        "samples": n,
        "render_samples": n_render,
        "write_1proc": summary(rates[1], cpu[1]),
        "write_2proc": summary(rates[2], cpu[2]),
        "render_only": summary(render, render_cpu),
        "encode_only": summary(encode, encode_cpu),
        "ratio_2_vs_1": gen2 / gen1,
        # share of the 1-process per-sample time spent rendering (rest: encode, tar, sha256, I/O)
        "render_share_1proc": (1 / rend) / (1 / gen1),
    }


# --------------------------------------------------------------------------- loader


def one_epoch(loader: BatchLoader, epoch: int, threads: int | None = None) -> dict:
    """Iterate one whole epoch; `threads` sets the main process's torch threads meanwhile."""
    default = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        n, t_first = 0, None
        t0, c0 = time.perf_counter(), cpu_seconds()
        for batch in loader.epoch(epoch):
            if t_first is None:
                t_first = time.perf_counter() - t0
            n += int(batch["valid"].sum())
        dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    finally:
        torch.set_num_threads(default)
    return {"samples": n, "seconds": dt, "cpu_s": cpu, "first_batch_s": t_first, "rate": n / dt, "per_cpu_s": n / cpu}


# (name, loader workers, main-process torch threads; None = default). The first three are the
# measurement asked for; the "main 1 thread" ones isolate the cost of intra-op threading in the main
# process (batch concatenation), which matters when the cores are shared.
LOADER_VARIANTS = (("0", 0, None), ("1", 1, None), ("2", 2, None), ("0_main1thread", 0, 1), ("2_main1thread", 2, 1))


def bench_loader(tmp: Path, n: int, repeats: int, variants=LOADER_VARIANTS, batch: int = BATCH) -> dict:
    write_shards(tmp / "loader", n, 2)
    manifest = load_manifest(tmp / "loader" / DATASET)
    loaders = {
        w: BatchLoader(manifest, "train", rank=0, world=1, local_batch=batch, workers=w, seed=0)
        for w in {v[1] for v in variants}
    }
    warm = {name: one_epoch(loaders[w], 0, th) for name, w, th in ordered(variants, 0)}  # warm-up
    runs = {name: [] for name, _, _ in variants}
    for rep in range(repeats):
        for name, w, th in ordered(variants, rep + 1):
            runs[name].append(one_epoch(loaders[w], rep + 1, th))
    out = {
        "samples_per_epoch": n,
        "local_batch": batch,
        "default_main_process_torch_threads": torch.get_num_threads(),
        "workers": {},
    }
    for name, w, th in variants:
        rates = [r["rate"] for r in runs[name]]
        bad = [r["samples"] for r in runs[name] + [warm[name]] if r["samples"] != n]
        if bad:
            raise RuntimeError(f"loader variant {name} delivered {bad} valid samples per epoch, expected {n}")
        out["workers"][name] = {
            "workers": w,
            "main_threads": th or torch.get_num_threads(),
            **summary(rates, [r["per_cpu_s"] for r in runs[name]]),
            "first_batch_s_median": median([r["first_batch_s"] for r in runs[name]]),
            "warmup_epoch": warm[name],
            "epochs": runs[name],
        }
    r = {name: out["workers"][name]["median"] for name, _, _ in variants}
    out["ratio_2_vs_1"] = r["2"] / r["1"]
    out["ratio_2_vs_0"] = r["2"] / r["0"]
    return out


# --------------------------------------------------------------------------- training step


def make_step(seed: int = 0, batch: int = BATCH, model_cfg=None, device: str = "cpu"):
    """One forward + backward + AdamW step on a fixed random batch; `model_cfg`: a run config's model section."""
    torch.manual_seed(seed)
    model = build_model(model_cfg or RunConfig().model, TASK_NAMES, NUM_CLASSES).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, HEIGHT, WIDTH, generator=g).to(device)
    target = {
        "seg": torch.randint(0, NUM_CLASSES, (batch, HEIGHT, WIDTH), generator=g, dtype=torch.int64),
        "depth": torch.rand(batch, 1, HEIGHT, WIDTH, generator=g) * 9.5 + 0.5,
        "normal": torch.nn.functional.normalize(torch.randn(batch, 3, HEIGHT, WIDTH, generator=g), dim=1),
    }
    target = {t: v.to(device) for t, v in target.items()}

    def step() -> float:
        synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        pred = model(x)
        loss = sum(TASKS[t].per_sample_loss(pred[t], target[t]).mean() for t in TASK_NAMES)
        loss.backward()
        opt.step()
        synchronize()
        return time.perf_counter() - t0

    return step


def bench_step(
    steps: int,
    repeats: int,
    warmup: int = 2,
    budget_s: float = 3.0,
    min_steps: int = 3,
    batch: int = BATCH,
    model_cfg=None,
    device: str = "cpu",
) -> dict:
    """Median step time per repeat; a repeat stops early after `budget_s` (at least `min_steps` steps),
    which bounds the run when a contended machine makes multi-threaded steps very slow."""
    default_threads = torch.get_num_threads()
    settings = {"1_thread": 1, "default_threads": default_threads}
    step = make_step(batch=batch, model_cfg=model_cfg, device=device)
    times = {k: [] for k in settings}  # per repeat: median step time
    cpu = {k: [] for k in settings}  # per repeat: CPU seconds per step (all threads)
    counts = {k: [] for k in settings}  # per repeat: timed steps
    try:
        for rep in range(repeats):
            for name in ordered(settings, rep):
                torch.set_num_threads(settings[name])
                for _ in range(warmup):
                    step()
                c0, t0, ts = cpu_seconds(), time.perf_counter(), []
                while len(ts) < steps and (len(ts) < min_steps or time.perf_counter() - t0 < budget_s):
                    ts.append(step())
                times[name].append(median(ts))
                cpu[name].append((cpu_seconds() - c0) / len(ts))
                counts[name].append(len(ts))
    finally:
        torch.set_num_threads(default_threads)
    out = {
        "batch": batch,
        "device": device,
        "max_steps_per_repeat": steps,
        "budget_s_per_repeat": budget_s,
        "default_thread_count": default_threads,
    }
    for name, ts in times.items():
        out[name] = {
            "step_s_median": median(ts),
            "step_s_runs": ts,
            "samples_per_s": batch / median(ts),
            "threads": settings[name],
            "cpu_s_per_step_median": median(cpu[name]),
            "timed_steps": counts[name],
            "per_cpu_s_median": batch / median(cpu[name]),
        }
    return out


# --------------------------------------------------------------------------- report


def table(res: dict) -> str:
    g, ld, s = res.get("generator"), res["loader"], res["step"]
    rows = [
        ("Generator, render only (1 proc, no encoding)", g and g["render_only"]),
        ("Generator, encode only (1 proc, PNG/NPY)", g and g["encode_only"]),
        ("Generator, write shards, 1 process", g and g["write_1proc"]),
        ("Generator, write shards, 2 processes", g and g["write_2proc"]),
        ("Loader, 0 workers (in-process)", ld["workers"]["0"]),
        ("Loader, 1 worker", ld["workers"]["1"]),
        ("Loader, 2 workers", ld["workers"]["2"]),
        ("Loader, 0 workers, main process 1 thread", ld["workers"]["0_main1thread"]),
        ("Loader, 2 workers, main process 1 thread", ld["workers"]["2_main1thread"]),
    ]
    lines = ["| Measurement | samples/s (median) | min - max | samples per CPU-s |", "|---|---:|---:|---:|"]
    for name, d in rows:
        if d:
            lines.append(
                f"| {name} | {d['median']:.0f} | {d['min']:.0f} - {d['max']:.0f} | {d['per_cpu_s_median']:.0f} |"
            )
    for key, label in (("1_thread", "1 thread"), ("default_threads", f"{s['default_thread_count']} threads")):
        d = s[key]
        lo, hi = s["batch"] / max(d["step_s_runs"]), s["batch"] / min(d["step_s_runs"])
        lines.append(
            f"| Train step consumption, {label} ({1e3 * d['step_s_median']:.0f} ms/step) "
            f"| {d['samples_per_s']:.0f} | {lo:.0f} - {hi:.0f} | {d['per_cpu_s_median']:.0f} |"
        )
    r = res["ratios"]
    lines += ["", "| Ratio | value |", "|---|---:|"]
    if g:
        lines += [
            f"| Generator 2 vs 1 processes | {r['generator_2_vs_1_proc']:.2f}x |",
            f"| Render share of 1-process generator time | {100 * g['render_share_1proc']:.0f}% |",
        ]
    lines += [
        f"| Loader 2 vs 1 workers | {r['loader_2_vs_1_workers']:.2f}x |",
        f"| Loader 2 workers vs 0 (in-process) | {r['loader_2_vs_0_workers']:.2f}x |",
        f"| Loader (2 workers) / step, 1 thread | {r['loader_vs_step_1_thread']:.1f}x |",
        f"| Loader (2 workers) / step, default threads | {r['loader_vs_step_default_threads']:.1f}x |",
        f"| Loader (2 workers, main 1 thread) / step, 1 thread | {r['loader_vs_step_matched_1_thread']:.1f}x |",
        f"| Goal loader / step >= {STEP_GOAL:g}x met (worst case) | "
        f"{'yes' if r['loader_vs_step_goal_met'] else 'no'} |",
    ]
    return "\n".join(lines)


def measure(
    *,
    repeats: int = 5,
    gen_samples: int = 1024,
    render_samples: int = 128,
    loader_samples: int = 1024,
    steps: int = 10,
    budget_s: float = 3.0,
    generator: bool = True,
    batch: int = BATCH,
    model_cfg=None,
    device: str = "cpu",
    workdir: Path | None = None,
    quick: bool = False,
) -> dict:
    """Every section side by side (the generator one is optional); the results dict that main() writes.
    `batch` is the loader's and the step's batch, `model_cfg` a run config's model section (default: the
    default config's), `device` where the step runs (the loader always runs on the CPU)."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
    }
    t_start, load, gen = time.perf_counter(), {}, None
    with tempfile.TemporaryDirectory(prefix="mtu-bench-", dir=workdir) as tmp:
        tmp = Path(tmp)
        if generator:
            print(f"generator: {gen_samples} samples x {repeats} repeats ...", file=sys.stderr, flush=True)
            with ForeignLoad() as fl:
                gen = bench_generator(tmp, gen_samples, render_samples, repeats)
            load["generator"] = fl.result
        print(
            f"loader: {loader_samples} samples/epoch x {repeats} epochs (+1 warm-up) ...", file=sys.stderr, flush=True
        )
        with ForeignLoad() as fl:
            loader = bench_loader(tmp, loader_samples, repeats, batch=batch)
        load["loader"] = fl.result
    print(f"step: {steps} steps x {repeats} repeats ...", file=sys.stderr, flush=True)
    with ForeignLoad() as fl:
        step = bench_step(steps, repeats, budget_s=budget_s, batch=batch, model_cfg=model_cfg, device=device)
    load["step"] = fl.result
    env["machine_load"] = load
    env["loadavg_end"] = list(os.getloadavg())
    env["wall_s"] = time.perf_counter() - t_start

    l2 = loader["workers"]["2"]["median"]
    ratios = {
        # matched: loader and step with the same main-process thread setting, as in one training process
        "loader_vs_step_matched_1_thread": (
            loader["workers"]["2_main1thread"]["median"] / step["1_thread"]["samples_per_s"]
        ),
        "loader_2_vs_1_workers": loader["ratio_2_vs_1"],
        "loader_2_vs_0_workers": loader["ratio_2_vs_0"],
        "loader_vs_step_1_thread": l2 / step["1_thread"]["samples_per_s"],
        "loader_vs_step_default_threads": l2 / step["default_threads"]["samples_per_s"],
    }
    if gen:
        ratios["generator_2_vs_1_proc"] = gen["ratio_2_vs_1"]
    ratios["loader_vs_step_goal"] = STEP_GOAL
    ratios["loader_vs_step_worst"] = min(ratios["loader_vs_step_1_thread"], ratios["loader_vs_step_default_threads"])
    ratios["loader_vs_step_goal_met"] = ratios["loader_vs_step_worst"] >= STEP_GOAL
    return {
        "benchmark": "data_throughput",
        "quick": quick,
        "config": {
            "dataset": DATASET,
            "resolution": [HEIGHT, WIDTH],
            "shard_size": SHARD_SIZE,
            "batch": batch,
            "repeats": repeats,
            "gen_samples": gen_samples if gen else None,
            "render_samples": render_samples if gen else None,
            "loader_samples": loader_samples,
            "steps": steps,
            "device": device,
            "model": (model_cfg or RunConfig().model).model_dump(),
        },
        "env": env,
        "generator": gen,
        "loader": loader,
        "step": step,
        "ratios": ratios,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smaller run (fewer samples, repeats and steps)")
    p.add_argument("--repeats", type=int, help="repeats per measurement (default 5; quick 3)")
    p.add_argument("--gen-samples", type=int, help="samples written per generator run (default 1024; quick 256)")
    p.add_argument("--render-samples", type=int, help="samples rendered per render-only run (default 128; quick 32)")
    p.add_argument("--loader-samples", type=int, help="train samples in the loader dataset (default 1024; quick 256)")
    p.add_argument(
        "--steps",
        type=int,
        help="most timed training steps per repeat and thread setting "
        "(default 10; quick 5; a repeat also stops after 3 s, quick 1.5 s, with at least 3 steps)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT})")
    p.add_argument("--workdir", type=Path, help="folder for the temporary shards (default: system temp)")
    a = p.parse_args(argv)
    q = a.quick
    repeats = a.repeats or (3 if q else 5)
    gen_n = a.gen_samples or (256 if q else 1024)
    render_n = a.render_samples or (32 if q else 128)
    loader_n = a.loader_samples or (256 if q else 1024)
    steps = a.steps or (5 if q else 10)
    if repeats < 1 or min(gen_n, render_n, loader_n, steps) < 1:
        p.error("--repeats, --*-samples and --steps must be >= 1")
    res = measure(
        repeats=repeats,
        gen_samples=gen_n,
        render_samples=render_n,
        loader_samples=loader_n,
        steps=steps,
        budget_s=1.5 if q else 3.0,
        workdir=a.workdir,
        quick=q,
    )
    atomic_write_json(a.out, res)
    print(table(res))
    env = res["env"]
    print(
        f"\n{'quick' if q else 'full'} run, {repeats} repeats, {env['wall_s']:.0f} s wall on "
        f"{env['cpu_count']} cores; cores busy with other processes: {describe_load(env['machine_load'])}; "
        f"results: {a.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

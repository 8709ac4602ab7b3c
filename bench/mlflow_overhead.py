"""MLflow logging overhead: step time of the real training loop with tracking on vs off.

`fit` (mtu_dist/runner/train.py) in a real session (`open_session`), same data, model, seed and steps, once with
the project's Tracker on an embedded sqlite store in a temporary folder (metric points buffered and sent
with one `log_batch` per FLUSH_EVERY points) and once with tracking disabled; the two interleaved, order
alternated, `--repeats` times, after one untimed warm-up pair (mlflow import, store creation). Step time
= (the loop's own timer + the final flush of the buffer) / steps: the tail flush runs in `finish`, after
the loop's timer stops, but it is logging cost all the same.

Two figures, goal <= 2% each:
- overhead: median step time with tracking / median without - 1. On a shared machine one run's step
  time varies by more than 2%, so this one is noisy;
- share: time spent inside the Tracker's metric calls (log_metrics, its flushes, the tail flush) /
  step time with tracking, per run, median. It times only the logging work, so it resolves the goal.

    .venv/bin/python bench/mlflow_overhead.py            # 5 repeats of one epoch (384 samples), ~1-2 min
    .venv/bin/python bench/mlflow_overhead.py --quick    # tiny data and model, 1 repeat
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from runner import ROOT, make_shards  # noqa: E402 (bench/ is on sys.path)
from timing import median, ordered  # noqa: E402

from mtu_dist.utils.fileio import atomic_write_json

GOAL = 0.02


def one_run(cfg, name: str) -> dict:
    """One training run through the real session and loop; the Tracker's metric calls timed."""
    from mtu_dist.runner.session import open_session
    from mtu_dist.runner.train import fit

    s = open_session(cfg, "train", name, overwrite=True)
    spent, points = [0.0], [0]
    log_metrics = s.tracker.log_metrics

    def timed_log_metrics(metrics, step):  # flushes triggered inside are part of this call's time
        t0 = time.perf_counter()
        try:
            return log_metrics(metrics, step)
        finally:
            spent[0] += time.perf_counter() - t0
            points[0] += len(metrics)

    s.tracker.log_metrics = timed_log_metrics  # instance attribute: the package code is untouched
    _, loop_s, steps = fit(s)
    t0 = time.perf_counter()
    s.tracker.flush()
    tail_s = time.perf_counter() - t0
    s.tracker.finish()
    total = loop_s + tail_s
    return {
        "steps": steps,
        "loop_s": loop_s,
        "tail_flush_s": tail_s,
        "step_s": total / steps,
        "tracker_s": spent[0] + tail_s,
        "tracker_share": (spent[0] + tail_s) / total,
        "points": points[0],
    }


def measure(
    work: Path, shards: Path, *, files=(), sets=(), repeats: int = 5, epochs: int = 1, threads: int = 1
) -> dict:
    """Tracking on vs off, interleaved; `threads` torch threads (as the launched ranks run)."""
    import torch

    from mtu_dist.config import load_config
    from mtu_dist.reporting.tracking import FLUSH_EVERY

    uri = f"sqlite:///{work / 'mlflow.db'}"
    runs = {"on": [], "off": []}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rep in range(-1, repeats):  # rep -1: warm-up pair, not recorded
            for variant in ordered(("on", "off"), max(rep, 0)):
                cfg = load_config(
                    list(files),
                    [
                        *sets,
                        f"data.root={shards}",
                        f"out={work / 'runs'}",
                        f"train.epochs={epochs}",
                        f"tracking.enabled={variant == 'on'}",
                        f"tracking.uri={uri}",
                    ],
                )
                r = one_run(cfg, f"tracking-{variant}")
                if rep >= 0:
                    runs[variant].append(r)
    finally:
        torch.set_num_threads(before)
    step = {v: [r["step_s"] for r in rs] for v, rs in runs.items()}
    med = {v: median(ts) for v, ts in step.items()}
    return {
        "repeats": repeats,
        "epochs": epochs,
        "steps": runs["on"][0]["steps"],
        "threads": threads,
        "flush_every_points": FLUSH_EVERY,
        "points_per_run": runs["on"][0]["points"],
        "store": "sqlite, temporary",
        "step_s": step,
        "median_step_s": med,
        "overhead": med["on"] / med["off"] - 1,
        "paired_overhead_median": median([a / b - 1 for a, b in zip(step["on"], step["off"])]),
        "tracker_share": median([r["tracker_share"] for r in runs["on"]]),
        "tracker_s_per_step": median([r["tracker_s"] / r["steps"] for r in runs["on"]]),
        "tail_flush_s": median([r["tail_flush_s"] for r in runs["on"]]),
        "goal": GOAL,
        "runs": runs,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--quick", action="store_true", help="tiny data and model (configs/tiny.yaml), 1 repeat")
    ap.add_argument("--repeats", type=int, help="timed pairs (default 5; quick 1)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per run (default 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mlflow_overhead.json")
    a = ap.parse_args(argv)
    files = [str(ROOT / "configs" / "tiny.yaml")] if a.quick else []
    with tempfile.TemporaryDirectory(prefix="mtu-bench-") as tmp:
        shards = make_shards(Path(tmp) / "shards", "tiny" if a.quick else "full")
        res = measure(Path(tmp), shards, files=files, repeats=a.repeats or (1 if a.quick else 5), epochs=a.epochs)
    atomic_write_json(a.out, res)
    ms = {v: 1e3 * t for v, t in res["median_step_s"].items()}
    print(
        f"| figure | value |\n|---|---|\n| step ms, tracking on / off (median) | {ms['on']:.1f} / {ms['off']:.1f} |\n"
        f"| overhead, median step time on / off - 1 (goal <= {GOAL:.0%}) | {res['overhead']:+.1%} |\n"
        f"| time in Tracker calls / step time (goal <= {GOAL:.0%}) | {res['tracker_share']:.2%} |\n"
        f"\nresults: {a.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

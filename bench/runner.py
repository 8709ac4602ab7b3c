"""End-to-end runner figures: training throughput at 1 vs 2 ranks, retrain and unlearning wall
times, and the demo's peak memory.

1. `mtu demo` in a fresh folder (synthetic shards -> original -> full/partial requests -> retrain ->
   every registered method -> eval): total wall time and peak RSS (largest process, from
   getrusage of the children). Retrain and each method's unlearning time are read from the
   metrics.json files it writes; ratio unlearning / retrain (goal <= 1/20 for iamu).
2. `mtu train` on the same global batch (16) with 1 process and with 2 gloo ranks
   (launch/accelerate/cpu_2proc.yaml), interleaved, `--repeats` times: samples/s from the runs'
   own training timers; ratio of 2-rank to 1-rank step time (goal <= 0.6 on 2 cores).

    .venv/bin/python bench/runner.py            # ~10 minutes on 2 cores
    .venv/bin/python bench/runner.py --quick    # throughput only, 1 repeat
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd, cwd, env=None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    if p.returncode:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return time.perf_counter() - t0


def demo(work: Path) -> dict:
    wall = run([BIN / "mtu", "demo", "--root", work / "shards", "--out", work / "runs",
                "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"], cwd=work)
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    times = {}
    for metrics in sorted((work / "runs" / "synth-indoor").glob("*/final/metrics.json")):
        times[metrics.parent.parent.name] = json.loads(metrics.read_text())["time_s"]
    ratios = {k: v / times[f"retrain-{k.rsplit('-', 1)[1]}"] for k, v in times.items()
              if not k.startswith(("retrain", "original"))}
    return {"demo_wall_s": wall, "demo_peak_rss_mib": peak_mib, "time_s": times, "unlearn_over_retrain": ratios}


def throughput(work: Path, repeats: int, epochs: int) -> dict:
    shards = work / "shards"
    if not (shards / "synth-indoor" / "manifest.json").exists():
        run([BIN / "mtu", "data", "synth", "--datasets", "synth-indoor", "--out", shards], cwd=work)
    common = ["--set", f"data.root={shards}", "--set", f"out={work / 'tp'}", "--set", "tracking.enabled=false",
              "--set", f"train.epochs={epochs}", "--overwrite"]
    rates = {1: [], 2: []}
    for rep in range(repeats):
        for nproc in ((1, 2) if rep % 2 == 0 else (2, 1)):
            cfg = ROOT / "launch" / "accelerate" / ("cpu_2proc.yaml" if nproc == 2 else "cpu_1proc.yaml")
            name = f"np{nproc}"
            run([BIN / "accelerate", "launch", "--config_file", cfg, "--num_processes", nproc,
                 "-m", "mtu_dist.cli", "train", *common, "--name", name], cwd=work, env={"OMP_NUM_THREADS": "1"})
            report = json.loads((work / "tp" / "synth-indoor" / name / "final" / "metrics.json").read_text())
            rates[nproc].append(384 * epochs / report["time_s"])
    med = {n: statistics.median(v) for n, v in rates.items()}
    return {"samples_per_s": rates, "median_samples_per_s": med, "step_time_2rank_over_1rank": med[1] / med[2]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "runner.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {"throughput": throughput(work, 1 if a.quick else a.repeats, 1 if a.quick else 2)}
        if not a.quick:
            results["demo"] = demo(work)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    tp = results["throughput"]
    print("| figure | value |\n|---|---|")
    print(f"| train samples/s, 1 rank (median) | {tp['median_samples_per_s'][1]:.1f} |")
    print(f"| train samples/s, 2 ranks (median) | {tp['median_samples_per_s'][2]:.1f} |")
    print(f"| step time 2 ranks / 1 rank | {tp['step_time_2rank_over_1rank']:.2f} |")
    if "demo" in results:
        d = results["demo"]
        print(f"| demo wall time s | {d['demo_wall_s']:.0f} |\n| demo peak RSS MiB | {d['demo_peak_rss_mib']:.0f} |")
        for k, v in d["time_s"].items():
            print(f"| {k} wall s | {v:.1f} |")
        for k, v in d["unlearn_over_retrain"].items():
            print(f"| {k} / retrain | {v:.3f} |")


if __name__ == "__main__":
    main()

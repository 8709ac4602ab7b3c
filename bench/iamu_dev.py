"""Variants of a method, tuned on the paper table's *dev* requests only (never an evaluation request).

The development loop of the iamu issue: each variant (a set of `--set` items over the method's options)
gets the paper table's tuning (`mtu tune`: the same space, trial count, budget and stop rule) on every
(benchmark, setting) dev request of an existing paper-table folder, reusing its data, originals and dev
requests. Printed per variant and unit: the selected trial's damage (the tuning criterion: collateral plus
overshoot on the dev request) and its parts (the mean relative move of val, retain and, in the partial
setting, the kept tasks of the request's instances; the overshoot), the mean damage over the trials
that reached the target, how many reached, the steps the selected trial took, and its membership
attack's AUC (on the target tasks in the partial setting; the tuning does not use it, and a dev request
has no retrain to compare with: the evaluation requests' retrains score about 0.5). A variant that wins
here is then confirmed on the evaluation requests by `bench/paper_table.py --methods ...`
(bench/README.md, "Paper table").

    .venv/bin/python bench/iamu_dev.py --table bench/results/paper_table \\
        --variant base= --variant unit=unlearn.options.forget_norm=unit
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _unit(job: tuple) -> dict:
    """One (variant, benchmark, setting) tuning, in a worker process; its summary."""
    import paper_table as pt
    import torch

    from mtu_dist.studies.tune import TuneJob, load_space, tune

    table, out, method, variant, sets, ds, setting, space_path = job
    torch.set_num_threads(1)
    bench = pt.Bench(pt.parser().parse_args(["--out", str(table)]), pt.SIZES["default"])
    base = bench.base(ds)
    space = load_space(space_path)
    dev = Path(table) / "requests" / f"{ds}-{setting}-dev.yaml"
    origin = Path(table) / "runs" / ds / "original"
    folder = Path(out) / variant / f"{ds}-{setting}"
    tj = TuneJob(str(dev), str(origin), folder, base, [], sets, bench.uri, space, f"{ds}-{setting}-{variant}")
    tuned = tune(tj, [method], log=lambda msg: None)["methods"][method]
    trials = [json.loads(p.read_text()) for p in sorted((folder / "trials").glob(f"{method}-t*.json"))]
    reached = [t["damage"] for t in trials if t["feasible"]]
    chosen = next(t for t in trials if t["trial"] == tuned["trial"])
    moves = _damage_groups(origin, chosen, space.tolerance)
    unlearning = json.loads((Path(chosen["run_dir"]) / "final" / "metrics.json").read_text())["unlearning"]
    return {
        "mia": unlearning["mia_auc_target"] if setting == "partial" else unlearning["mia_auc"],
        "variant": variant,
        "unit": f"{ds}-{setting}",
        "damage": tuned["damage"],
        "mean_reached": sum(reached) / len(reached) if reached else float("nan"),
        "reached": f"{len(reached)}/{len(trials)}",
        "stop": (chosen.get("stop_reason") or "")[:40],
        **moves,
    }


def _damage_groups(origin: Path, trial: dict, tolerance: float) -> dict:
    """What the selected trial's damage is made of (mtu_dist/studies/tune.py: val, retain, kept, overshoot)."""
    import yaml

    from mtu_dist.evaluation.scoring import original_reference
    from mtu_dist.studies.tune import damage_groups

    run = Path(trial["run_dir"])
    sample = yaml.safe_load((run / "config.yaml").read_text())["eval"]["retain_sample"]
    original = original_reference(origin, trial["request_sha256"], sample).report["splits"]
    mine = json.loads((run / "final" / "metrics.json").read_text())["splits"]
    return damage_groups(original, mine, tolerance)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", required=True, help="a paper-table folder (bench/paper_table.py --out)")
    ap.add_argument("--out", help="tuning folders (default: <table>/dev_variants)")
    ap.add_argument("--method", default="iamu", help="the registered method the variants modify (default: iamu)")
    ap.add_argument(
        "--variant",
        action="append",
        required=True,
        help="NAME=FIELD=VALUE[,FIELD=VALUE...]: --set items of one variant (NAME= alone: the method as it is)",
    )
    ap.add_argument("--datasets", nargs="+", default=["synth-indoor", "synth-street"])
    ap.add_argument("--settings", nargs="+", default=["full", "partial"])
    ap.add_argument("--space", default=str(ROOT / "configs" / "tune_space.yaml"), help="search-space YAML")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2: one per core)")
    a = ap.parse_args(argv)
    variants = {}
    for v in a.variant:
        name, _, rest = v.partition("=")
        variants[name] = [s for s in rest.split(",") if s]
    out = a.out or str(Path(a.table) / "dev_variants")
    jobs = [
        (a.table, out, a.method, name, sets, ds, st, a.space)
        for name, sets in variants.items()
        for ds in a.datasets
        for st in a.settings
    ]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(_unit, jobs))
    print(
        "| variant | unit | selected damage | its val / retain / kept / overshoot | mean damage (reached) "
        "| reached | selected trial's stop | its MIA AUC |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        moves = " / ".join(
            "-" if r.get(k) is None else f"{r[k]:.3f}" for k in ("val", "retain", "forget_kept", "overshoot")
        )
        print(
            f"| {r['variant']} | {r['unit']} | {r['damage']:.4f} | {moves} | {r['mean_reached']:.4f} | {r['reached']} "
            f"| {r['stop']} | {r['mia']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

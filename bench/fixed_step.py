"""Unlearning at a fixed step size on a paper-table folder's dev request: how selectively a method forgets
when nothing ramps its step (bench/README.md, "Fifth round").

The paper table's tuning grows every trial's step size 4% per step (configs/tune_space.yaml) so that it
reaches the forget level within 150 steps. This runs (method, step size) pairs with the tuning's fixed
settings but a constant step (`unlearn.lr_growth=1`), its own step budget and a trajectory every
`--every` steps, on the dev request only (never an evaluation request). Printed per run: how it ended,
the forget pairs' mean relative drop (target tasks), the retain and val splits' and the kept tasks' mean
relative moves at the end, the retain split's move when the forget pairs had dropped by the given
amounts (interpolated on the trajectory: selectivity at equal forgetting), and the tuning criterion's
damage when the run reached the level.

    .venv/bin/python bench/fixed_step.py --table DIR --dataset synth-indoor --setting partial \\
        --run iamu:0.012 --run iamu:0.025 --run grad_ascent:0.0001 --steps 800
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


def _rel_moves(first: dict, point: dict, split: str, tasks) -> float | None:
    """Mean relative move |U - O| / O of `split`'s tasks between two trajectory points."""
    moves = [
        abs(point[split][t] - first[split][t]) / abs(first[split][t])
        for t in tasks
        if t in point.get(split, {}) and first[split].get(t)
    ]
    return sum(moves) / len(moves) if moves else None


def _drop(first: dict, point: dict, targets) -> float | None:
    """Mean relative drop of the forget pairs' primary metric (target tasks with a nonzero start; None if none)."""
    drops = [(first["forget"][t] - point["forget"][t]) / first["forget"][t] for t in targets if first["forget"][t]]
    return sum(drops) / len(drops) if drops else None


def selectivity(trajectory: dict, drops: list[float]) -> dict:
    """From a run's trajectory: the end's forget drop and moves, and the retain split's move at each forget drop
    in `drops` (linear between the two points around it; None where the run never dropped that far)."""
    points, targets = trajectory["points"], trajectory["targets"]
    first, last = points[0], points[-1]
    out = {
        "forget_drop": _drop(first, last, targets),
        "retain": _rel_moves(first, last, "retain", first["retain"]),
        "val": _rel_moves(first, last, "val", first["val"]),
        "kept": _rel_moves(first, last, "forget_kept", first.get("forget_kept", {})),
    }
    for d in drops:
        out[f"retain@{d}"] = None
        for a, b in zip(points, points[1:]):
            da, db = _drop(first, a, targets), _drop(first, b, targets)
            if da is not None and db is not None and db >= d > da:
                w = (d - da) / (db - da)
                ra, rb = (
                    _rel_moves(first, a, "retain", first["retain"]),
                    _rel_moves(first, b, "retain", first["retain"]),
                )
                out[f"retain@{d}"] = ra + w * (rb - ra)
                break
    return out


def _run(job: tuple) -> dict:
    """One fixed-step run, in a worker process; its summary."""
    import paper_table as pt
    import torch

    from mtu_dist.evaluation.scoring import original_reference
    from mtu_dist.runner.commands import unlearn_command
    from mtu_dist.studies.tune import TuneJob, criterion, load_space
    from mtu_dist.utils.fileio import sha256_file

    table, quick, out, method, lr, alpha, sets, steps, every, ds, setting, space_path, drops = job
    torch.set_num_threads(1)
    size = pt.SIZES["quick" if quick else "default"]
    bench = pt.Bench(pt.parser().parse_args(["--out", str(table), *(["--quick"] if quick else [])]), size)
    space = load_space(space_path)
    dev = Path(table) / "requests" / f"{ds}-{setting}-dev.yaml"
    origin = Path(table) / "runs" / ds / "original"
    tj = TuneJob(str(dev), str(origin), Path(out), bench.base(ds), [], [], bench.uri, space, "fixed")
    knobs = {
        "unlearn.method": method,
        "unlearn.lr": lr,
        "unlearn.lr_growth": 1.0,
        "unlearn.steps": steps,
        "unlearn.trajectory_every": every,
    }
    if alpha is not None:
        knobs["unlearn.alpha"] = alpha
    knobs.update(s.split("=", 1) for s in sets)
    cfg = tj.config(knobs)
    label = f"{method} lr {lr:g}" + (f" alpha {alpha:g}" if alpha is not None else "") + "".join(f" {s}" for s in sets)
    name = f"fixed-{ds}-{setting}-{method}-lr{lr:g}" + (f"-a{alpha:g}" if alpha is not None else "")
    name += "".join("-" + s.rsplit(".", 1)[-1].replace("=", "") for s in sets)
    report = unlearn_command(
        cfg, request=str(dev), origin=str(origin), name=name, overwrite=True, tracking_uri=bench.uri
    )
    run = Path(report["run"]["run_dir"])
    metrics = json.loads((run / "final" / "metrics.json").read_text())
    original = original_reference(origin, sha256_file(dev), cfg.eval.retain_sample).report["splits"]
    scores = criterion(original, metrics["splits"], space.tolerance)
    return {
        "run": label,
        "stop": (metrics.get("stop_reason") or "")[:24],
        "steps": metrics["trajectory"]["points"][-1]["step"],
        "reached": scores["feasible"],
        "damage": scores["damage"],
        **selectivity(metrics["trajectory"], drops),
    }


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", required=True, help="a paper-table folder (bench/paper_table.py --out)")
    ap.add_argument("--quick", action="store_true", help="the table was made with paper_table.py --quick")
    ap.add_argument("--out", help="run folder (default: <table>/fixed_step)")
    ap.add_argument("--dataset", default="synth-indoor")
    ap.add_argument("--setting", default="partial", choices=["full", "partial"])
    ap.add_argument("--run", action="append", required=True, help="METHOD:LR[:ALPHA], a fixed step size (repeatable)")
    ap.add_argument("--steps", type=int, default=800, help="step budget of every run (default 800)")
    ap.add_argument("--every", type=int, default=10, help="trajectory point every k steps (default 10)")
    ap.add_argument("--drops", type=float, nargs="+", default=[0.1, 0.2, 0.3], help="forget drops to compare at")
    ap.add_argument("--space", default=str(ROOT / "configs" / "tune_space.yaml"), help="search-space YAML")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2: one per core)")
    a = ap.parse_args(argv)
    out = a.out or str(Path(a.table) / "fixed_step")
    jobs = []
    for spec in a.run:
        head, *sets = spec.split(",")
        method, lr, *alpha = head.split(":")
        jobs.append(
            (a.table, a.quick, out, method, float(lr), float(alpha[0]) if alpha else None, sets, a.steps, a.every)
            + (a.dataset, a.setting, a.space, a.drops)
        )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(_run, jobs))
    at = " | ".join(f"retain at forget -{d:g}" for d in a.drops)
    print(f"| run | end | steps | forget drop | retain / val / kept move | {at} | reached | damage |")
    print("|---|---|---|---|---|" + "---|" * len(a.drops) + "---|---|")
    for r in rows:
        moves = " / ".join(_f(r[k]) for k in ("retain", "val", "kept"))
        sel = " | ".join(_f(r[f"retain@{d}"]) for d in a.drops)
        damage = f"{r['damage']:.4f}" if r["reached"] else "-"
        print(
            f"| {r['run']} | {r['stop']} | {r['steps']} | {_f(r['forget_drop'])} | {moves} | {sel} "
            f"| {'yes' if r['reached'] else 'no'} | {damage} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

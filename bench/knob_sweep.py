"""Ablations and knob sweeps on the paper table's own evaluation requests.

Runs chosen methods with *fixed* knobs (the same for every method named, or per variant) on the
evaluation requests, originals and retrains that `bench/paper_table.py` left in its folder, and prints
mean +- std over seeds of UIS (and per task), |MIA AUC - retrain's| and gap to retrain. It answers
"is the difference the method or its tuning?": compare methods at matched knobs, or one method's
options (projection mode, span, energy) with everything else held.

    .venv/bin/python bench/knob_sweep.py --setting partial --methods iamu orthograd \\
        --variant "a5:unlearn.alpha=0.5,unlearn.lr=0.005,unlearn.steps=200"
    .venv/bin/python bench/knob_sweep.py --methods iamu \\
        --variant "own:unlearn.alpha=0.5,unlearn.lr=0.005" \\
        --variant "off:unlearn.alpha=0.5,unlearn.lr=0.005,unlearn.options.mode=off_others"

Every run uses the paper table's fixed settings (`fixed` in configs/tune_space.yaml: the stop rule at
the original's val level) unless a variant overrides them. Results are appended to
`<out>/results.jsonl` (one line per run); `--summary` only prints the table of what is there.
Nothing is tracked in MLflow and the paper table's folder is only read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import paper_table  # noqa: E402

from mtu_dist.errors import UserError  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`NAME:field=value,field=value` -> (NAME, ["field=value", ...])."""
    name, sep, sets = text.partition(":")
    if not sep or not name:
        raise UserError(f"--variant {text!r}: expected NAME:field=value[,field=value...]")
    return name, [s for s in sets.split(",") if s]


def run_one(
    table: Path, size: str, dataset: str, setting: str, seed: int, method: str, variant: str, sets: list[str], out: Path
) -> dict:
    from mtu_dist.config import load_config
    from mtu_dist.evaluation.scoring import original_reference
    from mtu_dist.runner.commands import unlearn_command
    from mtu_dist.studies.tune import load_space
    from mtu_dist.utils.fileio import sha256_file

    base = json.loads(json.dumps(paper_table.SIZES[size]["config"]))  # the size the table's models were made at
    base.update(
        {
            "data": {"dataset": dataset, "root": str(table / "data"), "workers": 0},
            "out": str(out),
            "tracking": {"enabled": False},
        }
    )
    base["unlearn"]["checkpoint_every"] = 0
    fixed = [f"{k}={v}" for k, v in load_space().fixed.items()]
    cfg = load_config(overrides=[*fixed, *sets, f"unlearn.method={method}", f"seed={seed}"], base=base)
    request = table / "requests" / f"{dataset}-{setting}-s{seed}.yaml"
    retrain = table / "runs" / dataset / f"retrain-{setting}-s{seed}"
    for need in (request, retrain / "final", table / "runs" / dataset / "original" / "final"):
        if not need.exists():
            raise UserError(f"{need}: not found; run bench/paper_table.py (with this seed) first")
    rep = unlearn_command(
        cfg,
        request=str(request),
        origin=str(table / "runs" / dataset / "original"),
        name=f"{method}-{variant}-{setting}-s{seed}",
        overwrite=True,
        tracking_uri=None,
        retrain=str(retrain),
    )
    u = rep["unlearning"]
    original = original_reference(
        str(table / "runs" / dataset / "original"), sha256_file(request), cfg.eval.retain_sample
    )
    mia = (
        None
        if u.get("mia_auc") is None or u.get("mia_auc_retrain") is None
        else abs(u["mia_auc"] - u["mia_auc_retrain"])
    )
    return {
        "uis": u["uis"]["mean"],
        "uis_task": u["uis"]["per_task"],
        "mia_gap": mia,
        "gap_retrain": u["gap_retrain"],
        "kept_move": kept_move(original.report["splits"], rep["splits"], u["target_tasks"]),
        "time_s": rep["time_s"],
        "stop_reason": rep["stop_reason"],
    }


def kept_move(original: dict, unlearned: dict, targets: list[str]) -> float | None:
    """Partial setting: the largest |U - O| / O of a kept task's primary metric on the forgotten
    instances (forget_kept) and on val -- the issue's "kept tasks within 1% of the original"."""
    from mtu_dist.tasks import TASKS

    moves = [
        abs(unlearned[sp][t][TASKS[t].primary] - o[t][TASKS[t].primary]) / abs(o[t][TASKS[t].primary])
        for sp in ("forget_kept", "val")
        if sp in unlearned and (o := original.get(sp))
        for t in unlearned[sp]
        if t not in targets and t in o and o[t][TASKS[t].primary]
    ]
    return max(moves) if moves else None


def _ms(values, digits: int = 4) -> str:
    """mean +- std of the values that exist (a metric can be undefined, e.g. UIS when the original scores 0)."""
    values = [v for v in values if v is not None]
    return f"{statistics.mean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}" if values else "—"


def summary(rows: list[dict]) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["setting"], r["method"], r["variant"])].append(r)
    tasks = sorted({t for r in rows for t in r["uis_task"]}, key=["seg", "depth", "normal"].index)
    lines = [
        "| benchmark | setting | method | variant | seeds | UIS | "
        + " | ".join(f"UIS {t}" for t in tasks)
        + " | \\|MIA − retrain\\| | gap pp | kept move % | stopped by rule | time s |",
        "|---|---|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|",
    ]
    for (ds, st, m, v), rs in sorted(groups.items()):
        per_task = [_ms([r["uis_task"][t] for r in rs if t in r["uis_task"]]) for t in tasks]
        stopped = sum(not r["stop_reason"].startswith("budget") for r in rs)
        lines.append(
            f"| {ds} | {st} | {m} | {v} | {len(rs)} | {_ms([r['uis'] for r in rs])} | "
            + " | ".join(per_task)
            + f" | {_ms([r['mia_gap'] for r in rs], 3)} | {_ms([r['gap_retrain'] for r in rs], 2)}"
            + f" | {_ms([100 * r['kept_move'] if r.get('kept_move') is not None else None for r in rs], 2)}"
            + f" | {stopped}/{len(rs)} | {statistics.mean(r['time_s'] for r in rs):.0f} |"
        )
    return "\n".join(lines)


def paired_table(rows: list[dict], against: str) -> str:
    """Per row group: its UIS minus the `against` group's (METHOD:VARIANT, same benchmark and setting) on the
    seeds both ran, the mean with its 95% interval (evaluation/statistics.py: paired, as `mtu report`)."""
    from mtu_dist.evaluation.statistics import paired

    method, _, variant = against.partition(":")
    groups: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        groups[(r["dataset"], r["setting"], r["method"], r["variant"])][r["seed"]] = r["uis"]
    lines = [f"| benchmark | setting | row | seeds | UIS minus {against}'s [95% interval] |", "|---|---|---|---|---|"]
    for (ds, st, m, v), per in sorted(groups.items()):
        ref = groups.get((ds, st, method, variant))
        if ref is None or (m, v) == (method, variant):
            continue
        iv = paired(per, ref)
        diff = "—" if iv is None else f"{iv.mean:+.4f} [{iv.lo:+.4f}, {iv.hi:+.4f}]"
        lines.append(f"| {ds} | {st} | {m}:{v} | {len(set(per) & set(ref))} | {diff} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--table", default=str(ROOT / "bench" / "results" / "paper_table"), help="the paper table's folder")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "knob_sweep"), help="runs and results.jsonl")
    ap.add_argument("--dataset", default="synth-indoor", choices=paper_table.DATASETS)
    ap.add_argument("--setting", default="full", choices=list(paper_table.SETTINGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["iamu"])
    ap.add_argument("--variant", action="append", default=[], help="NAME:field=value,... (repeatable)")
    ap.add_argument("--quick", action="store_true", help="the table was made with paper_table.py --quick")
    ap.add_argument("--summary", action="store_true", help="only print the table of results.jsonl")
    ap.add_argument(
        "--against",
        metavar="METHOD:VARIANT",
        help="also print every other row's paired UIS difference to this row (same seeds), with its interval",
    )
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out, results = Path(a.out), Path(a.out) / "results.jsonl"
    try:
        from mtu_dist.methods import METHODS

        unknown = [m for m in a.methods if m not in METHODS]
        if unknown:
            raise UserError(f"--methods: unknown {unknown}; registered: {sorted(METHODS)}")
        variants = [parse_variant(v) for v in a.variant]
        if not a.summary and not variants:
            raise UserError("give at least one --variant NAME:field=value,... (or --summary)")
        out.mkdir(parents=True, exist_ok=True)
        for name, sets in [] if a.summary else variants:
            for method in a.methods:
                for seed in a.seeds:
                    row = {
                        "dataset": a.dataset,
                        "setting": a.setting,
                        "method": method,
                        "variant": name,
                        "sets": sets,
                        "seed": seed,
                        **run_one(
                            Path(a.table),
                            "quick" if a.quick else "default",
                            a.dataset,
                            a.setting,
                            seed,
                            method,
                            name,
                            sets,
                            out,
                        ),
                    }
                    with open(results, "a") as fh:  # append-only log: a killed sweep keeps what it measured
                        fh.write(json.dumps(row) + "\n")
                    print(
                        f"{method} {name} s{seed}: UIS {_ms([row['uis']])}, "
                        f"|MIA - retrain| {_ms([row['mia_gap']], 3)}, "
                        f"{row['time_s']:.0f} s ({row['stop_reason'][:40]})",
                        flush=True,
                    )
        rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
        print(summary(rows) if rows else f"{results}: no results yet")
        if rows and a.against:
            print()
            print(paired_table(rows, a.against))
    except UserError as e:
        print(f"knob_sweep: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`mtu report`: the paper-style table of a benchmark (bench/paper_table.py), read from MLflow.

The benchmark is found by its parent run (`--parent ID`), its folder (`--bench DIR`, whose
paper_table.json records the parent and the tracking URI) or its experiment (`--experiment NAME`: the
latest benchmark there). Rows are the parent's finished child runs tagged `mtu.paper.role` =
`original`, `retrain` or `method` (the latest run of each benchmark x setting x seed x method);
tuning trials and the original's training run are not rows.

Per benchmark x setting, one Markdown table, methods x columns, each cell mean +- std over seeds
(sample std; a lone seed shows the mean only):

* the primary metric of every task on `forget` (target pairs), `forget_kept` (partial: the kept
  tasks of the forgotten instances), `retain` and `val` (`eval/<split>/<task>/<primary>`);
* MIA AUC (and, partial, on the target tasks alone), UIS (mean over tasks; lower is better), gap to
  retrain (percentage points), cost (unlearning wall time, setup included; the retrain: its training
  time; the original: 0) and its ratio to the retrain's;
* below it, UIS per task (the breakdown of the UIS column).

Then the goal lines: `OURS`' mean UIS against the strongest baseline (the lowest mean UIS among the
methods that are neither references nor `OURS` and its ablations), per benchmark and averaged over
benchmarks; `OURS`' MIA AUC against the retrain's; in the partial setting, the largest relative move
of a kept task's primary metric, on the forgotten instances and on val, against the original.
Plots (`plots.py`): `uis.png` (UIS per method, bars with std) and `tradeoff.png` (forget drop vs
retain drop, relative to the original, per method). Everything is written atomically to `--out`
(default `<bench>/report`, or `reports/<parent name>-<id>`) and logged to the parent run under `report/`.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .fileio import atomic_write_bytes, ensure_writable_dir
from .tasks import TASKS
from .tracking import check_reachable, resolve_uri

OURS = "iamu"
ABLATIONS = ("iamu_no_proj", "iamu_no_orth")
REFERENCES = ("original", "retrain")
SPLITS = ("forget", "forget_kept", "retain", "val")
GOALS = {"full": 0.30, "partial": 0.50}   # OURS' UIS at least this fraction below the strongest baseline
MIA_GOAL = 0.03                           # |MIA AUC - retrain's|
KEPT_GOAL = 0.01                          # kept tasks: relative move of the primary metric vs the original


@dataclass
class Row:
    benchmark: str
    setting: str
    seed: int
    method: str
    metrics: dict = field(default_factory=dict)


def find_parent(client, *, parent: str | None, experiment: str | None, uri: str):
    from mlflow.exceptions import MlflowException
    if parent:
        try:
            return client.get_run(parent)
        except MlflowException:
            raise UserError(f"--parent {parent}: no such run in {uri}") from None
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"--experiment {experiment!r}: no such experiment in {uri}")
    runs = client.search_runs([exp.experiment_id], "tags.`mtu.command` = 'paper_table'",
                              order_by=["attributes.start_time DESC"], max_results=100)
    runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not runs:
        raise UserError(f"--experiment {experiment!r}: it holds no benchmark parent run (bench/paper_table.py)")
    return runs[0]


def collect(client, parent) -> list[Row]:
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=50000)
    latest = {}
    for r in runs:
        t = r.data.tags
        if r.info.status == "FINISHED" and t.get("mtu.paper.role") in ("original", "retrain", "method"):
            key = (t["mtu.paper.benchmark"], t["mtu.paper.setting"], int(t["mtu.paper.seed"]), t["mtu.paper.method"])
            latest[key] = Row(*key, metrics=dict(r.data.metrics))
    return list(latest.values())


# --------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------

def stats(values) -> tuple[float, float, int] | None:
    """(mean, sample std, n) of the finite values, or None."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def _primary_key(split: str, task: str) -> str:
    return f"eval/{split}/{task}/{TASKS[task].primary}"


def columns(rows: list[Row]) -> list[tuple[str, str]]:
    """(header, metric key) of every column the rows have."""
    cols = []
    for sp in SPLITS:
        for t in TASKS:
            if any(_primary_key(sp, t) in r.metrics for r in rows):
                cols.append((f"{sp} {t}", _primary_key(sp, t)))
    cols += [("MIA AUC", "mia_auc")]
    if any("mia_auc_target" in r.metrics for r in rows):
        cols += [("MIA AUC target", "mia_auc_target")]
    cols += [("UIS", "uis"), ("gap pp", "gap_retrain"), ("cost s", "paper/cost_s"), ("cost ratio", "cost_ratio")]
    return cols


def method_order(names) -> list[str]:
    from .methods import METHODS
    known = [*REFERENCES, *(m for m in METHODS if m != OURS and m not in ABLATIONS), OURS, *ABLATIONS]
    return [m for m in known if m in names] + sorted(set(names) - set(known))


def baselines(names) -> list[str]:
    return [m for m in names if m not in REFERENCES and m != OURS and m not in ABLATIONS]


def _fmt(s: tuple | None, key: str) -> str:
    if s is None:
        return ""
    mean, std, n = s
    spec = ".4f" if key in ("uis",) else (".1f" if abs(mean) >= 10 else ".3f")
    return format(mean, spec) + (f" ± {format(std, spec)}" if n > 1 else "")


def group(rows: list[Row]) -> dict[tuple[str, str], dict[str, list[Row]]]:
    """(benchmark, setting) -> method -> rows (one per seed)."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[(r.benchmark, r.setting)][r.method].append(r)
    return {k: dict(v) for k, v in sorted(out.items())}


def table(by_method: dict[str, list[Row]]) -> str:
    every = [r for rs in by_method.values() for r in rs]
    cols = columns(every)
    lines = ["| method | " + " | ".join(h for h, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for m in method_order(by_method):
        cells = [_fmt(stats(r.metrics.get(k) for r in by_method[m]), k) for _, k in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def uis_table(by_method: dict[str, list[Row]]) -> str:
    """Methods x tasks: UIS per task (mean +- std over seeds), the breakdown behind the UIS column."""
    tasks = [t for t in TASKS if any(f"uis/{t}" in r.metrics for rs in by_method.values() for r in rs)]
    lines = ["| method | " + " | ".join(f"UIS {t}" for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in method_order(by_method):
        lines.append(f"| {m} | " + " | ".join(_fmt(stats(r.metrics.get(f"uis/{t}") for r in by_method[m]), "uis")
                                             for t in tasks) + " |")
    return "\n".join(lines)


def mean_uis(by_method: dict[str, list[Row]]) -> dict[str, float]:
    return {m: s[0] for m, rs in by_method.items() if (s := stats(r.metrics.get("uis") for r in rs))}


def _relative_moves(by_method, method: str, split: str, tasks) -> list[float]:
    """Per task: mean over seeds of |U - O| / O on `split`, O the original on the same seed's request."""
    orig = {r.seed: r for r in by_method.get("original", [])}
    out = []
    for t in tasks:
        key, moves = _primary_key(split, t), []
        for r in by_method.get(method, []):
            o, u = orig.get(r.seed) and orig[r.seed].metrics.get(key), r.metrics.get(key)
            if o and u is not None:
                moves.append(abs(u - o) / abs(o))
        if moves:
            out.append(float(np.mean(moves)))
    return out


def _drop(by_method, method: str, split: str) -> float | None:
    """Mean over seeds and the split's tasks of the relative drop (O - U) / O of the primary metric, in %."""
    orig = {r.seed: r for r in by_method.get("original", [])}
    drops = []
    for r in by_method.get(method, []):
        for t in TASKS:
            key = _primary_key(split, t)
            o = orig.get(r.seed) and orig[r.seed].metrics.get(key)
            if o and key in r.metrics:
                drops.append(100.0 * (o - r.metrics[key]) / abs(o))
    return float(np.mean(drops)) if drops else None


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def uis_line(label: str, uis: dict[str, float], setting: str) -> str:
    base = {m: v for m, v in uis.items() if m in baselines(uis)}
    if OURS not in uis or not base:
        return f"- {label}: UIS goal not computable ({OURS} or baselines missing)"
    best = min(base, key=base.get)
    below = (base[best] - uis[OURS]) / base[best] if base[best] > 0 else float("nan")
    floor = f"; the retrain's own UIS: {uis['retrain']:.4f}" if "retrain" in uis else ""
    return (f"- {label}: {OURS} mean UIS {uis[OURS]:.4f} vs strongest baseline {best} {base[best]:.4f}: "
            f"{100 * below:.0f}% below (goal >= {100 * GOALS[setting]:.0f}%{floor}): {_verdict(below >= GOALS[setting])}")


def goal_lines(groups: dict) -> str:
    out = ["## Goals", ""]
    for setting in GOALS:
        keys = [k for k in groups if k[1] == setting]
        if not keys:
            continue
        per_bench = {k[0]: mean_uis(groups[k]) for k in keys}
        for bench, uis in per_bench.items():
            out.append(uis_line(f"{setting}, {bench}", uis, setting))
        common = set.intersection(*(set(u) for u in per_bench.values()))
        if len(per_bench) > 1:
            avg = {m: float(np.mean([u[m] for u in per_bench.values()])) for m in common}
            out.append(uis_line(f"{setting}, mean over benchmarks", avg, setting))
        for k in keys:
            ours, ref = (stats(r.metrics.get("mia_auc") for r in groups[k].get(m, [])) for m in (OURS, "retrain"))
            if ours and ref:
                gap = abs(ours[0] - ref[0])
                out.append(f"- {setting}, {k[0]}: {OURS} MIA AUC {ours[0]:.3f} vs retrain {ref[0]:.3f}: gap {gap:.3f} "
                           f"(goal <= {MIA_GOAL}): {_verdict(gap <= MIA_GOAL)}")
            if setting == "partial":
                kept = [t for t in TASKS if any(_primary_key("forget_kept", t) in r.metrics
                                                for rs in groups[k].values() for r in rs)]
                moves = (_relative_moves(groups[k], OURS, "forget_kept", kept)
                         + _relative_moves(groups[k], OURS, "val", kept))
                ref = (_relative_moves(groups[k], "retrain", "forget_kept", kept)
                       + _relative_moves(groups[k], "retrain", "val", kept))
                if moves:
                    worst = max(moves)
                    floor = f"; the retrain's: {100 * max(ref):.2f}%" if ref else ""
                    out.append(f"- {setting}, {k[0]}: {OURS} kept tasks ({', '.join(kept)}) move at most "
                               f"{100 * worst:.2f}% vs the original (forget_kept and val; goal <= {100 * KEPT_GOAL:.0f}%"
                               f"{floor}): {_verdict(worst <= KEPT_GOAL)}")
                else:
                    out.append(f"- {setting}, {k[0]}: {OURS} kept tasks ({', '.join(kept) or 'none'}): not computable "
                               "(no run of it, or the original's metric is 0)")
    return "\n".join(out)


def render(rows: list[Row], title: str) -> str:
    groups = group(rows)
    parts = [f"# {title}", ""]
    for (bench, setting), by_method in groups.items():
        seeds = sorted({r.seed for rs in by_method.values() for r in rs})
        parts += [f"## {bench}, {setting}-task (seeds {', '.join(map(str, seeds))}; mean ± std)", "",
                  table(by_method), "", "UIS per task:", "", uis_table(by_method), ""]
    parts.append(goal_lines(groups))
    parts += ["", "Primary metrics: seg mIoU, depth delta<1.25, normal % within 30 deg (higher is better). "
              "UIS: lower is better. MIA AUC: the closer to the retrain's, the better. "
              "gap pp: mean |difference| to the retrain over the primary metrics of every split."]
    return "\n".join(parts) + "\n"


def plot_data(rows: list[Row]) -> tuple[dict, dict]:
    """UIS (mean, std) per method and (forget drop, retain drop) in % per method, per (benchmark, setting)."""
    uis, trade = {}, {}
    for key, by_method in group(rows).items():
        label = f"{key[0]}, {key[1]}"
        order = [m for m in method_order(by_method) if m != "original"]
        uis[label] = [(m, s[0], s[1]) for m in order if (s := stats(r.metrics.get("uis") for r in by_method[m]))]
        trade[label] = [(m, f, r) for m in order
                        if (f := _drop(by_method, m, "forget")) is not None and (r := _drop(by_method, m, "retain")) is not None]
    return uis, trade


def report_command(*, parent: str | None, experiment: str | None, bench: str | None, tracking_uri: str | None,
                   out: str | None) -> Path:
    if bench:
        record = Path(bench) / "paper_table.json"
        if not record.is_file():
            raise UserError(f"--bench {bench}: no paper_table.json there (is it a folder made by bench/paper_table.py?)")
        rec = json.loads(record.read_text())
        parent, tracking_uri = rec["parent_run_id"], tracking_uri or rec["tracking_uri"]
    uri = resolve_uri(tracking_uri)
    check_reachable(uri)
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    run = find_parent(client, parent=parent, experiment=experiment, uri=uri)
    rows = collect(client, run)
    if not rows:
        raise UserError(f"parent run {run.info.run_id} ({run.info.run_name}): no finished benchmark rows under it")
    folder = Path(out) if out else (Path(bench) / "report" if bench else
                                    Path("reports") / f"{run.info.run_name}-{run.info.run_id[:8]}")
    ensure_writable_dir(folder)
    from .plots import tradeoff, uis_bars
    text = render(rows, f"Benchmark {run.info.run_name} (parent run {run.info.run_id})")
    print(text)
    uis, trade = plot_data(rows)
    files = {"table.md": text.encode(), "uis.png": uis_bars(uis, OURS), "tradeoff.png": tradeoff(trade, OURS)}
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
        client.log_artifact(run.info.run_id, str(folder / name), "report")
    print(f"wrote {', '.join(files)} to {folder} and logged them to run {run.info.run_id[:8]} (artifacts/report)")
    return folder

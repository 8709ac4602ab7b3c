"""`mtu report`: the paper-style table of a benchmark (bench/paper_table.py), read from MLflow.

The benchmark is found by its parent run (`--parent ID`), its folder (`--bench DIR`, whose
paper_table.json records the parent and the tracking URI) or its experiment (`--experiment NAME`: the
latest benchmark there). Rows are the parent's finished child runs tagged `mtu.paper.role` =
`original`, `retrain` or `method` (the latest run of each benchmark x setting x seed x method);
tuning trials and the original's training run are not rows.

Per benchmark x setting, one Markdown table, methods x columns, each cell the mean over seeds and
its 95% interval `[lo, hi]` (statistics.interval: a bootstrap over the seeds, i.e. over requests of
>= 100 instances, widened to Student-t's small-sample width; a lone seed shows the mean only). Every
column names its metric, unit and direction, the best mean of each column is bold, and the original,
the retrain and the rows below the floor are marked and never ranked (tables.py):

* the primary metric of every task on `forget` (target pairs), `forget_kept` (partial: the kept
  tasks of the forgotten instances), `retain` and `val` (`eval/<split>/<task>/<primary>`);
* MIA AUC (and, partial, on the target tasks alone), UIS (mean over tasks; lower is better), gap to
  retrain (percentage points), cost (unlearning wall time, setup included; the retrain: its training
  time; the original: 0) and its ratio to the retrain's;
* UIS excess: UIS minus the retrain's UIS on the same request (the floor); a row whose mean excess is
  below 0 is flagged `below floor` and never counts as the strongest baseline, nor does a row that
  lacks a seed `OURS` has (a stopped run's leftover: its mean is over other requests);
* below it, UIS per task (the breakdown of the UIS column);
* `OURS` minus each row, paired over the same requests: UIS and MIA AUC (the ablation table, and
  the comparison with every baseline);
* interference at equal forgetting, from each run's trajectory (trajectory.py): task-level and
  instance-level interference when the forget pairs first reach the retrain's forget level
  (interpolated), with the number of runs that reached it and the largest forget progress;
* the memorisation figures of the original (forget vs val per task, MIA AUC of original and retrain).

Then the goal lines: `OURS`' mean UIS against the strongest baseline (the lowest mean UIS among the
methods that are neither references nor `OURS` and its ablations, nor below the floor), per benchmark
and averaged over benchmarks, with the paired difference (same requests and seeds) and its interval
(met: the margin reached and, where there is an interval, the interval below 0);
`OURS`' MIA AUC against the retrain's; in the partial setting, the largest relative move
of a kept task's primary metric, on the forgotten instances and on val, against the original.
Plots (`plots.py`): `uis.png` (UIS per method, bars with the 95% interval) and `tradeoff.png` (per
benchmark x setting: forget progress toward the retrain's level on x, task-level and instance-level
interference on y, one curve per method and seed). Everything is written atomically to `--out`
(default `<bench>/report`, or `reports/<parent name>-<id>`) and logged to the parent run under `report/`.

`parent_command` is that command body, shared with `mtu compare` (compare.py): find the parent run,
turn its children into text and figures, write and log them. Both accept a demo's parent run (`mtu
demo`) as well: its tables (the JSON rows it logged under `demo/`) and its UIS and interference figures.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtu_dist.errors import UserError
from mtu_dist.evaluation.statistics import Interval, interval, paired
from mtu_dist.reporting.tables import (
    BEFORE,
    DIRECTIONS,
    REFERENCE,
    Column,
    Table,
    markdown,
    metrics_legend,
    primary_column,
)
from mtu_dist.reporting.tables import Row as TableRow
from mtu_dist.reporting.tracking import check_reachable, mlflow_client, resolve_uri
from mtu_dist.tasks import TASKS
from mtu_dist.utils.fileio import atomic_write_bytes, ensure_writable_dir

OURS = "iamu"
ABLATIONS = ("iamu_no_proj", "iamu_no_orth", "iamu_no_norm", "iamu_no_momentum")
REFERENCES = ("original", "retrain")
SPLITS = ("forget", "forget_kept", "retain", "val")
GOALS = {"full": 0.30, "partial": 0.50}  # OURS' UIS at least this fraction below the strongest baseline
MIA_GOAL = 0.03  # |MIA AUC - retrain's|
KEPT_GOAL = 0.01  # kept tasks: relative move of the primary metric vs the original


MEMO_GOALS = {"excess": 0.25, "mia_original": 0.90, "mia_retrain": 0.60}  # the benchmark's memorisation targets
CURVE_KEYS = ("traj/progress", "traj/task_interference", "traj/instance_interference")


@dataclass
class Row:
    benchmark: str
    setting: str
    seed: int
    method: str
    metrics: dict = field(default_factory=dict)
    curve: list = field(default_factory=list)  # [(step, progress, task interference, instance interference)]


@dataclass(frozen=True)
class ParentKind:
    """A kind of parent run the report commands read, and how its children become tables and figures."""

    what: str  # "benchmark", "sweep"
    command: str  # the `mtu.command` tag of its parent runs
    made_by: str
    folder_flag: str  # the option naming its folder, which records the parent run and the store
    record: str  # that folder's record file
    build: Callable  # (client, parent run, folder or None) -> (Markdown text, {file name: bytes})
    demo_note: str = ""  # said under a demo's tables (a demo parent is accepted by both commands)


def find_parent(client, *, parent: str | None, experiment: str | None, uri: str, kind: ParentKind | None = None):
    """The run `--parent` names, or the latest top-level parent run of `kind` in `--experiment`."""
    from mlflow.exceptions import MlflowException

    kind = kind or BENCHMARK
    if parent:
        try:
            return client.get_run(parent)
        except MlflowException:
            raise UserError(f"--parent {parent}: no such run in {uri}") from None
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"--experiment {experiment!r}: no such experiment in {uri}")
    runs = client.search_runs(
        [exp.experiment_id],
        f"tags.`mtu.command` = '{kind.command}'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not runs:
        raise UserError(f"--experiment {experiment!r}: it holds no {kind.what} parent run ({kind.made_by})")
    return runs[0]


def collect(client, parent) -> list[Row]:
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=50000,
    )
    latest, curves = {}, {}
    for r in runs:
        t = r.data.tags
        role = t.get("mtu.paper.role")
        if r.info.status == "FINISHED" and role in ("original", "retrain", "method", "curve"):
            key = (t["mtu.paper.benchmark"], t["mtu.paper.setting"], int(t["mtu.paper.seed"]), t["mtu.paper.method"])
            (curves if role == "curve" else latest)[key] = r
    rows = {key: Row(*key, metrics=dict(r.data.metrics)) for key, r in latest.items()}
    for key, r in curves.items():  # a method's equal-forgetting run adds its eqf/ figures and curve to its row
        if key in rows:
            rows[key].metrics.update({k: v for k, v in r.data.metrics.items() if k.startswith("eqf/")})
            rows[key].curve = _curve(client, r.info.run_id)
    return list(rows.values())


def _curve(client, run_id: str) -> list[tuple]:
    """The run's equal-forgetting curve (logged per trajectory step), in step order."""
    by_step: dict = defaultdict(dict)
    for key in CURVE_KEYS:
        for m in client.get_metric_history(run_id, key):
            by_step[m.step][key] = m.value
    return [(step, *(v.get(k) for k in CURVE_KEYS)) for step, v in sorted(by_step.items())]


# --------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------


def stats(values) -> Interval | None:
    """Mean and 95% interval over the finite values (statistics.interval), or None."""
    return interval(list(values))


def _primary_key(split: str, task: str) -> str:
    return f"eval/{split}/{task}/{TASKS[task].primary}"


SCORES = {
    "mia_auc": Column("", "MIA AUC", "", "ref"),
    "mia_auc_target": Column("", "MIA AUC target", "", "ref"),
    "uis": Column("", "UIS", "", "min"),
    "uis_excess": Column("", "UIS excess", "", "min"),
    "gap_retrain": Column("", "gap to retrain", "pp", "min"),
    "paper/cost_s": Column("", "cost", "s", "min"),
    "cost_ratio": Column("", "cost ratio", "x retrain", "min"),
}


def columns(rows: list[Row]) -> list[tuple[Column, str]]:
    """(column, metric key) of every column the rows have."""
    cols = [
        (primary_column(sp, t), _primary_key(sp, t))
        for sp in SPLITS
        for t in TASKS
        if any(_primary_key(sp, t) in r.metrics for r in rows)
    ]
    keys = [
        "mia_auc",
        *(["mia_auc_target"] if any("mia_auc_target" in r.metrics for r in rows) else []),
        "uis",
        "uis_excess",
        "gap_retrain",
        "paper/cost_s",
        "cost_ratio",
    ]
    return cols + [(SCORES[k], k) for k in keys]


def is_ablation(name: str) -> bool:
    """A variant of ours (`iamu_...`): registered as an ablation, or one a store holds from another version
    (never ranked as a baseline)."""
    return name in ABLATIONS or name.startswith(OURS + "_")


def method_order(names) -> list[str]:
    from mtu_dist.methods import METHODS

    known = [*REFERENCES, *(m for m in METHODS if m != OURS and not is_ablation(m)), OURS, *ABLATIONS]
    unknown = sorted(set(names) - set(known))
    baseline_like = [m for m in unknown if not is_ablation(m)]
    return [m for m in known if m in names] + baseline_like + [m for m in unknown if is_ablation(m)]


def baselines(names) -> list[str]:
    return [m for m in names if m not in REFERENCES and m != OURS and not is_ablation(m)]


def _fmt(s: Interval | None, key: str) -> str:
    if s is None:
        return ""
    spec = ".4f" if key.startswith("uis") else (".1f" if abs(s.mean) >= 10 else ".3f")
    return format(s.mean, spec) + (f" [{format(s.lo, spec)}, {format(s.hi, spec)}]" if s.n > 1 else "")


def below_floor(by_method: dict[str, list[Row]]) -> set[str]:
    """Methods whose mean UIS is below the retrain's on the same requests: not better, only off the scale."""
    return {
        m
        for m, rs in by_method.items()
        if m not in REFERENCES and (s := stats(r.metrics.get("uis_excess") for r in rs)) is not None and s.mean < 0
    }


def incomplete(by_method: dict[str, list[Row]]) -> dict[str, str]:
    """Baselines without a UIS on every seed OURS has, as `method -> "k of n seeds"`: their mean is over
    other requests, so they are listed but never the strongest baseline (nor paired on a subset)."""
    seeds = set(per_seed(by_method, OURS))
    return {
        m: f"{len(have & seeds)} of {len(seeds)} seeds"
        for m in baselines(by_method)
        if not seeds <= (have := set(per_seed(by_method, m)))
    }


def group(rows: list[Row]) -> dict[tuple[str, str], dict[str, list[Row]]]:
    """(benchmark, setting) -> method -> rows (one per seed)."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[(r.benchmark, r.setting)][r.method].append(r)
    return {k: dict(v) for k, v in sorted(out.items())}


def _role(method: str, low: set) -> str | None:
    """Rows that are not contenders for a column's best: the references, and runs off the UIS scale."""
    return {"original": BEFORE, "retrain": REFERENCE}.get(method) or ("below floor" if method in low else None)


def _table(by_method: dict[str, list[Row]], cols: list[tuple[Column, str]], methods, fmt=None) -> Table:
    low = below_floor(by_method)
    rows = []
    for m in methods:
        cells = [stats(r.metrics.get(k) for r in by_method[m]) for _, k in cols]
        rows.append(
            TableRow(
                [m],
                [c and c.mean for c in cells],
                [(fmt or _fmt)(c, k) for c, (_, k) in zip(cells, cols)],
                role=_role(m, low),
            )
        )
    return Table(["method"], [c for c, _ in cols], rows)


def table(by_method: dict[str, list[Row]]) -> str:
    every = [r for rs in by_method.values() for r in rs]
    return markdown(_table(by_method, columns(every), method_order(by_method)))


def equal_forgetting_table(by_method: dict[str, list[Row]]) -> str:
    """Per method: interference when the forget pairs first reach the retrain's forget level."""
    cols = [
        (Column("", "reached"), "eqf/reached"),
        (Column("", "task-level interference", "", "min"), "eqf/task_interference"),
        (Column("", "instance-level interference", "", "min"), "eqf/instance_interference"),
        (Column("", "largest forget progress", "1 = the retrain's level"), "eqf/max_progress"),
    ]
    rows = []
    for m in method_order(by_method):
        rs = [r for r in by_method[m] if "eqf/reached" in r.metrics]
        if not rs or m in REFERENCES:
            continue
        reached = [r for r in rs if r.metrics["eqf/reached"] > 0]
        at = [stats(r.metrics.get(k) for r in reached) for _, k in cols[1:3]]
        top = stats(r.metrics.get("eqf/max_progress") for r in rs)
        rows.append(
            TableRow(
                [m],
                [None, *(s and s.mean for s in at), top and top.mean],
                [f"{len(reached)}/{len(rs)}", *(_fmt(s, k) or "-" for s, (_, k) in zip(at, cols[1:3])), _fmt(top, "p")],
                role="below floor" if m in below_floor(by_method) else None,
            )
        )
    return markdown(Table(["method"], [c for c, _ in cols], rows)) if rows else ""


def paired_table(by_method: dict[str, list[Row]]) -> str:
    """OURS minus every other method, paired over the requests (seeds) both ran: UIS, MIA AUC and (partial)
    the MIA AUC on the target tasks, mean [95% interval]. Below 0 on UIS: OURS impacts less; the rows
    of OURS' ablations are the ablation table (a row below 0 is a component that pays)."""
    if OURS not in by_method:
        return ""
    keys = [k for k in ("uis", "mia_auc", "mia_auc_target") if per_seed(by_method, OURS, k)]
    lines = [
        "| row | seeds | " + " | ".join(f"{OURS} - row: {k.replace('_', ' ')}" for k in keys) + " |",
        "|---" * (len(keys) + 2) + "|",
    ]
    order = method_order(by_method)
    for m in [a for a in order if is_ablation(a)] + [m for m in order if not is_ablation(m)]:
        if m in (OURS, "original"):
            continue
        cells = [paired(per_seed(by_method, OURS, k), per_seed(by_method, m, k)) for k in keys]
        if cells[0] is None:
            continue
        spec = lambda k: ".4f" if k == "uis" else ".3f"  # noqa: E731
        text = [
            ""
            if d is None
            else f"{d.mean:+{spec(k)}}" + (f" [{d.lo:+{spec(k)}}, {d.hi:+{spec(k)}}]" if d.n > 1 else "")
            for k, d in zip(keys, cells)
        ]
        lines.append(f"| {m} | {cells[0].n} | " + " | ".join(text) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def strongest_baseline(by_method: dict[str, list[Row]]) -> str | None:
    """The baseline the UIS goal is measured against: the lowest mean UIS among the baselines with every
    seed OURS has and not below the retrain's floor (the goal line's rule); None when none qualifies."""
    return _ranked_best(mean_uis(by_method), below_floor(by_method) | set(incomplete(by_method)))


def _ranked_best(uis: dict[str, float], skip) -> str | None:
    """The lowest mean UIS among the baselines in `uis` not in `skip` (below the floor, incomplete)."""
    base = {m: v for m, v in uis.items() if m in baselines(uis) and m not in skip}
    return min(base, key=base.get) if base else None


def ablation_goal_table(by_method: dict[str, list[Row]], setting: str) -> str:
    """Each ablation row held to OURS' own UIS goal: its margin below the strongest baseline and the paired
    differences (row minus that baseline, row minus the retrain) over the requests both ran. What a
    component costs or pays is then read against the goal, not only against OURS."""
    best = strongest_baseline(by_method)
    rows = [m for m in method_order(by_method) if is_ablation(m) and per_seed(by_method, m)]
    if best is None or not rows:
        return ""
    uis = mean_uis(by_method)
    base = uis[best]

    def pair(m, ref):
        d = paired(per_seed(by_method, m), per_seed(by_method, ref))
        if d is None:
            return ""
        return f"{d.mean:+.4f}" + (f" [{d.lo:+.4f}, {d.hi:+.4f}]" if d.n > 1 else " (one seed)")

    lines = [
        f"| row | seeds | mean UIS | below {best} (goal {100 * GOALS[setting]:.0f}%) | row - {best} | row - retrain |",
        "|---|---|---|---|---|---|",
    ]
    for m in [OURS, *rows] if OURS in by_method else rows:
        u = uis.get(m)
        if u is None:
            continue
        below = f"{100 * (base - u) / base:.0f}%" if base > 0 else ""
        n = len(per_seed(by_method, m))
        lines.append(f"| {m} | {n} | {u:.4f} | {below} | {pair(m, best)} | {pair(m, 'retrain')} |")
    return "\n".join(lines)


def memorisation(by_method: dict[str, list[Row]]) -> dict:
    """The original's memorisation on the requests, from the original's and the retrain's rows: per task
    the forget-pair primary metric (target pairs, and kept pairs in the partial setting), the val one and
    their relative excess forget / val - 1; the MIA AUC of the original and of the retrain on the target
    tasks (`mia_auc_target`, where a row has it). Each an interval over seeds."""
    orig, ret = by_method.get("original", []), by_method.get("retrain", [])
    out = {"tasks": {}}
    for t in TASKS:

        def forget_of(r, t=t):
            return r.metrics.get(_primary_key("forget", t), r.metrics.get(_primary_key("forget_kept", t)))

        pairs = [(forget_of(r), r.metrics.get(_primary_key("val", t))) for r in orig]
        pairs = [(f, v) for f, v in pairs if f is not None and v]
        if pairs:
            out["tasks"][t] = {
                "forget": stats(f for f, _ in pairs),
                "val": stats(v for _, v in pairs),
                "excess": stats(f / v - 1 for f, v in pairs),
            }

    # the attack on what the request forgets: in the partial setting the retrain still trains on the kept
    # tasks of the forget instances, so an attack on all their losses finds members (0.94 measured)
    def mia(r):
        return r.metrics.get("mia_auc_target", r.metrics.get("mia_auc"))

    out["mia_original"] = stats(mia(r) for r in orig)
    out["mia_retrain"] = stats(mia(r) for r in ret)
    return out


def memorisation_lines(memo: dict) -> list[str]:
    g = MEMO_GOALS
    lines = ["| task | original forget | original val | forget / val - 1 | goal |", "|---|---|---|---|---|"]
    for t, v in memo["tasks"].items():
        ok = v["excess"].mean >= g["excess"]
        lines.append(
            f"| {t} | {_fmt(v['forget'], 'm')} | {_fmt(v['val'], 'm')} | {_fmt(v['excess'], 'm')} | "
            f">= {g['excess']:.2f}: {_verdict(ok)} |"
        )
    for key, what, ok in (
        ("mia_original", "MIA AUC (target tasks), original", lambda x: x >= g["mia_original"]),
        ("mia_retrain", "MIA AUC (target tasks), retrain", lambda x: x <= g["mia_retrain"]),
    ):
        if memo[key] is not None:
            bound = (">= " if key == "mia_original" else "<= ") + f"{g[key]:.2f}"
            lines.append(f"| {what} | {_fmt(memo[key], 'm')} | | | {bound}: {_verdict(ok(memo[key].mean))} |")
    return lines


def uis_table(by_method: dict[str, list[Row]]) -> str:
    """Methods x tasks: UIS per task (mean and 95% interval over seeds), the breakdown behind the UIS column."""
    tasks = [t for t in TASKS if any(f"uis/{t}" in r.metrics for rs in by_method.values() for r in rs)]
    cols = [(Column("", f"UIS {t}", "", "min"), f"uis/{t}") for t in tasks]
    return markdown(_table(by_method, cols, method_order(by_method), lambda s, k: _fmt(s, "uis")))


def mean_uis(by_method: dict[str, list[Row]]) -> dict[str, float]:
    return {m: s.mean for m, rs in by_method.items() if (s := stats(r.metrics.get("uis") for r in rs))}


def per_seed(by_method: dict[str, list[Row]], method: str, key: str = "uis") -> dict[int, float]:
    return {r.seed: r.metrics[key] for r in by_method.get(method, []) if key in r.metrics}


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


def _worst_kept_move(by_method, method: str, tasks) -> dict[int, float]:
    """Per seed: the largest relative move |U - O| / O of a kept task on forget_kept or val."""
    orig = {r.seed: r for r in by_method.get("original", [])}
    out = {}
    for r in by_method.get(method, []):
        moves = [
            abs(u - o) / abs(o)
            for sp in ("forget_kept", "val")
            for t in tasks
            if (o := orig.get(r.seed) and orig[r.seed].metrics.get(_primary_key(sp, t)))
            and (u := r.metrics.get(_primary_key(sp, t))) is not None
        ]
        if moves:
            out[r.seed] = max(moves)
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def uis_line(
    label: str,
    uis: dict[str, float],
    setting: str,
    low: set = frozenset(),
    diffs: dict | None = None,
    incomplete_rows: dict[str, str] | None = None,
) -> str:
    """The UIS goal line; `diffs` = {baseline: (per-seed OURS values, per-seed baseline values)} for the
    paired difference of OURS minus the strongest baseline on the same requests and seeds;
    `incomplete_rows` = {baseline: why} are listed and not ranked, as the rows below the floor (`low`)."""
    unranked = incomplete_rows or {}
    best = _ranked_best(uis, set(low) | set(unranked))
    if OURS not in uis or best is None:
        why = (
            f"no baseline is ranked: below the floor {sorted(low)}, incomplete {sorted(unranked)}"
            if OURS in uis and (low or unranked)
            else f"{OURS} or baselines missing"
        )
        return f"- {label}: UIS goal not computable ({why})"
    below = (uis[best] - uis[OURS]) / uis[best] if uis[best] > 0 else float("nan")
    floor = f"; the retrain's own UIS: {uis['retrain']:.4f}" if "retrain" in uis else ""
    skipped = f"; below the floor, not ranked: {', '.join(sorted(low))}" if low else ""
    if unranked:
        skipped += "; incomplete, not ranked: " + ", ".join(f"{m} ({why})" for m, why in sorted(unranked.items()))
    pair, ok = "", below >= GOALS[setting]
    if diffs and best in diffs and (d := paired(*diffs[best])) is not None:
        pair = f"; paired difference {OURS} - {best} {d.mean:+.4f}" + (
            f" [{d.lo:+.4f}, {d.hi:+.4f}], {'excludes' if d.excludes(0) else 'includes'} 0"
            if d.n > 1
            else " (one seed: no interval)"
        )
        # the goal is a margin *shown*: with an interval, it must lie below 0 as well
        ok = ok and (d.n <= 1 or d.hi < 0)
    return (
        f"- {label}: {OURS} mean UIS {uis[OURS]:.4f} vs strongest baseline {best} {uis[best]:.4f}: "
        f"{100 * below:.0f}% below (goal >= {100 * GOALS[setting]:.0f}% and the paired interval below 0"
        f"{floor}{skipped}){pair}: {_verdict(ok)}"
    )


def goal_lines(groups: dict) -> str:
    out = ["## Goals", ""]
    for setting in GOALS:
        keys = [k for k in groups if k[1] == setting]
        if not keys:
            continue
        per_bench = {k[0]: mean_uis(groups[k]) for k in keys}
        for k in keys:
            g = groups[k]
            diffs = {m: (per_seed(g, OURS), per_seed(g, m)) for m in baselines(g)}
            out.append(uis_line(f"{setting}, {k[0]}", per_bench[k[0]], setting, below_floor(g), diffs, incomplete(g)))
        common = set.intersection(*(set(u) for u in per_bench.values()))
        if len(per_bench) > 1:
            avg = {m: float(np.mean([u[m] for u in per_bench.values()])) for m in common}
            low = set.union(*(below_floor(groups[k]) for k in keys))
            gaps: dict[str, str] = {}
            for k in keys:
                gaps.update({m: f"{why} on {k[0]}" for m, why in incomplete(groups[k]).items()})
            out.append(uis_line(f"{setting}, mean over benchmarks", avg, setting, low, incomplete_rows=gaps))
        # partial: the attack on the target tasks (the retrain still trains on the kept ones of the same instances)
        mia, what = ("mia_auc_target", "MIA AUC (target tasks)") if setting == "partial" else ("mia_auc", "MIA AUC")
        for k in keys:
            ours, ref = (stats(r.metrics.get(mia) for r in groups[k].get(m, [])) for m in (OURS, "retrain"))
            if ours and ref:
                gap = abs(ours.mean - ref.mean)
                d = paired(per_seed(groups[k], OURS, mia), per_seed(groups[k], "retrain", mia))
                pair = (
                    f"; paired difference {d.mean:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]" if d is not None and d.n > 1 else ""
                )
                out.append(
                    f"- {setting}, {k[0]}: {OURS} {what} {ours.mean:.3f} vs retrain {ref.mean:.3f}: gap {gap:.3f} "
                    f"(goal <= {MIA_GOAL}{pair}): {_verdict(gap <= MIA_GOAL)}"
                )
            if setting == "partial":
                kept = [
                    t
                    for t in TASKS
                    if any(_primary_key("forget_kept", t) in r.metrics for rs in groups[k].values() for r in rs)
                ]
                moves = _relative_moves(groups[k], OURS, "forget_kept", kept) + _relative_moves(
                    groups[k], OURS, "val", kept
                )
                ref = _relative_moves(groups[k], "retrain", "forget_kept", kept) + _relative_moves(
                    groups[k], "retrain", "val", kept
                )
                if moves:
                    worst = max(moves)
                    floor = f"; the retrain's: {100 * max(ref):.2f}%" if ref else ""
                    d = paired(_worst_kept_move(groups[k], OURS, kept), _worst_kept_move(groups[k], "retrain", kept))
                    pair = (
                        f"; paired difference of the per-seed largest move {OURS} - retrain {100 * d.mean:+.2f}% "
                        f"[{100 * d.lo:+.2f}, {100 * d.hi:+.2f}]"
                        if d is not None and d.n > 1
                        else ""
                    )
                    out.append(
                        f"- {setting}, {k[0]}: {OURS} kept tasks ({', '.join(kept)}) move at most "
                        f"{100 * worst:.2f}% vs the original (forget_kept and val; goal <= {100 * KEPT_GOAL:.0f}%"
                        f"{floor}{pair}): {_verdict(worst <= KEPT_GOAL)}"
                    )
                else:
                    out.append(
                        f"- {setting}, {k[0]}: {OURS} kept tasks ({', '.join(kept) or 'none'}): not computable "
                        "(no run of it, or the original's metric is 0)"
                    )
    return "\n".join(out)


def render(rows: list[Row], title: str) -> str:
    groups = group(rows)
    parts = [f"# {title}", ""]
    for (bench, setting), by_method in groups.items():
        seeds = sorted({r.seed for rs in by_method.values() for r in rs})
        parts += [
            f"## {bench}, {setting}-task (seeds {', '.join(map(str, seeds))}; mean [95% interval])",
            "",
            table(by_method),
            "",
            "UIS per task:",
            "",
            uis_table(by_method),
            "",
        ]
        eq = equal_forgetting_table(by_method)
        if eq:
            parts += [
                "Interference at equal forgetting (the forget pairs at the retrain's forget level; "
                "relative moves against the model before unlearning):",
                "",
                eq,
                "",
            ]
        pairs = paired_table(by_method)
        if pairs:
            parts += [f"{OURS} minus each row, paired over the same requests (the ablation rows first):", "", pairs, ""]
        held = ablation_goal_table(by_method, setting)
        if held:
            parts += [f"{OURS} and its ablations held to the UIS goal (paired over the same requests):", "", held, ""]
        memo = memorisation(by_method)
        if memo["tasks"]:
            parts += ["Memorisation of the original on these requests:", "", *memorisation_lines(memo), ""]
    parts.append(goal_lines(groups))
    parts += [
        "",
        metrics_legend(),
        f"Directions: {DIRECTIONS}.",
        "UIS: unlearning impact score (mean over tasks). MIA AUC: membership inference on the forget vs "
        "val losses. gap to retrain: mean |difference| to the retrain over the primary metrics of every "
        "split, in percentage points. cost: unlearning wall time (the retrain: its training time).",
    ]
    return "\n".join(parts) + "\n"


def tuning_lines(bench: Path) -> str:
    """How many of each method's tuning trials reached the forget target on the dev request, per unit
    (from the benchmark folder's tune/<benchmark>-<setting>/tuned.yaml)."""
    import yaml

    units = {p.parent.name: yaml.safe_load(p.read_text()) or {} for p in sorted(bench.glob("tune/*/tuned.yaml"))}
    if not units:
        return ""
    names = method_order({m for u in units.values() for m in (u.get("methods") or {})})
    lines = [
        "",
        "## Tuning: feasible trials on the dev request (reached: every target task at most the tolerance above val)",
        "",
        "| method | " + " | ".join(units) + " |",
        "|---|" + "---|" * len(units),
    ]
    for m in names:
        cells = []
        for u in units.values():
            e = (u.get("methods") or {}).get(m)
            cells.append(
                ""
                if not e
                else f"{e.get('feasible_trials', '?')}/{e.get('trials', '?')}"
                + ("" if e.get("feasible") else " (none: least forget gap chosen)")
            )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_data(rows: list[Row]) -> tuple[dict, dict]:
    """UIS (mean, std) per method and (forget drop, retain drop) in % per method, per (benchmark, setting)."""
    uis, trade = {}, {}
    for key, by_method in group(rows).items():
        label = f"{key[0]}, {key[1]}"
        order = [m for m in method_order(by_method) if m != "original"]
        uis[label] = [
            (m, s.mean, s.mean - s.lo, s.hi - s.mean)
            for m in order
            if (s := stats(r.metrics.get("uis") for r in by_method[m]))
        ]
        trade[label] = {m: [r.curve for r in by_method[m] if r.curve] for m in order}
        trade[label] = {m: c for m, c in trade[label].items() if c}
    return uis, trade


def _benchmark(client, run, bench: Path | None) -> tuple[str, dict[str, bytes]]:
    from mtu_dist.reporting.plots import tradeoff, uis_bars

    rows = collect(client, run)
    if not rows:
        raise UserError(f"parent run {run.info.run_id} ({run.info.run_name}): no finished benchmark rows under it")
    text = render(rows, f"Benchmark {run.info.run_name} (parent run {run.info.run_id})")
    if bench:
        text += tuning_lines(bench)
    uis, trade = plot_data(rows)
    return text, {"uis.png": uis_bars(uis, OURS), "tradeoff.png": tradeoff(trade, OURS)}


BENCHMARK = ParentKind("benchmark", "paper_table", "bench/paper_table.py", "--bench", "paper_table.json", _benchmark)


# --------------------------------------------------------------------------
# a demo's parent run (`mtu demo`): its tables, logged under demo/ as JSON rows
# --------------------------------------------------------------------------

DEMO_FOLDER = "demo"  # the demo's artifact folder on its parent run (and under its --out)


def demo_section(record: dict) -> str:
    """One setting of a demo (a record the demo logs: dataset, setting, request, rows) as Markdown."""
    from mtu_dist.reporting.tables import method_table

    return (
        f"## {record['dataset']}, {record['setting']}-task request ({record['request']})\n\n"
        + markdown(method_table(record["rows"]))
        + "\n"
    )


def demo_records(client, run) -> list[dict]:
    """The records the demo logged to its parent run, in the order it ran them."""
    import os
    import tempfile
    from unittest import mock

    names = [a.path for a in client.list_artifacts(run.info.run_id, DEMO_FOLDER) if a.path.endswith(".json")]
    records = []
    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # a progress bar per small file would bury the table
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, quiet):
        for name in names:
            records.append(json.loads(Path(client.download_artifacts(run.info.run_id, name, tmp)).read_text()))
    return sorted(records, key=lambda r: r.get("order", 0))


def demo_figures(by_setting: dict[str, dict[str, dict]]) -> dict[str, bytes]:
    """The demo's figures from its summary rows per setting (tables.summary)."""
    from mtu_dist.reporting.plots import demo_interference, demo_uis

    return {"uis.png": demo_uis(by_setting), "interference.png": demo_interference(by_setting)}


def _demo(client, run, note: str) -> tuple[str, dict[str, bytes]]:
    records = demo_records(client, run)
    if not records:
        raise UserError(
            f"parent run {run.info.run_id} ({run.info.run_name}): the demo logged no table under it "
            f"(artifacts/{DEMO_FOLDER}; a demo stopped before its first table?)"
        )
    text = f"# Demo {run.info.run_name} (parent run {run.info.run_id})\n\n" + "\n".join(map(demo_section, records))
    return text + (f"\n{note}\n" if note else ""), demo_figures({r["setting"]: r["rows"] for r in records})


# --------------------------------------------------------------------------
# the command body `mtu report` and `mtu compare` share
# --------------------------------------------------------------------------


def parent_command(
    kind: ParentKind,
    *,
    parent: str | None,
    experiment: str | None,
    folder: str | None,
    tracking_uri: str | None,
    out: str | None,
) -> Path:
    """Find the parent run (by id, by its folder's record, or the latest of `kind` in an experiment), turn
    its children into a Markdown text and figures, print the text, write everything atomically to `out`
    and log it to the parent run under report/. A demo's parent run is accepted too: its tables."""
    if folder:
        record = Path(folder) / kind.record
        if not record.is_file():
            raise UserError(
                f"{kind.folder_flag} {folder}: no {kind.record} there (is it a folder made by {kind.made_by}?)"
            )
        rec = json.loads(record.read_text())
        parent, tracking_uri = rec["parent_run_id"], tracking_uri or rec["tracking_uri"]
    uri = resolve_uri(tracking_uri)
    check_reachable(uri)
    client = mlflow_client(uri)
    run = find_parent(client, parent=parent, experiment=experiment, uri=uri, kind=kind)
    if run.data.tags.get("mtu.command") == "demo":
        text, figures = _demo(client, run, kind.demo_note)
    else:
        text, figures = kind.build(client, run, Path(folder) if folder else None)
    dest = (
        Path(out)
        if out
        else (Path(folder) / "report" if folder else Path("reports") / f"{run.info.run_name}-{run.info.run_id[:8]}")
    )
    ensure_writable_dir(dest)
    print(text)
    files = {"table.md": text.encode(), **figures}
    for name, data in files.items():
        atomic_write_bytes(dest / name, data)
        client.log_artifact(run.info.run_id, str(dest / name), "report")
    print(f"wrote {', '.join(files)} to {dest} and logged them to run {run.info.run_id[:8]} (artifacts/report)")
    return dest


def report_command(
    *, parent: str | None, experiment: str | None, bench: str | None, tracking_uri: str | None, out: str | None
) -> Path:
    return parent_command(
        BENCHMARK, parent=parent, experiment=experiment, folder=bench, tracking_uri=tracking_uri, out=out
    )

"""Tables a person reads at a glance: every metric named with its unit and its direction, the best value
of each column marked, the reference rows (the retrain, the original) marked as such and never "best".

A `Table` renders as Markdown (best in bold), plain text for a terminal (best with `*`) and CSV (full
precision, the same numbers); `method_table` builds the methods x splits table of metrics.json reports
(`mtu demo`), `split_table` the one-run table `mtu eval` / `train` print.

Directions: on retain and val the primary metric of every task is better higher (`TASKS`); UIS, the gap
to the retrain and wall time are better lower. On the forget split no direction is better in itself: the
goal is the retrain's level (a model that never saw the pairs), so those columns, and MIA AUC, mark the
value closest to the retrain's (`≈R`).
"""

from __future__ import annotations

import csv
import io
import math
import textwrap
from dataclasses import dataclass, field

from mtu_dist.tasks import TASKS

# metric key -> (short name, unit, what it is); the primary metrics of TASKS, named for a reader
METRICS = {
    "miou": ("mIoU", "0–1", "mean intersection over union"),
    "pixel_acc": ("pixel acc", "0–1", "fraction of labelled pixels classified correctly"),
    "delta1": ("δ<1.25", "0–1", "fraction of pixels with max(pred/gt, gt/pred) < 1.25"),
    "abs_err": ("abs err", "", "mean absolute depth error"),
    "rel_err": ("rel err", "", "mean relative depth error"),
    "mean_angle": ("mean angle", "°", "mean angular error"),
    "median_angle": ("median angle", "°", "median angular error"),
    "within_11.25": ("<11.25°", "%", "% of pixels with an angular error below 11.25°"),
    "within_22.5": ("<22.5°", "%", "% of pixels with an angular error below 22.5°"),
    "within_30": ("<30°", "%", "% of pixels with an angular error below 30°"),
}
ARROW = {"max": "↑", "min": "↓", "ref": "≈R", None: ""}
REFERENCE, BEFORE = "reference", "before"  # row roles (the retrain; the original before unlearning): never "best"
FORGET_SPLITS = ("forget", "forget_kept")  # the goal there is the retrain's level
SPLITS = ("forget", "forget_kept", "retain", "val")


@dataclass(frozen=True)
class Column:
    group: str  # what the column is measured on: a split, or "" for a score
    name: str  # e.g. "seg mIoU", "UIS"
    unit: str = ""  # e.g. "0–1", "%", "s"
    better: str | None = None  # "max", "min", "ref" (closest to the reference row's value) or None (no best)
    spec: str = ".3f"

    def header(self) -> str:
        unit = f" ({self.unit})" if self.unit else ""
        return f"{self.group} {self.name}{unit} {ARROW[self.better]}".strip()

    def header_lines(self) -> list[str]:
        """Four short lines for a terminal: where, what (on two lines), unit and direction."""
        unit = f"({self.unit})" if self.unit else ""
        first, _, rest = self.name.partition(" ")
        return [self.group, first, rest, f"{unit} {ARROW[self.better]}".strip()]


@dataclass
class Row:
    keys: list[str]  # the identifying cells (e.g. [method])
    values: list[float | None]  # one per column, compared for "best"
    texts: list[str] | None = None  # shown instead of the formatted values (e.g. a mean with its interval)
    role: str | None = None  # REFERENCE, BEFORE, or another label: not a contender

    def label(self) -> str:
        return self.keys[0] + (f" ({self.role})" if self.role else "")


@dataclass
class Table:
    keys: list[str]
    columns: list[Column]
    rows: list[Row]
    legend: list[str] = field(default_factory=list)


def primary_column(split: str, task: str) -> Column:
    """The primary metric of `task` on `split`, its direction from TASKS (the forget splits: the retrain's level)."""
    metric = TASKS[task].primary
    name, unit, _ = METRICS.get(metric, (metric, "", ""))
    better = "ref" if split in FORGET_SPLITS else ("max" if TASKS[task].higher_is_better[metric] else "min")
    return Column(split, f"{task} {name}", unit, better, ".2f" if unit == "%" else ".3f")


def metrics_legend(tasks=None) -> str:
    parts = []
    for t in tasks or TASKS:
        name, unit, what = METRICS.get(TASKS[t].primary, (TASKS[t].primary, "", ""))
        scale = {"%": "0–100"}.get(unit, unit)
        parts.append(f"{t} {name}: {what}" + (f" ({scale})" if scale else ""))
    return "Metrics: " + "; ".join(parts) + "."


DIRECTIONS = (
    "↑ higher is better, ↓ lower is better; ≈R: the closer to the retrain's value the better (on the "
    "forget pairs the goal is the level of a model that never saw them, not the lowest value)"
)


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _compared(row: Row, c: int, col: Column) -> float:
    """The value as the table shows it: values that print the same tie (both are marked, or neither). Rows
    with texts of their own (a mean and its interval) compare their values as they are."""
    if row.texts is not None:
        return row.values[c]
    text = format(row.values[c], col.spec)
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def best(table: Table) -> list[set[int]]:
    """Per column: the indices of the rows holding its best value as shown (ties: all), among the contenders
    only (rows without a role); a "ref" column needs the reference row's value."""
    out = []
    ref = next((r for r in table.rows if r.role == REFERENCE), None)
    for c, col in enumerate(table.columns):
        pts = {i: _compared(r, c, col) for i, r in enumerate(table.rows) if r.role is None and _finite(r.values[c])}
        if col.better == "ref":
            target = _compared(ref, c, col) if ref is not None and _finite(ref.values[c]) else None
            pts = {i: abs(v - target) for i, v in pts.items()} if _finite(target) else {}
            goal = min
        else:
            goal = {"max": max, "min": min}.get(col.better)
        if not pts or goal is None:
            out.append(set())
            continue
        top = goal(pts.values())
        out.append({i for i, v in pts.items() if math.isclose(v, top, rel_tol=0, abs_tol=1e-12)})
    return out


def _cell(row: Row, c: int, col: Column) -> str:
    if row.texts is not None:
        return row.texts[c]
    return format(row.values[c], col.spec) if _finite(row.values[c]) else ""


def _legend(table: Table, bold: bool) -> list[str]:
    mark = "bold" if bold else "*"
    roles = sorted({r.role for r in table.rows if r.role})
    note = f"{mark}: the best value of its column among the methods"
    if roles:
        note += "; rows marked " + ", ".join(f"({r})" for r in roles) + " are not ranked"
    if BEFORE in roles or REFERENCE in roles:
        note += " (before: the original, before unlearning; reference: the retrain, trained without the forget pairs)"
    return [*table.legend, f"{note}."]


def markdown(table: Table) -> str:
    marks = best(table)
    lines = [
        "| " + " | ".join([*table.keys, *(c.header() for c in table.columns)]) + " |",
        "|" + "---|" * (len(table.keys) + len(table.columns)),
    ]
    for i, row in enumerate(table.rows):
        cells = [_cell(row, c, col) for c, col in enumerate(table.columns)]
        cells = [f"**{t}**" if i in marks[c] and t else t for c, t in enumerate(cells)]
        lines.append("| " + " | ".join([row.label(), *row.keys[1:], *cells]) + " |")
    return "\n".join(lines + [""] + _legend(table, bold=True))


def plain(table: Table) -> str:
    """Aligned columns for a terminal; headers stacked on four lines so the table stays narrow."""
    marks = best(table)
    head = [["", "", "", k] for k in table.keys] + [c.header_lines() for c in table.columns]
    groups = [h[0] for h in head]
    for j in range(len(head) - 1, 0, -1):  # a split's name once, over its first column
        if groups[j] and groups[j] == groups[j - 1]:
            head[j][0] = ""
    body = []
    for i, row in enumerate(table.rows):
        cells = [_cell(row, c, col) + ("*" if i in marks[c] else " ") for c, col in enumerate(table.columns)]
        body.append([row.label(), *row.keys[1:], *cells])
    widths = [max(len(x) for x in [*h, *(b[j] for b in body)]) for j, h in enumerate(head)]
    nk = len(table.keys)

    def fmt(cells, left=False):
        return "  ".join(
            x.ljust(w) if j < nk or left else x.rjust(w) for j, (x, w) in enumerate(zip(cells, widths))
        ).rstrip()

    lines = [fmt([h[0] for h in head], left=True)] + [fmt([h[k] for h in head]) for k in range(1, 4)]
    lines += ["  ".join("-" * w for w in widths)] + [fmt(b) for b in body]
    return "\n".join(lines + [""] + [textwrap.fill(x, 110, subsequent_indent="  ") for x in _legend(table, bold=False)])


def csv_text(table: Table) -> str:
    """One row per table row: its keys, its role and every value at full precision."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*table.keys, "role", *(c.header() for c in table.columns)])
    for row in table.rows:
        w.writerow([*row.keys, row.role or "", *("" if not _finite(v) else repr(float(v)) for v in row.values)])
    return buf.getvalue()


# --------------------------------------------------------------------------
# metrics.json reports
# --------------------------------------------------------------------------


def summary(report: dict) -> dict:
    """What a method table shows of one metrics.json report: primary metric per split and task, the
    unlearning scores and the wall time (None where the report has none)."""
    u = report.get("unlearning") or {}
    return {
        "splits": {
            sp: {t: m[TASKS[t].primary] for t, m in tasks.items() if t in TASKS}
            for sp, tasks in report["splits"].items()
        },
        "uis": (u.get("uis") or {}).get("mean"),
        "uis_per_task": (u.get("uis") or {}).get("per_task"),
        "mia_auc": u.get("mia_auc"),
        "gap_retrain": u.get("gap_retrain"),
        "time_s": report.get("time_s"),
    }


SCORES = [
    ("uis", Column("", "UIS", "", "min", ".3f")),
    ("mia_auc", Column("", "MIA AUC", "", "ref", ".3f")),
    ("gap_retrain", Column("", "gap to retrain", "pp", "min", ".3f")),
    ("time_s", Column("", "time", "s", "min", ".1f")),
]
ROLES = {"original": BEFORE, "retrain": REFERENCE}


def method_table(rows: dict[str, dict]) -> Table:
    """Methods x splits from `summary` rows: the primary metric of every task per split, then UIS (mean over
    tasks), MIA AUC, the gap to the retrain (mean |difference| over the primary metrics of every split, in
    percentage points) and the wall time (the original: its training time; the retrain: its own training)."""
    first = next(iter(rows.values()))["splits"]
    cols = [(sp, t) for sp in SPLITS if sp in first for t in TASKS if t in first[sp]]
    columns = [primary_column(sp, t) for sp, t in cols] + [c for _, c in SCORES]
    out = [
        Row([name], [s["splits"][sp].get(t) for sp, t in cols] + [s.get(k) for k, _ in SCORES], role=ROLES.get(name))
        for name, s in rows.items()
    ]
    legend = [
        metrics_legend([t for t in TASKS if any(t == ct for _, ct in cols)]),
        f"Directions: {DIRECTIONS}.",
        "UIS: unlearning impact score, mean over tasks; MIA AUC: membership inference on the forget vs val "
        "losses; a score a row has no reference for is empty. forget_kept: the kept tasks of the forgotten "
        "instances (partial setting).",
    ]
    return Table(["method"], columns, out, legend)


def split_table(report: dict) -> str:
    """One row per split of one run: the primary metric of each task, with its unit and direction (the
    rows are splits of one model, not contenders: nothing is marked best)."""
    splits = report["splits"]
    tasks = sorted({t for sp in splits.values() for t in sp}, key=list(TASKS).index)
    cols = [primary_column("", t) for t in tasks]
    rows = ["| split | " + " | ".join(c.header() for c in cols) + " |", "|" + "---|" * (len(tasks) + 1)]
    for name, sp in splits.items():
        cells = [format(sp[t][TASKS[t].primary], ".4f") if t in sp else "" for t in tasks]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(
        rows
        + [metrics_legend(tasks) + " ↑: higher is better (on a forget split the goal is the retrain's level instead)."]
    )

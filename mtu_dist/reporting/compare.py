"""`mtu compare`: a sweep's cells from MLflow -> Markdown tables and scaling plots, logged back to it.

The sweep is found by its parent run (`--parent ID`), its folder (`--sweep DIR`, which records the
parent and the tracking URI) or its experiment (`--experiment NAME`: the latest sweep there). Cells
are the parent's finished child runs carrying the `mtu.sweep.*` tags the sweep driver sets; a cell
run more than once (its spec changed) counts with its latest run. What is read per cell:

* train cells: `time/step_s` and `throughput/samples_per_s` (samples per second over all ranks);
* unlearn cells: step time = (`time/unlearn_s` - `time/setup_s`) / `unlearn/steps_run` (the method's
  one-off setup is excluded from the per-step figure but included in the cost `time/unlearn_s`), and,
  when the run has them, `uis`, `mia_auc`, `gap_retrain`, `cost_ratio` (`mtu unlearn --retrain`);
* retrain cells (the gold standard) are rows of the unlearning table with method `retrain` and their
  training time (`time/train_s`) as cost.

Outputs go to `--out` (default `<sweep>/report`, or `reports/<parent name>-<id>`), each written
atomically: `table.md`, `cells.csv` and the PNGs of `plots.py`; all are logged as artifacts of the
parent run under `report/` (the command body is report.parent_command, shared with `mtu report`). In the
tables every column names its unit and direction, the best value is bold and the retrain cells are
reference rows. A demo's parent run (`mtu demo`) is accepted too: it has no scaling axes, so what is
shown is its comparison of the methods against the retrain (its tables), with a note saying so.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mtu_dist.errors import UserError
from mtu_dist.reporting.report import ParentKind, parent_command
from mtu_dist.reporting.report import find_parent as _find_parent
from mtu_dist.reporting.tables import REFERENCE, Column, Row, Table, markdown

OPTIONAL = ("uis", "mia_auc", "gap_retrain", "cost_ratio")  # unlearning-quality metrics, present when recorded


@dataclass
class CellRow:
    kind: str
    cell: str
    world_size: int
    train_size: int
    forget_fraction: float | None
    method: str | None
    step_s: float | None
    samples_per_s: float | None
    cost_s: float | None  # unlearning wall time, setup included; retrain: its training time
    run_id: str
    quality: dict[str, float] = field(default_factory=dict)


def _tag_float(tags: dict, key: str) -> float | None:
    return float(tags[key]) if tags.get(key) not in (None, "None") else None


def _row(run) -> CellRow:
    t, m = run.data.tags, run.data.metrics
    kind = t["mtu.sweep.kind"]
    step_s = m.get("time/step_s")  # train and retrain cells
    cost_s = m.get("time/train_s") if kind == "retrain" else None
    if kind == "unlearn" and "time/unlearn_s" in m:
        cost_s = m["time/unlearn_s"]
        step_s = (cost_s - m.get("time/setup_s", 0.0)) / max(m.get("unlearn/steps_run", 1.0), 1.0)
    return CellRow(
        kind=kind,
        cell=t["mtu.sweep.cell"],
        world_size=int(t["mtu.sweep.world_size"]),
        train_size=int(t["mtu.sweep.train_size"]),
        forget_fraction=_tag_float(t, "mtu.sweep.forget_fraction"),
        method=t.get("mtu.sweep.method"),
        step_s=step_s,
        cost_s=cost_s,
        samples_per_s=m.get("throughput/samples_per_s") if kind == "train" else None,
        run_id=run.info.run_id,
        quality={k: m[k] for k in OPTIONAL if k in m},
    )


def find_parent(client, *, parent: str | None, experiment: str | None, uri: str):
    return _find_parent(client, parent=parent, experiment=experiment, uri=uri, kind=SWEEP)


def collect(client, parent) -> list[CellRow]:
    """The parent's finished, tagged child runs; the latest run of each cell."""
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=50000,
    )
    latest = {
        r.data.tags["mtu.sweep.cell"]: r
        for r in runs
        if r.info.status == "FINISHED" and "mtu.sweep.cell" in r.data.tags
    }
    rows = [_row(r) for r in latest.values()]
    return sorted(rows, key=lambda r: (r.kind, r.method or "", r.train_size, r.forget_fraction or 0, r.world_size))


THROUGHPUT = [
    Column("", "step", "s", "min", ".3g"),
    Column("", "samples/s", "all ranks", "max", ".1f"),
    Column("", "speed-up", "x smallest world", "max", ".2f"),
    Column("", "efficiency", "", "max", ".0%"),
]
QUALITY = {
    "uis": Column("", "UIS", "", "min", ".4f"),
    "mia_auc": Column("", "MIA AUC", "", None, ".4f"),
    "gap_retrain": Column("", "gap to retrain", "pp", "min", ".4f"),
    "cost_ratio": Column("", "cost ratio", "x retrain", "min", ".4f"),
}


def throughput_table(train: list[CellRow]) -> Table:
    base = {}
    for r in train:  # the smallest world size of each data size is the speed-up reference
        if r.samples_per_s and (r.train_size not in base or r.world_size < base[r.train_size].world_size):
            base[r.train_size] = r
    rows = []
    for r in train:
        b = base.get(r.train_size)
        speedup = r.samples_per_s / b.samples_per_s if b and r.samples_per_s else None
        eff = speedup * b.world_size / r.world_size if speedup else None
        rows.append(Row([r.cell, str(r.train_size), str(r.world_size)], [r.step_s, r.samples_per_s, speedup, eff]))
    return Table(["cell", "train size", "world size"], THROUGHPUT, rows)


def unlearning_table(unl: list[CellRow]) -> Table:
    """One row per cell; the retrain cells (the gold standard) are reference rows. MIA AUC has no best: the
    value to approach is the retrain's of the same forget fraction, not one of the whole column."""
    extra = [k for k in OPTIONAL if any(k in r.quality for r in unl)]
    cols = [Column("", "step", "s", "min", ".3g"), Column("", "cost", "s", "min", ".3g"), *(QUALITY[k] for k in extra)]
    rows = [
        Row(
            [r.cell, r.method or "", str(r.train_size), f"{r.forget_fraction:g}", str(r.world_size)],
            [r.step_s, r.cost_s, *(r.quality.get(k) for k in extra)],
            role=REFERENCE if r.kind == "retrain" else None,
        )
        for r in unl
    ]
    legend = [
        "Directions: ↑ higher is better, ↓ lower is better. step: unlearning time per step, the method's setup "
        "excluded; cost: unlearning wall time, setup included (a retrain: its training time). The best of a "
        "column is over all unlearning cells, whatever their data size, forget fraction and world size. "
        "MIA AUC: the closer to the retrain's of the same forget fraction the better (no best marked)."
    ]
    return Table(["cell", "method", "train size", "forget fraction", "world size"], cols, rows, legend)


def tables(rows: list[CellRow]) -> str:
    out = []
    train = [r for r in rows if r.kind == "train"]
    if train:
        out += ["## Training throughput", "", markdown(throughput_table(train)), ""]
    unl = [r for r in rows if r.kind != "train"]
    if unl:
        out += ["## Unlearning", "", markdown(unlearning_table(unl))]
    return "\n".join(out).rstrip() + "\n"


def _csv(rows: list[CellRow]) -> str:
    keys = [k for k in asdict(rows[0]) if k != "quality"] + list(OPTIONAL)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        d = asdict(r)
        w.writerow({**{k: v for k, v in d.items() if k != "quality"}, **d["quality"]})
    return buf.getvalue()


def _sweep(client, run, sweep: Path | None) -> tuple[str, dict[str, bytes]]:
    from mtu_dist.reporting.plots import draw_all

    rows = collect(client, run)
    if not rows:
        raise UserError(f"parent run {run.info.run_id} ({run.info.run_name}): no finished sweep cells under it")
    figures, notes = draw_all(rows)
    text = (
        f"# Sweep {run.info.run_name} (parent run {run.info.run_id})\n\n"
        + tables(rows)
        + "".join(f"\nNote: {n}." for n in notes)
        + ("\n" if notes else "")
    )
    return text, {"cells.csv": _csv(rows).encode(), **figures}


# A demo runs one world size, one data size and one forget fraction: there is no scaling to plot, and the
# comparison that applies is the one between methods, which its tables are.
DEMO_NOTE = (
    "Note: a demo has no scaling axes (one world size, data size and forget fraction), so there are no "
    "scaling plots; its comparison is that of the methods against the retrain, above (`mtu sweep` makes "
    "scaling studies)."
)
SWEEP = ParentKind("sweep", "sweep", "`mtu sweep`", "--sweep", "sweep.json", _sweep, DEMO_NOTE)


def compare_command(
    *, parent: str | None, experiment: str | None, sweep: str | None, tracking_uri: str | None, out: str | None
) -> Path:
    return parent_command(SWEEP, parent=parent, experiment=experiment, folder=sweep, tracking_uri=tracking_uri, out=out)

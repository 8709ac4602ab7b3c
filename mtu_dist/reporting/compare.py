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
parent run under `report/`.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mtu_dist.errors import UserError
from mtu_dist.utils.fileio import atomic_write_bytes, ensure_writable_dir
from mtu_dist.reporting.tracking import check_reachable, mlflow_client, resolve_uri

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
    cost_s: float | None             # unlearning wall time, setup included; retrain: its training time
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
    return CellRow(kind=kind, cell=t["mtu.sweep.cell"], world_size=int(t["mtu.sweep.world_size"]),
                   train_size=int(t["mtu.sweep.train_size"]), forget_fraction=_tag_float(t, "mtu.sweep.forget_fraction"),
                   method=t.get("mtu.sweep.method"), step_s=step_s, cost_s=cost_s,
                   samples_per_s=m.get("throughput/samples_per_s") if kind == "train" else None,
                   run_id=run.info.run_id, quality={k: m[k] for k in OPTIONAL if k in m})


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
    runs = client.search_runs([exp.experiment_id], "tags.`mtu.command` = 'sweep'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        raise UserError(f"--experiment {experiment!r}: it holds no sweep parent run (made by `mtu sweep`)")
    return runs[0]


def collect(client, parent) -> list[CellRow]:
    """The parent's finished, tagged child runs; the latest run of each cell."""
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=50000)
    latest = {r.data.tags["mtu.sweep.cell"]: r for r in runs
              if r.info.status == "FINISHED" and "mtu.sweep.cell" in r.data.tags}
    rows = [_row(r) for r in latest.values()]
    return sorted(rows, key=lambda r: (r.kind, r.method or "", r.train_size, r.forget_fraction or 0, r.world_size))


def _fmt(v, spec=".3g") -> str:
    return "" if v is None else format(v, spec)


def tables(rows: list[CellRow]) -> str:
    out = []
    train = [r for r in rows if r.kind == "train"]
    if train:
        base = {}
        for r in train:  # the smallest world size of each data size is the speed-up reference
            if r.samples_per_s and (r.train_size not in base or r.world_size < base[r.train_size].world_size):
                base[r.train_size] = r
        out += ["## Training throughput", "",
                "| cell | train size | world size | step s | samples/s | speed-up | efficiency |",
                "|---|---|---|---|---|---|---|"]
        for r in train:
            b = base.get(r.train_size)
            speedup = r.samples_per_s / b.samples_per_s if b and r.samples_per_s else None
            eff = speedup * b.world_size / r.world_size if speedup else None
            out.append(f"| {r.cell} | {r.train_size} | {r.world_size} | {_fmt(r.step_s)} | {_fmt(r.samples_per_s, '.1f')} "
                       f"| {_fmt(speedup, '.2f')} | {_fmt(eff, '.0%')} |")
        out.append("")
    unl = [r for r in rows if r.kind != "train"]  # the retrain reference is a row like any method
    if unl:
        extra = [k for k in OPTIONAL if any(k in r.quality for r in unl)]
        out += ["## Unlearning", "",
                ("| cell | method | train size | forget fraction | world size | step s | cost s | "
                 + "".join(f"{'UIS' if k == 'uis' else k} | " for k in extra)).rstrip(),
                "|---|---|---|---|---|---|---|" + "---|" * len(extra)]
        for r in unl:
            q = "".join(f"{_fmt(r.quality.get(k), '.4f')} | " for k in extra)
            out.append(f"| {r.cell} | {r.method} | {r.train_size} | {r.forget_fraction:g} | {r.world_size} | "
                       f"{_fmt(r.step_s)} | {_fmt(r.cost_s)} | {q}".rstrip())
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


def compare_command(*, parent: str | None, experiment: str | None, sweep: str | None, tracking_uri: str | None,
                    out: str | None) -> Path:
    if sweep:
        record = Path(sweep) / "sweep.json"
        if not record.is_file():
            raise UserError(f"--sweep {sweep}: no sweep.json there (is it a folder made by `mtu sweep`?)")
        rec = json.loads(record.read_text())
        parent, tracking_uri = rec["parent_run_id"], tracking_uri or rec["tracking_uri"]
    uri = resolve_uri(tracking_uri)
    check_reachable(uri)
    client = mlflow_client(uri)
    run = find_parent(client, parent=parent, experiment=experiment, uri=uri)
    rows = collect(client, run)
    if not rows:
        raise UserError(f"parent run {run.info.run_id} ({run.info.run_name}): no finished sweep cells under it")
    folder = Path(out) if out else (Path(sweep) / "report" if sweep else
                                    Path("reports") / f"{run.info.run_name}-{run.info.run_id[:8]}")
    ensure_writable_dir(folder)
    from mtu_dist.reporting.plots import draw_all
    figures, notes = draw_all(rows)
    text = (f"# Sweep {run.info.run_name} (parent run {run.info.run_id})\n\n" + tables(rows)
            + "".join(f"\nNote: {n}." for n in notes) + ("\n" if notes else ""))
    print(text)
    files = {"table.md": text.encode(), "cells.csv": _csv(rows).encode(), **figures}
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
        client.log_artifact(run.info.run_id, str(folder / name), "report")
    print(f"wrote {', '.join(files)} to {folder} and logged them to run {run.info.run_id[:8]} (artifacts/report)")
    return folder

"""Tables a person reads at a glance (reporting/tables.py), the demo's saved and logged results
(studies/demo.py), `mtu report` / `mtu compare` on a demo's parent run, and the sweep plots stating only
what they draw (reporting/plots.py).

A whole `mtu demo` takes minutes even on the tiny data (24 unlearning runs of 40 steps), so the demo's
presentation is tested in pieces: its functions on hand-made metrics.json reports, against a real
sqlite MLflow store.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re

import pytest
from conftest import run_mtu

from mtu_dist.reporting import plots, tables
from mtu_dist.reporting.tables import BEFORE, REFERENCE, Column, Row, Table
from mtu_dist.tasks import TASKS

PNG = b"\x89PNG\r\n\x1a\n"


def _table() -> Table:
    cols = [
        Column("val", "seg mIoU", "0–1", "max"),
        Column("", "UIS", "", "min"),
        Column("forget", "seg mIoU", "0–1", "ref"),
        Column("", "note"),
    ]
    rows = [
        Row(["original"], [0.90, 0.000, 0.500, 1.0], role=BEFORE),  # best everywhere, but not a contender
        Row(["retrain"], [0.80, 0.010, 0.300, 1.0], role=REFERENCE),
        Row(["a"], [0.70, 0.050, 0.350, 1.0]),
        Row(["b"], [0.75, 0.020, 0.200, 1.0]),
        Row(["c"], [0.75, 0.030, 0.290, None]),
    ]
    return Table(["method"], cols, rows)


def test_best_per_column_excludes_the_references():
    # higher is better: b and c tie at 0.75 (the original's 0.90 does not count); lower is better: b;
    # closest to the retrain's 0.300: c (0.290), not the retrain itself; a column without direction: none
    assert tables.best(_table()) == [{3, 4}, {3}, {4}, set()]


def test_markdown_and_plain_mark_the_best_and_the_reference_rows():
    md = tables.markdown(_table())
    lines = md.splitlines()
    assert lines[0] == "| method | val seg mIoU (0–1) ↑ | UIS ↓ | forget seg mIoU (0–1) ≈R | note |"
    assert "| retrain (reference) | 0.800 | 0.010 | 0.300 | 1.000 |" in lines
    assert "| original (before) | 0.900 | 0.000 | 0.500 | 1.000 |" in lines
    assert "| b | **0.750** | **0.020** | 0.200 | 1.000 |" in lines
    assert "| c | **0.750** | 0.030 | **0.290** |  |" in lines
    assert "bold: the best value of its column" in md
    text = tables.plain(_table())
    row_b = next(ln for ln in text.splitlines() if ln.startswith("b "))
    assert row_b.split() == ["b", "0.750*", "0.020*", "0.200", "1.000"]
    assert "**" not in text and "*: the best value" in text
    assert next(ln for ln in text.splitlines() if ln.startswith("original (before)")).count("*") == 0


def test_values_that_print_the_same_tie():
    t = Table(["method"], [Column("", "UIS", "", "min")], [Row(["a"], [0.01234]), Row(["b"], [0.01229])])
    assert tables.best(t) == [{0, 1}]  # both show 0.012: marking one of them would look arbitrary


def test_labels_and_directions_come_from_tasks(monkeypatch):
    for t, task in TASKS.items():
        name, unit, _ = tables.METRICS[task.primary]
        col = tables.primary_column("val", t)
        arrow = "↑" if task.higher_is_better[task.primary] else "↓"
        assert col.header() == f"val {t} {name} ({unit}) {arrow}"
        forget = tables.primary_column("forget", t).header()
        assert forget.endswith("≈R") and "↑" not in forget and "↓" not in forget
    assert tables.primary_column("val", "normal").unit == "%" and tables.primary_column("val", "seg").unit == "0–1"
    # the direction is read from TASKS, not written here
    seg = TASKS["seg"]
    flipped = dataclasses.replace(seg, higher_is_better={**seg.higher_is_better, seg.primary: False})
    monkeypatch.setitem(TASKS, "seg", flipped)
    assert tables.primary_column("retain", "seg").header().endswith("↓")


def _report(forget, retain, val, uis=None, mia=None, gap=None, time_s=None, partial=False):
    def split(seg):
        return {"seg": {"miou": seg}, "depth": {"delta1": 0.6}, "normal": {"within_30": 55.0}}

    splits = {"forget": split(forget), "retain": split(retain), "val": split(val)}
    if partial:
        kept = splits["forget"]
        splits["forget"], splits["forget_kept"] = {"seg": kept.pop("seg")}, kept
        splits = {k: splits[k] for k in ("forget", "forget_kept", "retain", "val")}
    rep = {"splits": splits, "time_s": time_s}
    if uis is not None:
        rep["unlearning"] = {"uis": {"mean": uis, "per_task": {"seg": uis}}, "mia_auc": mia, "gap_retrain": gap}
    return rep


def _reports(partial=False):
    return {
        "original": {"splits": _report(0.20, 0.22, 0.18, partial=partial)["splits"], "time_s": 120.5},
        "retrain": _report(0.19, 0.216, 0.19, 0.021, 0.553, None, 101.1, partial),
        "finetune": _report(0.195, 0.218, 0.185, 0.020, 0.552, 0.710, 10.5, partial),
        "iamu": _report(0.193, 0.220, 0.183, 0.014, 0.507, 0.603, 14.5, partial),
    }


def test_markdown_and_csv_hold_the_same_numbers():
    t = tables.method_table({m: tables.summary(r) for m, r in _reports(partial=True).items()})
    md = [ln for ln in tables.markdown(t).splitlines() if ln.startswith("| ") and "---" not in ln]
    head = [c.strip() for c in md[0].strip("|").split("|")]
    rows = list(csv.reader(io.StringIO(tables.csv_text(t))))
    assert rows[0] == [head[0], "role", *head[1:]]  # the same column names, units and directions
    for line, rec, col_rows in zip(md[1:], rows[1:], t.rows):
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        assert cells[0] == col_rows.label() and rec[0] == col_rows.keys[0] and rec[1] == (col_rows.role or "")
        for cell, value, col in zip(cells[1:], rec[2:], t.columns):
            assert cell == ("" if value == "" else format(float(value), col.spec)), (line, col.header())
    assert "original,before," in tables.csv_text(t) and "120.5" in tables.csv_text(t)  # its training time


def _parent(uri: str):
    from mtu_dist.reporting.tracking import Tracker

    return Tracker(enabled=True, uri=uri, experiment="synth-indoor", run_name="demo", tags={"mtu.command": "demo"})


@pytest.fixture
def demo_parent(tmp_path):
    """A demo parent run with both settings presented, saved and logged as `mtu demo` does."""
    from mtu_dist.studies import demo

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = _parent(uri)
    results = {
        s: demo.present(parent, s, tmp_path / f"{s}.yaml", _reports(s == "partial"), tmp_path / "runs", order=i)
        for i, s in enumerate(("full", "partial"))
    }
    demo.figures(parent, results, tmp_path / "runs")
    parent.finish()
    return uri, parent.run_id, tmp_path


def test_demo_saves_and_logs_its_tables_and_summary_metrics(capsys, demo_parent):
    from mlflow import MlflowClient

    uri, run_id, tmp = demo_parent
    printed = capsys.readouterr().out
    assert "retrain (reference)" in printed and "0.014*" in printed  # iamu's UIS, the lowest
    folder = tmp / "runs" / "demo"
    names = {f"synth-indoor-{s}.{ext}" for s in ("full", "partial") for ext in ("md", "csv", "json")}
    assert names | {"uis.png", "interference.png"} <= {p.name for p in folder.iterdir()}
    for png in ("uis.png", "interference.png"):
        assert (folder / png).read_bytes().startswith(PNG)
    md = (folder / "synth-indoor-partial.md").read_text()
    assert "| iamu | " in md and "**0.014**" in md and "forget_kept depth δ<1.25 (0–1) ≈R" in md
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(run_id, "demo")}
    assert {f"demo/{n}" for n in names | {"uis.png", "interference.png"}} <= logged
    metrics = client.get_run(run_id).data.metrics
    assert metrics["full/iamu/uis"] == pytest.approx(0.014) and metrics["partial/iamu/mia_auc"] == pytest.approx(0.507)
    assert metrics["full/original/time_s"] == pytest.approx(120.5)  # its training time
    assert metrics["full/retrain/time_s"] == pytest.approx(101.1)
    assert metrics["partial/finetune/val/seg/miou"] == pytest.approx(0.185)
    assert "full/original/uis" not in metrics  # no reference, no score: nothing is made up


def test_mtu_report_and_compare_accept_a_demo_parent(demo_parent):
    uri, run_id, tmp = demo_parent
    rep = run_mtu("report", "--parent", run_id, "--tracking-uri", uri, "--out", tmp / "rep", cwd=tmp)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert "## synth-indoor, full-task request" in rep.stdout and "## synth-indoor, partial-task request" in rep.stdout
    assert "| retrain (reference) |" in rep.stdout and "**0.014**" in rep.stdout
    table = (tmp / "rep" / "table.md").read_text()
    assert table.count("| iamu |") == 2 and (tmp / "rep" / "uis.png").read_bytes().startswith(PNG)
    cmp = run_mtu("compare", "--parent", run_id, "--tracking-uri", uri, "--out", tmp / "cmp", cwd=tmp)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert "a demo has no scaling axes" in cmp.stdout and "| iamu |" in cmp.stdout
    from mlflow import MlflowClient

    assert {"report/table.md", "report/uis.png", "report/interference.png"} <= {
        a.path for a in MlflowClient(uri).list_artifacts(run_id, "report")
    }


def test_report_of_a_demo_that_logged_no_table_is_one_line(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = _parent(uri)
    parent.finish("KILLED")
    proc = run_mtu("report", "--parent", parent.run_id, "--tracking-uri", uri, "--out", tmp_path / "rep", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.search(r"the demo logged no table under it", proc.stderr)


# --------------------------------------------------------------------------
# sweep tables and plots
# --------------------------------------------------------------------------


def _cells():
    from mtu_dist.reporting.compare import CellRow

    def cell(kind, w, f=None, method=None, step=None, sps=None, cost=None, uis=None):
        name = f"train-n40-w{w}" if kind == "train" else f"{method}-n40-f{f:g}-w{w}"
        return CellRow(kind, name, w, 40, f, method, step, sps, cost, name, {"uis": uis} if uis is not None else {})

    return [
        cell("train", 1, step=0.2, sps=100.0),
        cell("train", 2, step=0.22, sps=180.0),
        *(cell("unlearn", w, f, "iamu", step=0.1 * w + f, cost=5 + f, uis=0.1 + f) for w in (1, 2) for f in (0.1, 0.2)),
    ]


@pytest.fixture
def figs(monkeypatch):
    """The plots' figures themselves instead of their PNG bytes."""
    monkeypatch.setattr(plots, "_png", lambda fig: fig)


def _labels(ax) -> set[str]:
    return {line.get_label() for line in ax.get_lines()}


def test_scaling_draws_the_linear_line_and_one_curve_per_forget_fraction(figs):
    left, right = plots.scaling(_cells()).axes
    assert "linear scaling" in _labels(left)  # drawn, and named in the legend rather than promised in the title
    linear = next(ln for ln in left.get_lines() if ln.get_label() == "linear scaling")
    assert list(linear.get_ydata()) == [100.0, 200.0]
    assert {"unlearn iamu, f=0.1", "unlearn iamu, f=0.2"} <= _labels(right)  # not averaged over forget fractions
    one = plots.scaling([c for c in _cells() if c.world_size == 1])
    assert "linear scaling" not in _labels(one.axes[0]) and "one world size" in one.axes[0].get_title()


def test_cost_plot_names_a_retrain_only_when_the_sweep_has_one(figs):
    figures, _ = plots.draw_all(_cells())
    assert "retrain" not in figures["cost_vs_forget.png"].axes[0].get_title()
    from mtu_dist.reporting.compare import CellRow

    ref = CellRow("retrain", "retrain-n40-f0.1-w1", 1, 40, 0.1, "retrain", 0.3, None, 60.0, "r", {"uis": 0.05})
    figures, _ = plots.draw_all([*_cells(), ref])
    assert "retrain: its training time" in figures["cost_vs_forget.png"].axes[0].get_title()


def test_sweep_tables_mark_the_best_and_the_retrain_reference():
    from mtu_dist.reporting.compare import CellRow
    from mtu_dist.reporting.compare import tables as sweep_tables

    ref = CellRow("retrain", "retrain-n40-f0.1-w1", 1, 40, 0.1, "retrain", 0.01, None, 1.0, "r", {"uis": 0.001})
    text = sweep_tables([*_cells(), ref])
    assert "| train-n40-w2 | 40 | 2 | 0.22 | **180.0** | **1.80** | 90% |" in text
    assert "| retrain-n40-f0.1-w1 (reference) | retrain |" in text  # its tiny cost and UIS are not "best"
    assert "| iamu-n40-f0.1-w1 | iamu | 40 | 0.1 | 1 | **0.2** | **5.1** | **0.2000** |" in text
    assert "samples/s (all ranks) ↑" in text and "UIS ↓" in text


def test_demo_generates_only_the_dataset_it_runs():
    from mtu_dist.studies import demo

    assert demo.DATASETS == [demo.DEMO_DATASET]


def test_demo_records_read_back_in_order(demo_parent):
    from mlflow import MlflowClient

    from mtu_dist.reporting.report import demo_records

    uri, run_id, _ = demo_parent
    client = MlflowClient(uri)
    records = demo_records(client, client.get_run(run_id))
    assert [r["setting"] for r in records] == ["full", "partial"]
    assert json.dumps(records[0]["rows"]["iamu"]["uis"]) == "0.014"


@pytest.mark.slow
def test_demo_end_to_end_on_tiny_data(tiny_root, tmp_path):
    """The whole demo on the tiny shards (about 2 minutes on 2 idle cores: 24 unlearning runs of 40 steps)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_mtu(
        "demo",
        "--root",
        tiny_root,
        "--out",
        tmp_path / "runs",
        "--tracking-uri",
        uri,
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id = re.search(r"mtu report --parent (\w+) --tracking-uri (\S+)", proc.stdout).group(1)
    assert f"mlflow ui --backend-store-uri {uri}" in proc.stdout
    trained = json.loads((tmp_path / "runs/synth-indoor/original/final/metrics.json").read_text())["time_s"]
    original = next(ln for ln in proc.stdout.splitlines() if ln.startswith("original (before)"))
    assert original.split()[-1] == f"{trained:.1f}" and trained > 0  # its training time, not 0.0
    assert proc.stdout.count("retrain (reference)") == 2
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(run_id, "demo")}
    assert {
        "demo/synth-indoor-full.md",
        "demo/synth-indoor-partial.csv",
        "demo/uis.png",
        "demo/interference.png",
    } <= logged
    metrics = client.get_run(run_id).data.metrics
    assert {"full/iamu/uis", "partial/iamu/mia_auc", "partial/retrain/uis"} <= set(metrics)
    rep = run_mtu("report", "--parent", run_id, "--tracking-uri", uri, "--out", tmp_path / "rep", cwd=tmp_path)
    assert rep.returncode == 0 and rep.stdout.count("| iamu |") == 2, rep.stdout + rep.stderr

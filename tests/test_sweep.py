"""`mtu sweep` and `mtu compare` end to end on configs/sweep_tiny.yaml (1 and 2 gloo ranks x 2 forget
fractions): one MLflow parent with its child runs in a real sqlite store, a killed cell resumed, the
table and PNGs logged back to the parent, and a re-run that skips every finished cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_mtu

from mtu_dist.errors import UserError
from mtu_dist.studies.sweep import launchers
from mtu_dist.studies.sweep.driver import Sweep, _args
from mtu_dist.studies.sweep.grid import load_grid, plan

GRID = ROOT / "configs" / "sweep_tiny.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


def _grid(tmp_path: Path, **changes) -> Path:
    raw = {**yaml.safe_load(GRID.read_text()), "config": [str(ROOT / "configs" / "tiny.yaml")], **changes}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "change, field",
    [
        ({"axes": {"world_size": [1], "train_size": [40], "forget_fraction": [0.1]}}, "axes.method"),
        (
            {"axes": {"world_size": [0], "train_size": [40], "forget_fraction": [0.1], "method": ["neggrad_plus"]}},
            "axes.world_size",
        ),
        ({"axes": {"train_size": [40], "forget_fraction": [1.5], "method": ["neggrad_plus"]}}, "axes.forget_fraction"),
        ({"axes": {"train_size": [40], "forget_fraction": [0.1], "method": ["no_such_method"]}}, "axes.method"),
        ({"axes": {"train_size": [40, 40], "forget_fraction": [0.1], "method": ["neggrad_plus"]}}, "axes.train_size"),
        ({"launchr": "cpu"}, "launchr"),
        ({"synth": {"height": 4}}, "synth.height"),
        ({"original_world_size": 4}, "original_world_size"),
    ],
)
def test_bad_grid_names_the_field(tmp_path, change, field):
    with pytest.raises(UserError, match=f"field '{field}'"):
        load_grid(_grid(tmp_path, **change))


def test_bad_grid_is_one_clean_line(tmp_path):
    proc = run_mtu("sweep", _grid(tmp_path, launcher="no_such_launcher"), "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "field 'launcher'" in proc.stderr and "no_such_launcher" in proc.stderr


def test_plan_and_launch_commands():
    grid, base = load_grid(GRID)
    cells = plan(grid)
    assert [c.name for c in cells] == [
        "train-n40-w1",
        "neggrad_plus-n40-f0.1-w1",
        "neggrad_plus-n40-f0.1-w2",
        "neggrad_plus-n40-f0.2-w1",
        "neggrad_plus-n40-f0.2-w2",
    ]
    grid.throughput = True
    assert [c.name for c in plan(grid) if c.kind == "train"] == ["train-n40-w1", "train-n40-w2"]
    grid.retrain = True  # a retrain reference per forget fraction, and every unlearning cell scored against it
    cells = plan(grid)
    assert [c.name for c in cells if c.kind == "retrain"] == ["retrain-n40-f0.1-w1", "retrain-n40-f0.2-w1"]
    sw = Sweep(grid, base, Path("/sw"), "sqlite:///x.db", "cpu")
    args = _args(sw, next(c for c in cells if c.name == "neggrad_plus-n40-f0.2-w2"), "synth-indoor", resume=False)
    assert args[args.index("--retrain") + 1] == "/sw/runs/synth-indoor/retrain-n40-f0.2-w1"
    assert args[args.index("--from") + 1] == "/sw/runs/synth-indoor/train-n40-w1"
    assert args[args.index("--request") + 1] == "/sw/requests/n40-f0.2.yaml"
    argv, env = launchers.command("cpu", base, 1, ["train"])
    assert argv[1:] == ["-m", "mtu_dist.cli", "train"] and env == {"ACCELERATE_USE_CPU": "true"}
    argv, _ = launchers.command("cpu", base, 2, ["train"])
    assert argv[1:5] == [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "launch/accelerate/cpu_2proc.yaml"),
    ]
    assert argv[argv.index("--num_processes") + 1] == "2" and argv[-3:] == ["-m", "mtu_dist.cli", "train"]
    argv, env = launchers.command("deepspeed_zero2", base, 1, ["train"])  # DeepSpeed needs its launcher even for 1 rank
    assert argv[argv.index("--config_file") + 1].endswith("deepspeed_zero2.yaml") and env == {}
    argv, _ = launchers.command("torchrun", base, 4, ["train"])
    assert argv[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]


def _children(uri: str, parent: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")


@pytest.mark.slow
def test_two_process_sweep_compare_and_resume(tmp_path):
    out, uri = tmp_path / "sweep", f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = lambda **env: run_mtu("sweep", GRID, "--out", out, "--tracking-uri", uri, cwd=tmp_path, env=env)  # noqa: E731

    # 1. the original's training is killed after step 7: reported, its unlearning cells cannot run, exit non-zero
    first = sweep(MTU_FAULT="train:7")
    assert first.returncode == 2, first.stdout + first.stderr
    assert "train-n40-w1: FAILED (exit 137)" in first.stdout
    assert first.stdout.count("did not finish") == 4 and "5 of 5 cells failed" in first.stderr

    # 2. re-run: the train cell resumes from its epoch checkpoint (step 5), then the 4 unlearning cells run
    second = sweep()
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming from" in (out / "logs" / "train-n40-w1.log").read_text()
    assert second.stdout.count(": done in") == 5
    parent = json.loads((out / "sweep.json").read_text())["parent_run_id"]
    assert json.loads((out / "sweep.json").read_text())["tracking_uri"] == uri
    runs = [r for r in _children(uri, parent) if r.info.status == "FINISHED"]
    by_cell = {r.data.tags["mtu.sweep.cell"]: r for r in runs}
    assert set(by_cell) == {"train-n40-w1", *(f"neggrad_plus-n40-f{f}-w{w}" for f in (0.1, 0.2) for w in (1, 2))}
    for name, r in by_cell.items():  # the 2-rank cells really ran on 2 ranks
        assert r.data.params["world_size"] == r.data.tags["mtu.sweep.world_size"] == name[-1], name
    assert (
        by_cell["neggrad_plus-n40-f0.2-w2"].data.params["request_sha256"]
        != by_cell["neggrad_plus-n40-f0.1-w2"].data.params["request_sha256"]
    )
    # the parent's own charts: each method's mean over its cells, at step 0 (bars in MLflow's chart view)
    from mlflow import MlflowClient

    summary = MlflowClient(uri).get_run(parent).data.metrics
    assert summary["mean/neggrad_plus/cells"] == 4 and summary["mean/train/cells"] == 1
    unlearn_s = [r.data.metrics["time/unlearn_s"] for name, r in by_cell.items() if name.startswith("neggrad_plus")]
    assert summary["mean/neggrad_plus/time_unlearn_s"] == pytest.approx(sum(unlearn_s) / 4)
    assert {m.step for m in MlflowClient(uri).get_metric_history(parent, "mean/neggrad_plus/cells")} == {0}

    # 3. compare: the table, the PNGs, logged to the parent
    report = tmp_path / "report"
    cmp = run_mtu("compare", "--sweep", out, "--out", report, cwd=tmp_path)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    table = (report / "table.md").read_text()
    assert "## Training throughput" in table and "## Unlearning" in table
    assert "samples/s (all ranks) ↑" in table and "cost (s) ↓" in table  # units and directions
    for name in by_cell:
        assert f"| {name} |" in table and f"| {name} |" in cmp.stdout
    pngs = ["scaling.png", "cost_vs_forget.png"] + (["uis_vs_forget.png"] if "| UIS ↓ |" in table else [])
    for name in pngs:
        data = (report / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name
    from mlflow import MlflowClient

    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent, "report")}
    assert {f"report/{n}" for n in ["table.md", "cells.csv", *pngs]} <= logged

    from mtu_dist.reporting.compare import find_parent

    client = MlflowClient(uri)
    assert find_parent(client, parent=None, experiment="synth-indoor", uri=uri).info.run_id == parent
    with pytest.raises(UserError, match="--parent nope: no such run"):
        find_parent(client, parent="nope", experiment=None, uri=uri)

    # 4. re-run: every cell is finished, nothing runs, no new child run appears
    before = len(_children(uri, parent))
    third = sweep()
    assert third.returncode == 0, third.stdout + third.stderr
    assert third.stdout.count("skipped (finished") == 5 and "running" not in third.stdout
    assert len(_children(uri, parent)) == before
    assert json.loads((out / "sweep.json").read_text())["parent_run_id"] == parent

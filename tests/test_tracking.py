"""MLflow as a comparison tool: final scores in the form MLflow charts as bars, and a sqlite store that
keeps its artifacts when its folder is moved (read through the MLflow client and through `mtu server`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, ROOT, _free_port, read_json, run_mtu
from test_mlflow_server import _wait_healthy

TINY = ROOT / "configs" / "tiny.yaml"


def test_scores_are_one_point_at_step_zero(tmp_path):
    """MLflow's chart view draws a metric whose latest point has step >= 1 as a line, any other as bars
    (one per run): scores are one point at step 0, curves keep their steps."""
    from mlflow import MlflowClient

    from mtu_dist.reporting.tracking import SCORE_STEP, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(enabled=True, uri=uri, experiment="e", run_name="r")
    for step in (1, 2, 3):
        t.log_metrics({"loss/total": 1.0 / step}, step)
    t.log_scores({"uis": 0.25, "eval/val/seg/miou": 0.5})
    t.finish()
    client = MlflowClient(uri)
    assert SCORE_STEP == 0
    for key, value in (("uis", 0.25), ("eval/val/seg/miou", 0.5)):
        assert [(m.step, m.value) for m in client.get_metric_history(t.run_id, key)] == [(0, value)]
    assert [m.step for m in client.get_metric_history(t.run_id, "loss/total")] == [1, 2, 3]


def test_experiments_open_in_the_model_training_view(tmp_path):
    """MLflow's UI shows an experiment without `mlflow.experimentKind` in its GenAI (traces) view, where
    runs, charts and the compare view are one click away; a Tracker's new experiment carries the tag."""
    from mlflow import MlflowClient

    from mtu_dist.reporting.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(enabled=True, uri=uri, experiment="e", run_name="r").finish()
    Tracker(enabled=True, uri=uri, experiment="e", run_name="r2").finish()  # an existing experiment: reused
    exps = [e for e in MlflowClient(uri).search_experiments() if e.name == "e"]
    assert len(exps) == 1 and exps[0].tags.get("mlflow.experimentKind") == "custom_model_development"


def _run_dir(tmp: Path, store: Path, tiny_root: Path) -> tuple[str, dict]:
    """A tiny `mtu train` into `store` (run from another folder), then `mtu eval` of its model."""
    uri = f"sqlite:///{store / 'mlflow.db'}"
    common = ["--set", f"data.root={tiny_root}", "--set", "data.dataset=synth-indoor", "--tracking-uri", uri]
    run_mtu("train", "--config", TINY, *common, "--set", f"out={tmp / 'runs'}", "--name", "orig", cwd=tmp, check=True)
    final = tmp / "runs" / "synth-indoor" / "orig" / "final"
    run_mtu("eval", "--config", TINY, "--ckpt", final.parent, *common, cwd=tmp, check=True)
    return uri, read_json(final / "metrics.json")


def _serve(store: Path, cwd: Path):
    port = _free_port()
    log = cwd / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [
                str(BIN / "mtu"),
                "server",
                "--store",
                f"sqlite:///{store / 'mlflow.db'}",
                "--artifacts",
                str(store / "mlartifacts"),
                "--port",
                str(port),
            ],
            cwd=cwd,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _wait_healthy(proc, f"http://127.0.0.1:{port}", log)
    return proc, f"http://127.0.0.1:{port}", log


@pytest.mark.slow
def test_moved_store_keeps_its_artifacts(tiny_root, tmp_path):
    """Runs logged to store/mlflow.db, the folder moved elsewhere: `mtu server` on the moved store serves
    every run's artifacts, and from then on a plain MLflow client (any current directory) reads them too.
    Scores of the eval run are step-0 points (bars); the training curve keeps its steps."""
    from mlflow import MlflowClient

    store = tmp_path / "store"
    store.mkdir()
    uri, report = _run_dir(tmp_path, store, tiny_root)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("synth-indoor")
    runs = {r.data.tags["mtu.command"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"train", "eval"}
    assert runs["train"].info.artifact_uri.startswith((store / "mlartifacts").as_uri())
    assert min(m.step for m in client.get_metric_history(runs["train"].info.run_id, "loss/total")) == 1
    for key in runs["eval"].data.metrics:
        assert [m.step for m in client.get_metric_history(runs["eval"].info.run_id, key)] == [0], key

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(store, moved)
    proc, http, log = _serve(moved, tmp_path)
    try:
        assert "the store was moved" in log.read_text()
        served = MlflowClient(http)
        for command, run in runs.items():
            assert served.list_artifacts(run.info.run_id), command
        got = served.download_artifacts(runs["train"].info.run_id, "metrics.json", str(tmp_path / "dl-http"))
        assert json.loads(Path(got).read_text()) == report
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    # a plain client on the moved store, from a folder that is neither the old nor the new one
    script = (
        "import sys, json; from mlflow import MlflowClient; c = MlflowClient(sys.argv[1]); r = c.get_run(sys.argv[2]); "
        "print(json.dumps([r.info.artifact_uri, sorted(a.path for a in c.list_artifacts(sys.argv[2])), "
        "open(c.download_artifacts(sys.argv[2], 'metrics.json', sys.argv[3])).read()]))"
    )
    out = subprocess.run(
        [
            str(BIN / "python"),
            "-c",
            script,
            f"sqlite:///{moved / 'mlflow.db'}",
            runs["train"].info.run_id,
            str(tmp_path / "dl-plain"),
        ],
        cwd=tmp_path / "elsewhere",
        capture_output=True,
        text=True,
        check=True,
    )
    artifact_uri, paths, text = json.loads(out.stdout)
    assert artifact_uri.startswith((moved / "mlartifacts").as_uri()) and {"config.yaml", "metrics.json"} <= set(paths)
    assert json.loads(text) == report
    assert not (tmp_path / "store").exists()

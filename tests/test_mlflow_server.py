"""Tracking against a real MLflow server over HTTP: params, per-step metrics, eval metrics, artifacts.
The server is the project's own (`mtu server`), started with its defaults: it must listen on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import BIN, ROOT, _free_port, read_json, run_mtu

from mtu_dist.config import load_config
from mtu_dist.data.manifest import load_manifest
from mtu_dist.data.stream import BatchLoader

pytestmark = pytest.mark.slow

TINY = ROOT / "configs" / "tiny.yaml"


def _wait_healthy(proc: subprocess.Popen, uri: str, log: Path, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"mlflow server not healthy after {limit:.0f} s:\n{log.read_text()[-4000:]}")


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port` (from /proc/net/tcp and tcp6; state 0A = LISTEN)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:
                found.add(
                    socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1])
                    if len(addr) == 8
                    else "::"
                    if int(addr, 16) == 0
                    else f"v6:{addr}"
                )
    return found


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [
                str(BIN / "mtu"),
                "server",
                "--store",
                f"sqlite:///{tmp_path / 'srv.db'}",
                "--artifacts",
                str(tmp_path / "art"),
                "--port",
                str(port),
            ],
            cwd=tmp_path,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_healthy(proc, uri, log)
        assert listening_addresses(port) == {"127.0.0.1"}, "the server must bind 127.0.0.1 by default"
        yield uri
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_train_logs_to_mlflow_server(tiny_root, tmp_path, mlflow_server):
    from mlflow import MlflowClient

    uri, out = mlflow_server, tmp_path / "runs"
    run_mtu(
        "train",
        "--config",
        TINY,
        "--set",
        f"data.root={tiny_root}",
        "--set",
        "data.dataset=synth-indoor",
        "--set",
        f"out={out}",
        "--tracking-uri",
        uri,
        cwd=tmp_path,
        check=True,
        timeout=300,
    )
    final = out / "synth-indoor" / "original" / "final"
    report = read_json(final / "metrics.json")

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("synth-indoor")
    assert exp is not None, "experiment named after the dataset was not created"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == report["run"]["mlflow_run_id"]
    assert run.info.run_name == "original"
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("mtu.command") == "train"

    params = run.data.params
    for key in ("git_commit", "world_size", "request_sha256", "train.lr"):
        assert key in params, f"param {key} missing"
    assert params["git_commit"]
    assert params["world_size"] == "1"
    assert params["request_sha256"] == "none"

    cfg = load_config([str(TINY)], [f"data.root={tiny_root}", "data.dataset=synth-indoor"])
    assert float(params["train.lr"]) == cfg.train.lr
    loader = BatchLoader(
        load_manifest(tiny_root / "synth-indoor"),
        "train",
        rank=0,
        world=1,
        local_batch=cfg.train.global_batch,
        workers=cfg.data.workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.seed,
    )
    expected_steps = sum(loader.steps_per_epoch(e) for e in range(cfg.train.epochs))
    assert expected_steps > cfg.train.epochs  # several steps per epoch, so one point per epoch would show

    history = client.get_metric_history(run.info.run_id, "loss/total")
    assert sorted(m.step for m in history) == list(range(1, expected_steps + 1))
    metrics = run.data.metrics
    for key in ("eval/val/seg/miou", "eval/val/depth/delta1", "eval/retain/seg/miou", "lr", "grad_norm"):
        assert key in metrics, f"metric {key} missing"
    assert metrics["eval/val/seg/miou"] == pytest.approx(report["splits"]["val"]["seg"]["miou"])

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json"} <= artifacts, artifacts
    got = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / "dl")))
    assert json.loads(got.read_text()) == report
    # stored through the server's artifact proxy, not written beside the run
    assert list((tmp_path / "art").rglob("metrics.json"))
    assert not (tmp_path / "mlartifacts").exists() and not (tmp_path / "mlflow.db").exists()

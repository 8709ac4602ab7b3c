"""An unlearning run as a compliance action: it survives a crash without changing its result, and its
ledger proves (`mtu audit`) that no forget pair supervised it.

Faults: one rank is killed hard (`MTU_FAULT`: os._exit(137), like kill -9) at a step drawn by a seeded
RNG; the launch must fail, not hang (a subprocess timeout bounds it), and `--resume` must end
bit-identical (torch.equal on every tensor; CPU, deterministic mode) to an uninterrupted run, with an
equal ledger. Train at 1 rank is covered in test_runner.py; here retrain (the same loop as train) and
unlearn at 2 ranks, and a 1-rank unlearn killed and resumed on its way to the leak audit.
Leaks: a real one, through the real loop (`MTU_TEST_LEAK`), must fail the audit; clean runs pass it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, accelerate_launch, run_many, run_mtu
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
TINY = ROOT / "configs" / "tiny.yaml"
HANG_S = 180  # a killed launch still running after this long is hanging


def kill_step(phase: str, world: int, first: int, last: int) -> int:
    """The step after which one rank dies: seeded, so a failure reproduces."""
    return random.Random(f"mtu-faults-{phase}-{world}").randint(first, last)


def _common(tiny_root, tmp: Path) -> list:
    return [
        "--config",
        TINY,
        "--set",
        f"data.root={tiny_root}",
        "--set",
        "data.dataset=synth-indoor",
        "--set",
        f"out={tmp / 'runs'}",
        "--set",
        "tracking.enabled=false",
        "--set",
        "data.workers=1",
    ]


def _launch2(args: list, tmp: Path, env=None, check=True):
    return accelerate_launch(["-m", "mtu_dist.cli", *args], nproc=2, cwd=tmp, env=env, check=check, timeout=HANG_S)


def _crash(args: list, name: str, phase: str, step: int, tmp: Path) -> Path:
    run = tmp / "runs" / "synth-indoor" / name
    crashed = _launch2([*args, "--name", name], tmp, env={"MTU_FAULT": f"{phase}:{step}:1"}, check=False)
    assert crashed.returncode != 0, f"the run survived a kill at {phase} step {step}:\n{crashed.stdout[-2000:]}"
    assert not (run / "final").exists() and list((run / "checkpoints").glob("step-*")), "no resume point"
    return run


def assert_same_run(a: Path, b: Path) -> None:
    pa, pb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa), [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert json.loads((a / "ledger.json").read_text()) == json.loads((b / "ledger.json").read_text())


@pytest.fixture(scope="module")
def two_rank_runs(tiny_root, tmp_path_factory):
    """At 2 ranks: an uninterrupted retrain (the reference for the retrain kill, and the unlearning origin)
    and an uninterrupted iamu unlearn from it, in one launch; then each killed at a seeded step (a launch
    each), and both resumed in one launch (every rank runs both resumes, one after the other)."""
    tmp = tmp_path_factory.mktemp("compliance")
    request = tmp / "full.yaml"
    run_mtu(
        "forget",
        "make",
        "--dataset",
        tiny_root / "synth-indoor",
        "--fraction",
        0.2,
        "--setting",
        "full",
        "--out",
        request,
        check=True,
    )
    retrain = [
        "retrain",
        *_common(tiny_root, tmp),
        "--request",
        request,
        "--set",
        "train.epochs=1",
        "--set",
        "train.checkpoint_every=2",
    ]
    origin = tmp / "runs" / "synth-indoor" / "straight"  # any trained checkpoint serves as the original here
    # the retrain never saw `full.yaml`'s pairs (a lineage from it starts with them forgotten): the
    # unlearning runs honour another request, disjoint from it
    request = tmp / "second.yaml"
    run_mtu(
        "forget",
        "make",
        "--dataset",
        tiny_root / "synth-indoor",
        "--fraction",
        0.2,
        "--setting",
        "full",
        "--seed",
        1,
        "--exclude",
        tmp / "full.yaml",
        "--out",
        request,
        check=True,
    )
    # iamu: its setup consumes retain batches (replayed on resume) and it runs its own collectives.
    # The signal engine is fixed: `auto` picks by timing, per rank.
    unlearn = [
        "unlearn",
        *_common(tiny_root, tmp),
        "--request",
        request,
        "--from",
        origin,
        "--method",
        "iamu",
        "--set",
        "unlearn.options.subspace_batches=2",
        "--set",
        "unlearn.signal_engine=sequential",
        "--set",
        "unlearn.steps=8",
        "--set",
        "unlearn.checkpoint_every=3",
    ]
    run_many(
        [[*retrain, "--name", "straight"], [*unlearn, "--name", "unlearn-straight"]],
        tmp,
        nproc=2,
        tag="straight",
        timeout=HANG_S,
    )
    crashed = [
        _crash(retrain, "retrain-crashed", "retrain", kill_step("retrain", 2, 3, 5), tmp),  # 6 steps, resume
        _crash(unlearn, "unlearn-crashed", "unlearn", kill_step("unlearn", 2, 4, 7), tmp),
    ]  # points every 2 / 3
    resumed = run_many(
        [[*retrain, "--name", "retrain-crashed", "--resume"], [*unlearn, "--name", "unlearn-crashed", "--resume"]],
        tmp,
        nproc=2,
        tag="resume",
        timeout=HANG_S,
    )["_proc"]
    for run in crashed:
        assert f"resuming from {run / 'checkpoints'}" in resumed.stdout, resumed.stdout[-2000:]
    return tmp, request, origin


def test_retrain_killed_rank_resumes_bit_identical(two_rank_runs):
    tmp, _, straight = two_rank_runs
    assert_same_run(straight / "final", tmp / "runs/synth-indoor/retrain-crashed/final")


def test_unlearn_killed_rank_resumes_bit_identical_and_passes_audit(two_rank_runs):
    tmp, _, origin = two_rank_runs
    resumed = tmp / "runs/synth-indoor/unlearn-crashed/final"
    assert_same_run(tmp / "runs/synth-indoor/unlearn-straight/final", resumed)

    proc = run_mtu("audit", resumed.parent, origin, cwd=tmp, check=True)  # the resumed unlearn run and the retrain
    assert proc.stdout.count("leaks: 0") == 2, proc.stdout
    for run in (resumed.parent, origin):
        audit = json.loads((run / "final" / "audit.json").read_text())
        assert audit["passed"] and audit["leak_count"] == 0 and audit["forget_pairs"] == 8 * 3
    unlearned = json.loads((resumed / "audit.json").read_text())
    assert unlearned["forget_pairs_consumed"] == 24 and set(unlearned["roles"]) == {"forget", "retain"}
    assert set(json.loads((origin / "final" / "audit.json").read_text())["roles"]) == {"retain"}


def test_audit_catches_a_deliberate_leak(two_rank_runs, tiny_root, tmp_path):
    """MTU_TEST_LEAK leaves the request's first forget pair in the retain stream of a real run, here a
    1-rank run killed and resumed on the way (the leak must survive the resume in the ledger)."""
    from mlflow import MlflowClient

    _, request, origin = two_rank_runs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "unlearn",
        *_common(tiny_root, tmp_path),
        "--set",
        "tracking.enabled=true",
        "--tracking-uri",
        uri,
        "--request",
        request,
        "--from",
        origin,
        "--method",
        "finetune",
        "--name",
        "leaky",
        "--set",
        "unlearn.checkpoint_every=2",
    ]
    step = kill_step("unlearn", 1, 3, 5)
    crashed = run_mtu(*args, cwd=tmp_path, env={"MTU_TEST_LEAK": "1", "MTU_FAULT": f"unlearn:{step}"}, timeout=HANG_S)
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    p = run_mtu(*args, "--resume", cwd=tmp_path, env={"MTU_TEST_LEAK": "1"}, check=True, timeout=HANG_S)
    first = yaml.safe_load(request.read_text())["entries"][0]["id"]
    assert f"{first}|seg is deliberately left" in p.stderr and "resuming from" in p.stdout

    run = tmp_path / "runs" / "synth-indoor" / "leaky"
    proc = run_mtu("audit", run, "--tracking-uri", uri, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("mtu: error:")]
    assert len(error) == 1 and "audit FAILED" in error[0] and f"reached role 'retain': {first}|seg" in error[0]
    audit = json.loads((run / "final" / "audit.json").read_text())
    assert not audit["passed"] and audit["leak_count"] == 1
    assert [p["pair"] for p in audit["leaks"]["retain"]] == [f"{first}|seg"]
    # the summary is an artifact of the run's own MLflow run
    run_id = json.loads((run / "final" / "metrics.json").read_text())["run"]["mlflow_run_id"]
    client = MlflowClient(uri)
    assert "audit.json" in {a.path for a in client.list_artifacts(run_id)}
    assert client.get_run(run_id).data.tags["mtu.audit"] == "LEAK"

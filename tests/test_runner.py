"""The runner end to end on tiny data: 1 vs 2 ranks, resume, partial retrain, baselines, guard."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, accelerate_launch, run_many, run_mtu
from safetensors.torch import load_file

from mtu_dist.compliance.ledger import flat_counts

pytestmark = pytest.mark.slow
TINY = str(ROOT / "configs" / "tiny.yaml")


def _common(tiny_root, tmp, dataset="synth-indoor"):
    return [
        "--config",
        TINY,
        "--set",
        f"data.root={tiny_root}",
        "--set",
        f"data.dataset={dataset}",
        "--set",
        f"out={tmp / 'runs'}",
        "--tracking-uri",
        f"sqlite:///{tmp / 'mlflow.db'}",
    ]


def _history(db: Path, run_name: str, key: str) -> list[float]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("synth-indoor")
    run = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'")[0]
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def _ledger(final: Path) -> dict[str, int]:
    """ledger.json as `role|instance|task -> uses`."""
    return flat_counts(json.loads((final / "ledger.json").read_text()))


def test_two_ranks_match_one_rank(tiny_root, tmp_path):
    # 1 rank x 2 workers (global batch 8) vs 2 gloo ranks x 1 worker (4 each): same global batches.
    run_mtu(
        "train",
        *_common(tiny_root, tmp_path),
        "--set",
        "data.workers=2",
        "--name",
        "one",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
        check=True,
    )
    two = ["-m", "mtu_dist.cli", "train", *_common(tiny_root, tmp_path), "--set", "data.workers=1", "--name", "two"]
    out = accelerate_launch(two, nproc=2, cwd=tmp_path)
    db = tmp_path / "mlflow.db"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("synth-indoor")
    two_run = client.search_runs([exp.experiment_id], "attributes.run_name = 'two'")[0]
    assert two_run.data.params["world_size"] == "2", out.stdout  # really two ranks
    a, b = _history(db, "one", "loss/total"), _history(db, "two", "loss/total")
    assert len(a) == len(b) == 12  # 5 shards of 8 over 2 slots: 24|16 samples -> 6 chunks of 4, x 2 epochs
    # float32; DDP sums gradients in another order -> agree to 1e-4 relative over 12 Adam steps
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(x), (a, b)
    pa = load_file(tmp_path / "runs/synth-indoor/one/final/model.safetensors")
    pb = load_file(tmp_path / "runs/synth-indoor/two/final/model.safetensors")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-3, atol=1e-5)


def test_resume_after_kill_is_bit_identical(tiny_original, tiny_root, tmp_path):
    # the straight run is the shared original: the same config, trained uninterrupted (and without resume
    # points, so writing them every 3 steps must not change the result either)
    common = [*_common(tiny_root, tmp_path), "--set", "train.checkpoint_every=3"]
    crashed = run_mtu("train", *common, "--name", "crashed", cwd=tmp_path, env={"MTU_FAULT": "train:7"})
    assert crashed.returncode == 137 and not (tmp_path / "runs/synth-indoor/crashed/final").exists()
    run_mtu("train", *common, "--name", "crashed", "--resume", cwd=tmp_path, check=True)
    a = load_file(tiny_original / "final/model.safetensors")
    b = load_file(tmp_path / "runs/synth-indoor/crashed/final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the resumed ledger is cumulative: every pair seen once per epoch, as in the straight run
    la = _ledger(tiny_original / "final")
    lb = _ledger(tmp_path / "runs/synth-indoor/crashed/final")
    assert la == lb and set(la.values()) == {2}


def test_an_iamu_run_on_the_kept_pairs_resumes_bit_identical(tiny_original, tiny_root, tmp_path):
    """iamu with `kept_on_forget`: the forget batches carry the kept supervision (recorded as retain pairs)
    and must restart at the same place, with the same ledger, after a kill."""
    req = tmp_path / "partial.yaml"
    made = ["--fraction", 0.2, "--setting", "partial", "--tasks", "seg", "--out", req]
    run_mtu("forget", "make", "--dataset", tiny_root / "synth-indoor", *made, check=True)
    common = [*_common(tiny_root, tmp_path), "--request", req, "--from", tiny_original, "--method", "iamu"]
    for item in (
        "unlearn.options.kept_on_forget=span",
        "unlearn.options.subspace_batches=2",
        "unlearn.signal_engine=sequential",
        "unlearn.lr=0.0001",  # far from the stop rule's level: the run lasts its 6 steps
        "unlearn.checkpoint_every=2",
    ):
        common += ["--set", item]
    run_mtu("unlearn", *common, "--name", "straight", cwd=tmp_path, check=True)
    crashed = run_mtu("unlearn", *common, "--name", "crashed", cwd=tmp_path, env={"MTU_FAULT": "unlearn:5"})
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    run_mtu("unlearn", *common, "--name", "crashed", "--resume", cwd=tmp_path, check=True)
    a = load_file(tmp_path / "runs/synth-indoor/straight/final/model.safetensors")
    b = load_file(tmp_path / "runs/synth-indoor/crashed/final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = _ledger(tmp_path / "runs/synth-indoor/straight/final")
    assert la == _ledger(tmp_path / "runs/synth-indoor/crashed/final")
    import yaml

    forgotten = {e["id"] for e in yaml.safe_load(req.read_text())["entries"]}
    kept = {k: n for k, n in la.items() if k.startswith("retain|") and k.split("|")[1] in forgotten}
    assert {k.split("|")[2] for k in kept} == {"depth", "normal"}  # the kept pairs of the forget batches
    # 6 steps of 4 forget instances (of 8): every draw uses both kept tasks
    assert sum(kept.values()) >= 6 * 4 * 2


def test_partial_retrain_never_sees_forget_pairs(tiny_root, tmp_path):
    req = tmp_path / "partial.yaml"
    run_mtu(
        "forget",
        "make",
        "--dataset",
        tiny_root / "synth-indoor",
        "--fraction",
        0.2,
        "--setting",
        "partial",
        "--tasks",
        "seg",
        "--out",
        req,
        check=True,
    )
    run_mtu("retrain", *_common(tiny_root, tmp_path), "--request", req, "--name", "rt", cwd=tmp_path, check=True)
    final = tmp_path / "runs/synth-indoor/rt/final"
    ledger = _ledger(final)
    import yaml

    forgotten = {e["id"] for e in yaml.safe_load(req.read_text())["entries"]}
    assert len(forgotten) == 8
    counted = {"forget": 0, "kept": 0}
    for key, n in ledger.items():
        _, inst, task = key.split("|")
        assert not (inst in forgotten and task == "seg"), key  # a forget pair was consumed
        if inst in forgotten:
            counted["kept"] += n
    assert counted["kept"] == 8 * 2 * 2  # 8 instances x 2 kept tasks x 2 epochs
    assert len(ledger) == 40 * 3 - 8
    metrics = json.loads((final / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"forget", "forget_kept", "retain", "val"}
    assert set(metrics["splits"]["forget"]) == {"seg"} and set(metrics["splits"]["forget_kept"]) == {"depth", "normal"}


EXPECTED_ROLES = {"finetune": {"retain"}, "grad_ascent": {"forget"}, "neggrad_plus": {"forget", "retain"}}


@pytest.fixture(scope="module")
def unlearned(tiny_original, tiny_root, tmp_path_factory):
    """The three loss-based baselines and a diverging grad_ascent run on one full request, from the shared
    original, in one process (start-up paid once)."""
    tmp = tmp_path_factory.mktemp("unlearn")
    req = tmp / "full.yaml"
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
        req,
        check=True,
    )
    unlearn = ["unlearn", *_common(tiny_root, tmp), "--request", req, "--from", tiny_original]
    runs = [[*unlearn, "--method", m, "--name", m, "--set", "unlearn.lr=0.01"] for m in sorted(EXPECTED_ROLES)]
    runs.append(
        [
            *unlearn,
            "--method",
            "grad_ascent",
            "--name",
            "diverging",
            "--set",
            "unlearn.lr=1.0",
            "--set",
            "unlearn.diverge_factor=1.5",
            "--set",
            "unlearn.steps=30",
        ]
    )
    proc = run_many(runs, tmp)["_proc"]
    return tmp, req, proc.stdout + proc.stderr


@pytest.mark.parametrize("method", sorted(EXPECTED_ROLES))
def test_baselines_run_and_respect_masks(unlearned, tiny_original, method):
    tmp, req, _ = unlearned
    final = tmp / "runs/synth-indoor" / method / "final"
    import yaml

    forgotten = {e["id"] for e in yaml.safe_load(req.read_text())["entries"]}
    ledger = _ledger(final)
    assert {k.split("|")[0] for k in ledger} == EXPECTED_ROLES[method]
    for key in ledger:  # forget steps use only forget pairs; retain steps never do
        role, inst, _ = key.split("|")
        assert (inst in forgotten) == (role == "forget"), key
    metrics = json.loads((final / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"forget", "retain", "val"}
    assert metrics["stop_reason"] == "budget"
    if method == "grad_ascent":  # ascent must lower the fit on the forget pairs (the original's evaluation on
        sha = hashlib.sha256(req.read_bytes()).hexdigest()[:12]  # this request, cached beside it by unlearn)
        ref = json.loads((tiny_original / "final" / f"metrics-{sha}.json").read_text())
        assert metrics["splits"]["forget"]["seg"]["miou"] < ref["splits"]["forget"]["seg"]["miou"]


def test_divergence_guard_restores_last_good_state(unlearned):
    tmp, _, output = unlearned
    assert output.count("mtu: unlearning stopped: diverged at step") == 1  # the lr=1.0 run, and only that one
    final = tmp / "runs/synth-indoor/diverging/final"
    report = json.loads((final / "metrics.json").read_text())
    assert report["stop_reason"].startswith("diverged at step")
    params = load_file(final / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in params.values())


def test_lr_growth_ramps_the_step_size_the_optimizer_uses(tiny_original, tiny_root, tmp_path):
    """unlearn.lr_growth: the step size at step t is lr * growth**(t - 1), set on the optimizer before the
    step (logged as unlearn/lr); growth 1 (the default) leaves it at lr."""
    import torch

    from mtu_dist.distributed.stepper import PlainStepper

    p = torch.nn.Parameter(torch.ones(2))
    stepper = PlainStepper([p], torch.optim.SGD([p], lr=0.1), clip=10.0)
    stepper.set_lr(0.3)
    p.grad = torch.ones(2)
    stepper.step()
    assert p.detach().tolist() == pytest.approx([0.7, 0.7])  # the step used the new rate

    req = tmp_path / "r.yaml"
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
        req,
        check=True,
    )
    base = ["unlearn", *_common(tiny_root, tmp_path), "--request", req, "--from", tiny_original]
    for name, growth in (("ramp", 1.5), ("flat", 1.0)):
        run_mtu(
            *base,
            "--method",
            "neggrad_plus",
            "--name",
            name,
            "--set",
            "unlearn.lr=0.01",
            "--set",
            f"unlearn.lr_growth={growth}",
            "--set",
            "unlearn.steps=3",
            cwd=tmp_path,
            check=True,
        )
    assert _history(tmp_path / "mlflow.db", "ramp", "unlearn/lr") == pytest.approx([0.01, 0.015, 0.0225])
    assert _history(tmp_path / "mlflow.db", "flat", "unlearn/lr") == pytest.approx([0.01, 0.01, 0.01])

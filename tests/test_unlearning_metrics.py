"""Unlearning metrics: UIS, gap, Delta_m by hand; the MIA on synthetic losses and on a really overfit
model; `mtu unlearn --retrain` and `mtu score` writing the `unlearning` block to metrics.json and MLflow."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import run_many, run_mtu

from mtu_dist.evaluation.scoring import request_tasks
from mtu_dist.evaluation.unlearning_metrics import (
    PRIMARY_PERCENT,
    attack_auc,
    cost_ratio,
    delta_m,
    gap_to_retrain,
    mia_auc,
    split_val,
    uis,
)
from mtu_dist.tasks import TASKS


def _m(seg=None, depth=None, normal=None) -> dict:
    """A split's metrics with the given primary values."""
    out = {}
    if seg is not None:
        out["seg"] = {"miou": seg}
    if depth is not None:
        out["depth"] = {"delta1": depth}
    if normal is not None:
        out["normal"] = {"within_30": normal}
    return out


# --------------------------------------------------------------------------
# metric-based scores, by hand
# --------------------------------------------------------------------------


def test_uis_full_setting_by_hand():
    original = {"val": _m(0.5, 0.8), "forget": _m(0.9, 0.95)}
    unlearned = {"val": _m(0.4, 0.8), "forget": _m(0.5, 0.6)}
    got = uis(original, unlearned, "full", ["seg", "depth"])
    # seg: 1/2 (|0.5-0.4|/0.5 + |0.5-0.5|/0.5) = 0.1; depth: 1/2 (0 + |0.8-0.6|/0.8) = 0.125
    assert got["per_task"]["seg"] == pytest.approx(0.1, abs=1e-12)
    assert got["per_task"]["depth"] == pytest.approx(0.125, abs=1e-12)
    assert got["mean"] == pytest.approx(0.1125, abs=1e-12)


def test_uis_partial_setting_kept_tasks_by_hand():
    # target seg; kept depth and normal: their forget term is measured on forget_kept against the original's
    original = {"val": _m(0.5, 0.8, 60.0), "forget": _m(seg=0.9), "forget_kept": _m(depth=0.9, normal=80.0)}
    unlearned = {"val": _m(0.45, 0.72, 60.0), "forget": _m(seg=0.55), "forget_kept": _m(depth=0.81, normal=60.0)}
    got = uis(original, unlearned, "partial", ["seg"])
    # seg: 1/2 (0.05/0.5 + 0.05/0.5) = 0.1
    # depth: 1/2 (0.08/0.8 + |0.9-0.81|/0.9) = 1/2 (0.1 + 0.1) = 0.1
    # normal: 1/2 (0 + 20/80) = 0.125
    assert got["per_task"] == pytest.approx({"seg": 0.1, "depth": 0.1, "normal": 0.125}, abs=1e-12)
    assert got["mean"] == pytest.approx(0.325 / 3, abs=1e-12)
    # the kept formula matters: with the target formula depth would read 1/2 (0.1 + |0.8-0.81|/0.8)
    assert uis(original, unlearned, "partial", ["seg", "depth"])["per_task"]["depth"] != pytest.approx(0.1)


def test_uis_zero_reference_is_undefined_not_infinite():
    got = uis({"val": _m(0.0, 0.5)}, {"val": _m(0.1, 0.5), "forget": _m(0.1, 0.5)}, "full", ["seg", "depth"])
    assert got["per_task"]["seg"] is None and got["mean"] == pytest.approx(0.0)


def test_gap_to_retrain_in_percentage_points_by_hand():
    unlearned = {"forget": _m(0.30, 0.50, 40.0), "val": _m(0.20, 0.60, 50.0)}
    retrain = {"forget": _m(0.25, 0.50, 44.0), "val": _m(0.22, 0.58, 50.0)}
    got = gap_to_retrain(unlearned, retrain)
    # pp: forget 5, 0, 4; val 2, 2, 0 -> mean 13/6
    assert got["per_split"]["forget"] == pytest.approx({"seg": 5.0, "depth": 0.0, "normal": 4.0}, abs=1e-9)
    assert got["mean"] == pytest.approx(13 / 6, abs=1e-9)
    assert set(PRIMARY_PERCENT) == set(TASKS)  # every task has a unit


def test_delta_m_by_hand_signs_follow_metric_direction():
    original = {
        "val": {"seg": {"miou": 0.5, "pixel_acc": 0.8}, "depth": {"abs_err": 0.2, "rel_err": 0.1, "delta1": 0.9}},
        "retain": {"seg": {"miou": 0.6, "pixel_acc": 0.9}},
    }
    unlearned = {
        "val": {"seg": {"miou": 0.45, "pixel_acc": 0.8}, "depth": {"abs_err": 0.3, "rel_err": 0.1, "delta1": 0.9}},
        "retain": {"seg": {"miou": 0.66, "pixel_acc": 0.9}},
    }
    got = delta_m(original, unlearned)
    # val: seg mean(-10%, 0) = -5%; depth mean(-50% (error up), 0, 0) = -16.67%; over tasks -10.83%
    assert got["val"] == pytest.approx((-5.0 - 50.0 / 3) / 2, abs=1e-9)
    assert got["retain"] == pytest.approx(5.0, abs=1e-9)  # mean(+10%, 0)
    assert got["mean"] == pytest.approx((got["val"] + 5.0) / 2, abs=1e-12)


def test_cost_ratio():
    assert cost_ratio(3.0, 12.0) == 0.25
    assert cost_ratio(3.0, None) is None and cost_ratio(3.0, 0.0) is None


def test_request_tasks_read_off_the_splits():
    assert request_tasks({"forget": _m(1, 1, 1), "val": {}}) == ("full", ["seg", "depth", "normal"])
    assert request_tasks({"forget": _m(seg=1), "forget_kept": _m(depth=1), "val": {}}) == ("partial", ["seg"])


# --------------------------------------------------------------------------
# MIA on synthetic losses
# --------------------------------------------------------------------------


def _records(prefix: str, n: int, rng, scale: float, tasks=("seg", "depth")) -> list:
    return [(f"{prefix}{i:04d}", t, float(rng.exponential(scale))) for i in range(n) for t in tasks]


def test_attack_auc_separated_vs_identical_distributions():
    rng = np.random.default_rng(1)
    member, nonmember = rng.normal(0, 1, (400, 2)), rng.normal(3, 1, (400, 2))
    far = attack_auc(member, nonmember, rng.normal(0, 1, (1000, 2)), rng.normal(3, 1, (1000, 2)))
    assert far > 0.99  # 3 sigma apart on two features: the classes barely overlap
    same = attack_auc(member, nonmember, rng.normal(3, 1, (1000, 2)), rng.normal(3, 1, (1000, 2)))
    # identical query groups, 1000 each: the AUC's null sd is sqrt(2001 / (12 * 1000^2)) = 0.013; 0.05 ~ 4 sd
    assert abs(same - 0.5) < 0.05


def test_mia_auc_members_low_loss_and_record_order_irrelevant():
    rng = np.random.default_rng(2)
    losses = {
        "retain": _records("train/r", 200, rng, 0.1),
        "forget": _records("train/f", 200, rng, 0.1),
        "val": _records("val/", 400, rng, 1.0),
    }
    got = mia_auc(losses, ["seg", "depth", "normal"])  # normal: no instance has it -> the column is dropped
    assert got["mia_auc"] > 0.9 and got["mia_auc_target"] is None
    assert got["mia_counts"] == {"member": 200, "nonmember": 200, "forget": 200, "heldout": 200}
    shuffled = {sp: [recs[i] for i in rng.permutation(len(recs))] for sp, recs in losses.items()}
    assert mia_auc(shuffled, ["seg", "depth", "normal"]) == got  # gathered in another rank order: same split, same AUC
    forgotten = {**losses, "forget": _records("train/f", 200, rng, 1.0)}  # forget now looks like val
    assert abs(mia_auc(forgotten, ["seg", "depth"])["mia_auc"] - 0.5) < 0.1  # null sd 0.029 at 200 x 200


def test_mia_auc_partial_target_columns_and_missing_tasks():
    rng = np.random.default_rng(3)
    # forgotten instances: seg (the target) unseen-like, depth (kept) member-like, given in forget_kept
    losses = {
        "retain": _records("train/r", 200, rng, 0.1),
        "val": _records("val/", 400, rng, 1.0),
        "forget": _records("train/f", 200, rng, 1.0, tasks=("seg",)),
        "forget_kept": _records("train/f", 200, rng, 0.1, tasks=("depth",)),
    }
    got = mia_auc(losses, ["seg", "depth"], target_tasks=["seg"])
    assert abs(got["mia_auc_target"] - 0.5) < 0.1  # the target losses alone: forgotten
    assert got["mia_auc"] > got["mia_auc_target"] + 0.1  # the kept task still gives the instances away


def test_split_val_is_a_seeded_partition_of_sorted_keys():
    keys = [f"val/{i}" for i in range(11)]
    a, b = split_val(keys)
    assert sorted(a + b) == sorted(keys) and len(a) == 5 and not set(a) & set(b)
    assert split_val(list(reversed(keys))) == (a, b) and split_val(keys, seed=1) != (a, b)


# --------------------------------------------------------------------------
# a really overfit model; the commands end to end
# --------------------------------------------------------------------------

OVERFIT = """\
model: {width: 16, head_width: 16}
data: {workers: 0}
train: {epochs: 120, global_batch: 16, lr: 0.01, weight_decay: 0.0}
unlearn: {steps: 4, forget_batch: 4, retain_batch: 8}
eval: {batch: 16, retain_sample: 16}
tracking: {enabled: false}
"""


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """16 training instances fitted for 120 epochs (train loss far below val loss), 320 val instances,
    a full request of 8; the original evaluated on it (metrics-/losses-<sha12>.json beside it)."""
    tmp = tmp_path_factory.mktemp("overfit")
    run_mtu(
        "data",
        "synth",
        "--datasets",
        "synth-indoor",
        "--out",
        tmp / "shards",
        "--train",
        16,
        "--val",
        320,
        "--height",
        16,
        "--width",
        24,
        "--shard-size",
        8,
        "--workers",
        2,
        check=True,
    )
    (tmp / "overfit.yaml").write_text(OVERFIT)
    common = ["--config", tmp / "overfit.yaml", "--set", f"data.root={tmp / 'shards'}"]
    run_mtu("train", *common, "--set", f"out={tmp / 'runs'}", cwd=tmp, check=True, env={"OMP_NUM_THREADS": "1"})
    req = tmp / "full.yaml"
    run_mtu(
        "forget",
        "make",
        "--dataset",
        tmp / "shards" / "synth-indoor",
        "--fraction",
        0.5,
        "--setting",
        "full",
        "--out",
        req,
        check=True,
    )
    orig = tmp / "runs" / "synth-indoor" / "original"
    run_mtu("eval", "--ckpt", orig, "--request", req, *common, cwd=tmp, check=True)
    sha = __import__("hashlib").sha256(req.read_bytes()).hexdigest()[:12]
    return {
        "tmp": tmp,
        "common": common,
        "req": req,
        "orig": orig,
        "losses": json.loads((orig / "final" / f"losses-{sha}.json").read_text()),
        "sha": sha,
    }


@pytest.mark.slow
def test_mia_on_overfit_model_members_vs_val_and_val_halves(overfit):
    losses = overfit["losses"]
    tasks = list(TASKS)
    # forget = 8 training members the attack never saw, vs 160 held-out val instances
    got = mia_auc(losses, tasks)
    assert got["mia_counts"] == {"member": 8, "nonmember": 160, "forget": 8, "heldout": 160}
    assert got["mia_auc"] > 0.8, got
    # two halves of the held-out val (80 vs 80), scored by the same attack: no membership signal.
    # Under the null the AUC's sd is sqrt((80 + 80 + 1) / (12 * 80 * 80)) = 0.046; 0.15 is ~3.3 sd.
    from mtu_dist.evaluation.unlearning_metrics import loss_features

    keys, x = loss_features(losses["val"], tasks)
    attack, heldout = split_val(keys)
    row = {k: i for i, k in enumerate(keys)}
    _, members = loss_features(losses["retain"], tasks)
    pick = lambda ks: x[[row[k] for k in ks]]  # noqa: E731
    halves = attack_auc(members, pick(attack), pick(heldout[:80]), pick(heldout[80:]))
    print(f"overfit model: forget-vs-val AUC {got['mia_auc']:.3f}, val halves AUC {halves:.3f}")  # seen with -s
    assert abs(halves - 0.5) < 0.15, halves


@pytest.fixture(scope="module")
def unlearned(overfit, tmp_path_factory):
    """On the overfit model, in one process (start-up paid once): a tracked retrain on the full request,
    grad_ascent scored against it (the original's evaluation on that request is the fixture's cache),
    and an untracked neggrad_plus on a new partial request (the original is evaluated on it and cached)."""
    tmp, common, req, orig, sha = (overfit[k] for k in ("tmp", "common", "req", "orig", "sha"))
    part = tmp_path_factory.mktemp("partial")
    partial = part / "partial.yaml"
    run_mtu(
        "forget",
        "make",
        "--dataset",
        tmp / "shards" / "synth-indoor",
        "--fraction",
        0.5,
        "--setting",
        "partial",
        "--tasks",
        "seg",
        "--out",
        partial,
        check=True,
    )
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracked = [*common, "--set", f"out={tmp / 'runs'}", "--set", "tracking.enabled=true", "--tracking-uri", uri]
    retrain = tmp / "runs" / "synth-indoor" / "retrain-full"
    cache = orig / "final" / f"metrics-{sha}.json"
    before = cache.stat().st_mtime_ns
    proc = run_many(
        [
            ["retrain", *tracked, "--request", req, "--name", "retrain-full", "--set", "train.epochs=10"],
            [
                "unlearn",
                *tracked,
                "--method",
                "grad_ascent",
                "--request",
                req,
                "--from",
                orig,
                "--retrain",
                retrain,
                "--name",
                "ga",
            ],
            [
                "unlearn",
                *common,
                "--set",
                f"out={part / 'runs'}",
                "--method",
                "neggrad_plus",
                "--request",
                partial,
                "--from",
                orig,
                "--name",
                "ng",
            ],
        ],
        tmp,
        tag="unlearned",
    )["_proc"]
    return {
        "uri": uri,
        "retrain": retrain,
        "cache": cache,
        "before": before,
        "stdout": proc.stdout,
        "partial": partial,
        "part": part,
    }


@pytest.mark.slow
def test_unlearn_with_retrain_writes_scores_to_metrics_and_mlflow(overfit, unlearned):
    tmp, orig = overfit["tmp"], overfit["orig"]
    uri, retrain, cache = unlearned["uri"], unlearned["retrain"], unlearned["cache"]
    # the original was not re-evaluated on the full request
    assert cache.stat().st_mtime_ns == unlearned["before"] and f"cached in {cache}" not in unlearned["stdout"]
    report = json.loads((tmp / "runs" / "synth-indoor" / "ga" / "final" / "metrics.json").read_text())
    block = report["unlearning"]
    for key in ("mia_auc", "mia_auc_retrain", "mia_auc_gap", "gap_retrain", "delta_m", "cost_ratio"):
        assert isinstance(block[key], float) and math.isfinite(block[key]), (key, block)
    assert set(block["uis"]["per_task"]) == set(TASKS) and block["mia_auc_target"] is None
    assert block["references"] == {"original": str(orig / "final"), "retrain": str(retrain)}
    retrain_report = json.loads((retrain / "final" / "metrics.json").read_text())
    assert retrain_report["unlearning"]["mia_auc"] == block["mia_auc_retrain"]  # retrain scores its own MIA
    assert block["cost_ratio"] == pytest.approx(report["time_s"] / retrain_report["time_s"])

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    logged = client.get_run(report["run"]["mlflow_run_id"]).data.metrics
    for name in ("uis", "uis/seg", "uis/depth", "uis/normal", "mia_auc", "gap_retrain", "delta_m", "cost_ratio"):
        assert name in logged, name
    assert logged["uis"] == pytest.approx(block["uis"]["mean"]) and logged["gap_retrain"] == pytest.approx(
        block["gap_retrain"]
    )

    # `mtu score` recomputes the same block from the files alone (original taken from the run's --from)
    (tmp / "runs" / "synth-indoor" / "ga" / "final" / "model.safetensors").unlink()  # proof: no model is run
    run_mtu(
        "score", tmp / "runs" / "synth-indoor" / "ga", "--retrain", retrain, "--tracking-uri", uri, cwd=tmp, check=True
    )
    rescored = json.loads((tmp / "runs" / "synth-indoor" / "ga" / "final" / "metrics.json").read_text())["unlearning"]
    assert rescored == block


@pytest.mark.slow
def test_partial_unlearn_evaluates_and_caches_the_original_once(overfit, unlearned):
    orig = overfit["orig"]
    sha = __import__("hashlib").sha256(unlearned["partial"].read_bytes()).hexdigest()[:12]
    cached_path = orig / "final" / f"metrics-{sha}.json"
    assert f"cached in {cached_path}" in unlearned["stdout"] and (orig / "final" / f"losses-{sha}.json").is_file()
    cached = json.loads(cached_path.read_text())
    assert set(cached["splits"]) == {"forget", "forget_kept", "retain", "val"}
    final = unlearned["part"] / "runs" / "synth-indoor" / "ng" / "final"
    block = json.loads((final / "metrics.json").read_text())["unlearning"]
    assert block["setting"] == "partial" and block["target_tasks"] == ["seg"]
    assert isinstance(block["mia_auc_target"], float) and set(block["uis"]["per_task"]) == set(TASKS)
    assert block["gap_retrain"] is None and block["cost_ratio"] is None  # no retrain reference given

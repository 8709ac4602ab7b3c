"""iamu vs neggrad_plus on synthetic data: less collateral damage at a comparable forget drop.

Both methods run with the same step size until the stop rule sees a 10% drop of every target task's
primary metric on the forget pairs (`unlearn.stop_drop`). Damage is the mean relative change, in
either direction, of the primary metrics on the retain split and, partial setting, on the kept tasks
of the forgotten instances (the UIS view: they must not move). Fixed seeds and sizes; run with `-s`
to print the numbers.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import read_json, run_many, run_mtu

from mtu_dist.tasks import TASKS

pytestmark = pytest.mark.slow
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the trained model (and so every number below) depends on the reduction order
# small steps: at 0.003+ single overshooting steps dominate neggrad_plus's side of the comparison. iamu's forget
# direction has unit length (forget_norm: unit) and its update momentum 0.9, which sums about 10 steps: at lr
# 0.0001 its effective step is neggrad_plus's 0.001. The kept-task margin is small at this size: at 0.0002
# iamu moved the kept tasks 0.76% against neggrad_plus's 0.69% (0.65% at 0.0001). The budget leaves room for
# the stop rule to see every target task at its level at once.
LR = {"neggrad_plus": "0.001", "iamu": "0.0001"}
STEPS = "1600"


def _change(orig: dict, new: dict, split: str, signed: bool) -> float:
    """Mean relative change of the primary metrics over the split's tasks (signed: drop > 0)."""
    rel = [
        (orig[split][t][TASKS[t].primary] - new[split][t][TASKS[t].primary]) / orig[split][t][TASKS[t].primary]
        for t in orig[split]
    ]
    return sum(r if signed else abs(r) for r in rel) / len(rel)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A model trained long enough on 96 scenes to memorise them (train/val gap), as unlearning assumes;
    then both methods on a partial and a full request. Training and the four unlearning runs share one
    process (start-up paid once); each unlearning run evaluates the original on its request first (cached
    beside it, metrics-<sha12>.json), which is the reference the changes are measured against."""
    tmp = tmp_path_factory.mktemp("quality")
    run_mtu(
        "data",
        "synth",
        "--datasets",
        "synth-indoor",
        "--out",
        tmp / "shards",
        "--train",
        96,
        "--val",
        64,
        "--height",
        32,
        "--width",
        40,
        "--shard-size",
        24,
        "--workers",
        2,
        env=ONE_THREAD,
        check=True,
    )
    common = [
        "--set",
        f"data.root={tmp / 'shards'}",
        "--set",
        f"out={tmp / 'runs'}",
        "--set",
        "tracking.enabled=false",
        "--set",
        "model.width=16",
        "--set",
        "model.head_width=16",
    ]
    requests = {"partial": ["seg"], "full": []}
    runs = [["train", *common, "--set", "train.epochs=60", "--name", "original"]]
    for setting, tasks in requests.items():
        req = tmp / f"{setting}.yaml"
        run_mtu(
            "forget",
            "make",
            "--dataset",
            tmp / "shards/synth-indoor",
            "--fraction",
            0.1,
            "--setting",
            setting,
            *(["--tasks", *tasks] if tasks else []),
            "--out",
            req,
            env=ONE_THREAD,
            check=True,
        )
        runs += [
            [
                "unlearn",
                *common,
                "--method",
                method,
                "--request",
                req,
                "--from",
                tmp / "runs/synth-indoor/original",
                "--name",
                f"{method}-{setting}",
                "--set",
                f"unlearn.lr={LR[method]}",
                "--set",
                f"unlearn.steps={STEPS}",
                "--set",
                "unlearn.stop_drop=0.1",
                "--set",
                "unlearn.signal_engine=sequential",
            ]
            for method in ("neggrad_plus", "iamu")
        ]
    run_many(runs, tmp, env=ONE_THREAD, tag="quality")
    return {setting: _compare(tmp, setting) for setting in requests}


def _compare(tmp, setting: str):
    sha = hashlib.sha256((tmp / f"{setting}.yaml").read_bytes()).hexdigest()[:12]
    orig = read_json(tmp / f"runs/synth-indoor/original/final/metrics-{sha}.json")["splits"]
    out = {}
    for method in ("neggrad_plus", "iamu"):
        rep = read_json(tmp / "runs/synth-indoor" / f"{method}-{setting}" / "final/metrics.json")
        assert rep["stop_reason"].startswith("stop rule"), (
            f"{method} never reached the forget drop: {rep['stop_reason']}"
        )
        new = rep["splits"]
        out[method] = {
            "forget": _change(orig, new, "forget", True),
            "retain": _change(orig, new, "retain", False),
            **({"kept": _change(orig, new, "forget_kept", False)} if "forget_kept" in new else {}),
        }
    print(f"\n{setting}: " + json.dumps({m: {k: round(100 * v, 2) for k, v in d.items()} for m, d in out.items()}))
    return out["neggrad_plus"], out["iamu"]


def test_partial_iamu_moves_kept_tasks_and_retain_less(results):
    neg, ours = results["partial"]
    assert ours["kept"] < neg["kept"]
    assert ours["retain"] < neg["retain"]


def test_full_iamu_moves_retain_less(results):
    neg, ours = results["full"]
    assert ours["retain"] < neg["retain"]

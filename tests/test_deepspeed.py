"""DeepSpeed ZeRO-1/2 through Accelerate's plugin (launch/accelerate/deepspeed_zero{1,2}.yaml, 2 gloo ranks
on CPU) end with the parameters of the plain 2-rank path: training, a loss-based method (neggrad_plus,
the engine's own backward) and iamu in sharded mode (its update fed to the engine as a surrogate loss,
each rank only the rows it owns). Training clips (train.grad_clip = 0.5), so DeepSpeed's clipping of
the partitioned gradient is compared with torch's of the whole one.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, accelerate_launch, read_json, run_mtu
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
SCRIPT = ROOT / "tests" / "scripts" / "unlearn_many.py"
# float32 (ZeRO keeps a float32 master copy whatever the model's dtype, so float64 would not be exact
# either). Measured: identical bits for the unlearning runs (no clipping); training (clipping) at most
# 1.2e-7, one float32 ulp at 1: DeepSpeed scales by 1 / ((norm + 1e-6) / clip), torch by clip / (norm + 1e-6).
TOL = dict(rtol=1e-5, atol=1e-6)
RUNS = ("train", "neggrad_plus", "iamu")


def _runs(tmp, tiny_root, tag: str) -> list[list[str]]:
    common = [
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--set",
        f"data.root={tiny_root}",
        "--set",
        f"out={tmp / 'runs'}",
        "--set",
        "tracking.enabled=false",
        "--set",
        "data.workers=1",
    ]
    unlearn = [
        "unlearn",
        *common,
        "--request",
        str(tmp / "partial.yaml"),
        "--from",
        str(tmp / "runs/synth-indoor/plain-train"),
        "--set",
        "unlearn.steps=4",
    ]
    # training clips (its norms are above 0.5); unlearning does not (at 5): a clip would hide a wrong scale
    return [
        ["train", *common, "--name", f"{tag}-train", "--set", "train.epochs=1", "--set", "train.grad_clip=0.5"],
        [*unlearn, "--method", "neggrad_plus", "--name", f"{tag}-neggrad_plus", "--set", "unlearn.checkpoint_every=2"],
        [
            *unlearn,
            "--method",
            "iamu",
            "--name",
            f"{tag}-iamu",
            "--set",
            "unlearn.reduction=sharded",
            "--set",
            "unlearn.signal_engine=sequential",
            "--set",
            "unlearn.options.subspace_batches=2",
        ],
    ]


def _launch(tmp, tiny_root, tag: str, config: str | None = None) -> None:
    spec = tmp / f"{tag}.json"
    spec.write_text(json.dumps(_runs(tmp, tiny_root, tag)))
    accelerate_launch(
        [SCRIPT, spec, tmp / f"{tag}-status.json"],
        nproc=2,
        cwd=tmp,
        config=config,
        env={"MTU_COLLECTIVE_TIMEOUT_MIN": "3"},
    )
    assert all(v["rc"] == 0 for v in read_json(tmp / f"{tag}-status.json").values())


@pytest.fixture(scope="module")
def plain(tiny_root, tmp_path_factory):
    """The plain 2-rank path (DDP; iamu with its own collectives): the reference, and the original model."""
    tmp = tmp_path_factory.mktemp("deepspeed")
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
        "normal",
        "--out",
        tmp / "partial.yaml",
        check=True,
    )
    _launch(tmp, tiny_root, "plain")
    return tmp, tiny_root


def _final(tmp, name: str) -> dict[str, torch.Tensor]:
    return load_file(tmp / "runs/synth-indoor" / name / "final" / "model.safetensors")


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stage_gives_the_plain_parameters(plain, stage):
    tmp, tiny_root = plain
    tag = f"zero{stage}"
    _launch(tmp, tiny_root, tag, config=f"deepspeed_zero{stage}.yaml")
    original = _final(tmp, "plain-train")
    for run in RUNS:
        state = read_json(tmp / "runs/synth-indoor" / f"{tag}-{run}" / "final" / "state.json")
        assert state["deepspeed_stage"] == stage and state["world_size"] == 2  # really DeepSpeed, really 2 ranks
        ref, got = _final(tmp, f"plain-{run}"), _final(tmp, f"{tag}-{run}")
        assert ref.keys() == got.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], **TOL, msg=lambda m, run=run, k=k: f"{run} {k}: {m}")
        if run != "train":  # the comparison means something: unlearning moved the parameters
            assert max((ref[k] - original[k]).abs().max() for k in ref) > 1e-3
    _check_resume_points(tmp, tag)


def _check_resume_points(tmp, tag: str) -> None:
    """Training (AdamW: its state partitioned over the ranks) checkpoints no optimizer state and a resume
    refuses it; unlearning with SGD without momentum holds none, so its resume points are complete."""
    from mtu_dist.config import load_config
    from mtu_dist.errors import UserError
    from mtu_dist.model import build_model
    from mtu_dist.runner.checkpoint import latest_checkpoint, load_checkpoint, read_state

    train = latest_checkpoint(tmp / "runs/synth-indoor" / f"{tag}-train" / "checkpoints")
    assert not (train / "optim.safetensors").exists()
    meta = read_state(train)
    model = build_model(
        load_config([str(ROOT / "configs" / "tiny.yaml")]).model, tuple(meta["tasks"]), meta["num_classes"]
    )
    with pytest.raises(UserError, match="holds no optimizer state"):
        load_checkpoint(train, model, torch.optim.AdamW(model.parameters()))
    unlearn = latest_checkpoint(tmp / "runs/synth-indoor" / f"{tag}-neggrad_plus" / "checkpoints")
    assert (unlearn / "optim.safetensors").is_file()

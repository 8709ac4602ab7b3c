"""iamu's distributed step under real gloo ranks: 1 vs 2 ranks, replicated vs sharded (float64)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, accelerate_launch, run_mtu

pytestmark = pytest.mark.slow
TINY = str(ROOT / "configs" / "tiny.yaml")
TOL = dict(rtol=1e-10, atol=1e-12)  # float64 throughout


@pytest.fixture(scope="module")
def setup(tiny_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iamu")
    common = ["--config", TINY, "--set", f"data.root={tiny_root}", "--set", f"out={tmp / 'runs'}",
              "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    run_mtu("train", *common, cwd=tmp, check=True)
    req = tmp / "partial.yaml"
    run_mtu("forget", "make", "--dataset", tiny_root / "synth-indoor", "--fraction", 0.2, "--setting", "partial",
            "--tasks", "seg", "normal", "--out", req, check=True)
    return tmp, common, req


def _run(setup, name, nproc, reduction, engine="sequential", workers=None):
    tmp, common, req = setup
    trace = tmp / "trace" / name
    args = ["-m", "mtu_dist.cli", "unlearn", *common, "--method", "iamu", "--request", req,
            "--from", tmp / "runs/synth-indoor/original", "--name", name,
            "--set", "model.dtype=float64", "--set", "unlearn.steps=5", "--set", f"unlearn.reduction={reduction}",
            "--set", f"unlearn.signal_engine={engine}", "--set", "unlearn.check_sync=true",
            "--set", "unlearn.lr=0.05", "--set", "unlearn.options.subspace_batches=2",
            "--set", f"unlearn.options.trace_dir={trace}",
            "--set", f"data.workers={workers or (2 if nproc == 1 else 1)}"]
    accelerate_launch(args, nproc=nproc, cwd=tmp)
    steps = [load_file(trace / f"step-{i:04d}.safetensors") for i in range(1, 6)]
    final = load_file(tmp / "runs/synth-indoor" / name / "final" / "model.safetensors")
    return steps, final


def _same(a, b):
    (sa, fa), (sb, fb) = a, b
    for i, (x, y) in enumerate(zip(sa, sb)):
        for key in ("signals", "gram", "update"):
            torch.testing.assert_close(x[key], y[key], **TOL, msg=lambda m: f"step {i + 1} {key}: {m}")
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], **TOL)


def test_one_rank_two_ranks_and_both_modes_agree(setup):
    ref = _run(setup, "r1", 1, "replicated")
    assert len(ref[0]) == 5 and ref[0][0]["signals"].shape[0] == 2 + 3  # 2 target + 3 retain signals
    assert ref[0][0]["update"].abs().sum() > 0
    _same(ref, _run(setup, "r2", 2, "replicated"))
    _same(ref, _run(setup, "s2", 2, "sharded"))
    _same(ref, _run(setup, "s1", 1, "sharded"))


def test_batched_engine_matches_sequential(setup):
    _same(_run(setup, "seq", 1, "replicated"), _run(setup, "bat", 1, "replicated", engine="batched"))

"""iamu's distributed step under real gloo ranks: 1 vs 2 ranks, replicated vs sharded (float64)."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, run_many, run_mtu
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
TINY = str(ROOT / "configs" / "tiny.yaml")
TOL = dict(rtol=1e-10, atol=1e-12)  # float64 throughout
# name -> (ranks, reduction, signal engine); 1 rank reads with 2 workers, 2 ranks with 1 each: same global batches
RUNS = {
    "r1": (1, "replicated", "sequential"),
    "s1": (1, "sharded", "sequential"),
    "bat": (1, "replicated", "batched"),
    "r2": (2, "replicated", "sequential"),
    "s2": (2, "sharded", "sequential"),
    # the other options whose numbers are global sums (the default runs above set the forget direction to unit
    # length, its norm summed over the columns each rank owns): its pre-constraint length restored (a second
    # global norm) and the conflict-only orthogonalization (solved from the global Gram)
    "r1u": (1, "replicated", "sequential", ("forget_norm=restored", "remove=conflicts")),
    "s2u": (2, "sharded", "sequential", ("forget_norm=restored", "remove=conflicts")),
    # the soft (importance-scaled) projection off the other tasks' joint basis: its eigenvalues come from the
    # globally summed covariances, so both modes and world sizes must agree
    "r1s": (1, "replicated", "sequential", ("mode=off_others", "scaled_alpha=2")),
    "r2s": (2, "replicated", "sequential", ("mode=off_others", "scaled_alpha=2")),
    "s2s": (2, "sharded", "sequential", ("mode=off_others", "scaled_alpha=2")),
    "r1h": (1, "replicated", "sequential", ("mode=off_others",)),
    # the forget loss weighted toward the best-fit samples: its weights are normalised by global sums
    "r1f": (1, "replicated", "sequential", ("focus=1.5",)),
    "s2f": (2, "sharded", "sequential", ("focus=1.5",)),
}


@pytest.fixture(scope="module")
def runs(tiny_root, tiny_original, tmp_path_factory):
    """Every configuration of RUNS, 5 traced steps each: the 1-rank runs in one process, the 2-rank runs in
    one 2-rank launch (start-up paid once per world size)."""
    tmp = tmp_path_factory.mktemp("iamu")
    common = [
        "--config",
        TINY,
        "--set",
        f"data.root={tiny_root}",
        "--set",
        f"out={tmp / 'runs'}",
        "--tracking-uri",
        f"sqlite:///{tmp / 'mlflow.db'}",
    ]
    req = tmp / "partial.yaml"
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
        req,
        check=True,
    )

    def args(name, nproc, reduction, engine, options=()):
        return [
            "unlearn",
            *common,
            "--method",
            "iamu",
            "--request",
            req,
            "--from",
            tiny_original,
            "--name",
            name,
            "--set",
            "model.dtype=float64",
            "--set",
            "unlearn.steps=5",
            "--set",
            f"unlearn.reduction={reduction}",
            "--set",
            f"unlearn.signal_engine={engine}",
            "--set",
            "unlearn.check_sync=true",
            "--set",
            "unlearn.lr=0.05",
            "--set",
            "unlearn.options.subspace_batches=2",
            "--set",
            f"unlearn.options.trace_dir={tmp / 'trace' / name}",
            "--set",
            f"data.workers={2 if nproc == 1 else 1}",
            *[x for o in options for x in ("--set", f"unlearn.options.{o}")],
        ]

    for nproc in (1, 2):
        run_many(
            [args(name, *spec) for name, spec in RUNS.items() if spec[0] == nproc],
            tmp,
            nproc=nproc,
            tag=f"iamu-{nproc}",
        )
    return {
        name: (
            [load_file(tmp / "trace" / name / f"step-{i:04d}.safetensors") for i in range(1, 6)],
            load_file(tmp / "runs/synth-indoor" / name / "final" / "model.safetensors"),
        )
        for name in RUNS
    }


def _same(a, b):
    (sa, fa), (sb, fb) = a, b
    assert len(sa) == len(sb) == 5
    for i, (x, y) in enumerate(zip(sa, sb)):
        for key in ("signals", "gram", "update"):
            torch.testing.assert_close(x[key], y[key], **TOL, msg=lambda m, i=i, key=key: f"step {i + 1} {key}: {m}")
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], **TOL)


def test_one_rank_two_ranks_and_both_modes_agree(runs):
    ref = runs["r1"]
    assert ref[0][0]["signals"].shape[0] == 2 + 3  # 2 target + 3 retain signals
    assert ref[0][0]["update"].abs().sum() > 0
    for name in ("r2", "s2", "s1"):
        _same(ref, runs[name])


def test_batched_engine_matches_sequential(runs):
    _same(runs["r1"], runs["bat"])


def test_restored_forget_norm_and_conflict_removal_agree_across_ranks_and_change_the_update(runs):
    _same(runs["r1u"], runs["s2u"])
    default, other = runs["r1"][0][0]["update"], runs["r1u"][0][0]["update"]
    assert not torch.allclose(default, other)  # the options reach the step


def test_scaled_projection_agrees_across_ranks_and_modes_and_is_softer_than_the_hard_one(runs):
    _same(runs["r1s"], runs["r2s"])
    _same(runs["r1s"], runs["s2s"])
    soft, hard = runs["r1s"][0][0], runs["r1h"][0][0]
    torch.testing.assert_close(soft["signals"], hard["signals"], **TOL)  # the same step-1 signals before step 2
    assert not torch.allclose(soft["update"], hard["update"])  # the weights reach the step


def test_focused_forget_loss_agrees_across_ranks_and_changes_only_the_forget_signals(runs):
    _same(runs["r1f"], runs["s2f"])
    focused, plain = runs["r1f"][0][0]["signals"], runs["r1"][0][0]["signals"]
    nf = 2  # target signals first, then the 3 retain ones
    torch.testing.assert_close(focused[nf:], plain[nf:], **TOL)  # the retain signals are untouched
    assert not torch.allclose(focused[:nf], plain[:nf])  # the weights reach the forget gradients

"""iamu's distributed step under real gloo ranks: 1 vs 2 ranks, replicated vs sharded (float64)."""

from __future__ import annotations

import json

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
    # the kept task (depth) of the forget instances: its loss on the forget batch is a signal of its own,
    # normalised by global counts, in the span (`span`), in the retain term (`term`), or in both (`both`)
    "r1k": (1, "replicated", "sequential", ("kept_on_forget=both",)),
    "s2k": (2, "sharded", "sequential", ("kept_on_forget=both",)),
    "r1t": (1, "replicated", "sequential", ("kept_on_forget=term",)),
    "r1ks": (1, "replicated", "sequential", ("kept_on_forget=span",)),
    "r2ks": (2, "replicated", "sequential", ("kept_on_forget=span",)),
    # the retain batch mirrored left-right: one more forward pass, one signal per task, normalised by global
    # counts, in the span (`span`), the retain term (`term`) or both
    "r1m": (1, "replicated", "sequential", ("mirror=both",)),
    "s2m": (2, "sharded", "sequential", ("mirror=both",)),
    "r1ms": (1, "replicated", "sequential", ("mirror=span",)),
    "r1mt": (1, "replicated", "sequential", ("mirror=term",)),
    # the forget direction over the shared columns only: its unit length and step 3 over those alone
    "r1nh": (1, "replicated", "sequential", ("forget_on=shared",)),
    "s2nh": (2, "sharded", "sequential", ("forget_on=shared",)),
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
        "_dir": tmp,
        **{
            name: (
                [load_file(tmp / "trace" / name / f"step-{i:04d}.safetensors") for i in range(1, 6)],
                load_file(tmp / "runs/synth-indoor" / name / "final" / "model.safetensors"),
            )
            for name in RUNS
        },
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


ALPHA = 0.5  # unlearn.alpha (the default; tiny.yaml keeps it)


def _forget_direction(trace, n_retain=3, nf=2, with_kept=False):
    """g_f' (after steps 2-3) from a traced step: update = alpha * g_r - (1 - alpha) * g_f'."""
    sig = trace["signals"]
    g_r = sig[nf : nf + n_retain + (1 if with_kept else 0)].sum(0)
    return (ALPHA * g_r - trace["update"]) / (1 - ALPHA)


def test_kept_pairs_of_the_forget_instances_agree_across_ranks_and_join_the_span(runs):
    _same(runs["r1k"], runs["s2k"])
    _same(runs["r1ks"], runs["r2ks"])
    kept, plain = runs["r1ks"][0][0], runs["r1"][0][0]
    assert kept["signals"].shape[0] == 2 + 3 + 1  # the kept task (depth) of the forget instances last
    torch.testing.assert_close(kept["signals"][:5], plain["signals"], **TOL)  # the same step-1 signals
    s_k = kept["signals"][5]
    assert s_k.norm() > 0
    # span: the forget direction after step 3 has no component along the kept pairs' gradient; without
    # the option it has (the same step 1: same model, same batches)
    with_span, without = _forget_direction(kept), _forget_direction(plain)
    assert abs(with_span @ s_k) <= 1e-9 * with_span.norm() * s_k.norm()
    assert abs(without @ s_k) > 1e-3 * without.norm() * s_k.norm()
    # both: the kept gradient also enters the retain term of the update, with the same forget direction
    both = runs["r1k"][0][0]
    torch.testing.assert_close(_forget_direction(both, with_kept=True), with_span, **TOL)
    # term: the retain term only; the forget direction is the plain one, the update gains alpha * s_k
    term = runs["r1t"][0][0]
    torch.testing.assert_close(_forget_direction(term, with_kept=True), without, **TOL)
    torch.testing.assert_close(term["update"] - plain["update"], ALPHA * s_k, **TOL)


def test_the_kept_pairs_a_run_uses_are_retain_pairs_in_its_ledger_and_it_passes_the_audit(runs):
    tmp = runs["_dir"]
    run = tmp / "runs/synth-indoor/r1k"
    proc = run_mtu("audit", run, cwd=tmp, check=True)
    assert "leaks: 0" in proc.stdout, proc.stdout

    def roles(name):
        doc = json.loads((tmp / "runs/synth-indoor" / name / "final" / "ledger.json").read_text())
        return {role: r["keys"] for role, r in doc["roles"].items()}

    kept, plain = roles("r1k"), roles("r1")
    assert kept["forget"] == plain["forget"]  # the same forget stream
    # every draw of a forget instance also uses its kept depth label, recorded as a retain pair
    draws: dict[str, int] = {}
    for key, n in kept["forget"].items():
        instance = key.split("|")[0]
        draws[instance] = max(draws.get(instance, 0), n)
    assert draws
    for instance, n in draws.items():
        extra = kept["retain"].get(f"{instance}|depth", 0) - plain["retain"].get(f"{instance}|depth", 0)
        assert extra == n, (instance, extra, n)
        assert f"{instance}|seg" not in kept["retain"] and f"{instance}|normal" not in kept["retain"]


def test_the_mirrored_retain_batch_agrees_across_ranks_and_joins_the_span_or_the_term(runs):
    _same(runs["r1m"], runs["s2m"])
    span, plain = runs["r1ms"][0][0], runs["r1"][0][0]
    assert span["signals"].shape[0] == 2 + 3 + 3  # one mirrored retain signal per task, last
    torch.testing.assert_close(span["signals"][:5], plain["signals"], **TOL)  # the same step-1 signals
    mirror = span["signals"][5:]
    for j in range(3):  # each its own task's gradient, not the plain retain batch's
        assert mirror[j].norm() > 0
        assert (mirror[j] - plain["signals"][2 + j]).norm() > 1e-3 * mirror[j].norm()
    # span: the forget direction after step 3 has no component along any mirrored gradient; without the
    # option it has (the same step 1: same model, same batches)
    with_span, without = _forget_direction(span), _forget_direction(plain)
    for m in mirror:
        assert abs(with_span @ m) <= 1e-9 * with_span.norm() * m.norm()
    assert max(abs(without @ m) / (without.norm() * m.norm()) for m in mirror) > 1e-3
    # both: the mirrored gradients also enter the retain term, with the same forget direction
    both = runs["r1m"][0][0]
    torch.testing.assert_close(_forget_direction(both, n_retain=6), with_span, **TOL)
    # term: the retain term only; the forget direction is the plain one, the update gains alpha * their sum
    term = runs["r1mt"][0][0]
    torch.testing.assert_close(_forget_direction(term, n_retain=6), without, **TOL)
    torch.testing.assert_close(term["update"] - plain["update"], ALPHA * mirror.sum(0), **TOL)


def _head_columns(final: dict, tasks: tuple[str, ...]) -> torch.Tensor:
    """Bool mask over the natural parameter vector (the model's parameter order): the named tasks' heads."""
    from mtu_dist.config import RunConfig
    from mtu_dist.model import build_model

    cfg = RunConfig().model.model_copy(update={"width": 8, "head_width": 8, "dtype": "float64"})
    model = build_model(cfg, ("seg", "depth", "normal"), final["heads.seg.out.weight"].shape[0])
    parts = [torch.full((p.numel(),), n.split(".")[1] in tasks) for n, p in model.named_parameters()]
    assert [n for n, _ in model.named_parameters()] == [n for n in model.state_dict() if n in final]
    return torch.cat(parts)


def test_without_the_heads_the_forget_direction_moves_only_shared_columns_and_agrees_across_ranks(runs):
    _same(runs["r1nh"], runs["s2nh"])
    no_heads, plain = runs["r1nh"][0][0], runs["r1"][0][0]
    torch.testing.assert_close(no_heads["signals"], plain["signals"], **TOL)  # the same step-1 signals
    targets = _head_columns(runs["r1"][1], ("seg", "normal"))  # the partial request's target tasks
    assert targets.numel() == plain["update"].numel() and 0 < targets.sum() < targets.numel()
    g_f, g_plain = _forget_direction(no_heads), _forget_direction(plain)
    assert g_f[targets].abs().max() == 0  # the target heads follow the retain term alone
    assert g_plain[targets].norm() > 1e-3 * g_plain.norm()  # the default moves them
    torch.testing.assert_close(g_f.norm(), torch.ones((), dtype=g_f.dtype), **TOL)  # unit length, shared only
    # step 3 over the shared columns: no component along the retain gradients there
    shared = ~_head_columns(runs["r1"][1], ("seg", "depth", "normal"))
    for r in no_heads["signals"][2:5]:
        assert abs(g_f[shared] @ r[shared]) <= 1e-9 * g_f.norm() * r[shared].norm()

"""The distributed gradient step's pieces, without processes: layout, engines, projection, Gram."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mtu_dist.config import RunConfig
from mtu_dist.distributed import signals as engines
from mtu_dist.distributed.gradstep import ParamLayout
from mtu_dist.methods.iamu import (
    Iamu,
    IamuOptions,
    _orth,
    energy_eig,
    importance_scaled,
    orthogonalize,
    project_rows,
    union_eig,
)
from mtu_dist.model import build_model
from mtu_dist.tasks import TASKS


def _tiny_model():
    torch.manual_seed(0)
    cfg = RunConfig().model.model_copy(update={"width": 8, "head_width": 8, "dtype": "float64"})
    return build_model(cfg, ("seg", "depth", "normal"), 5)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_layout_is_row_aligned_and_round_trips(world):
    params = list(_tiny_model().parameters())
    layout = ParamLayout(params, world)
    assert sum(layout.owned) == layout.total
    assert max(layout.owned) - min(layout.owned) <= max(p[0].numel() for p in params if p.dim() > 1)  # balanced
    k = 3
    grads = [torch.randn(k, *p.shape, dtype=torch.float64) for p in params]
    buf = layout.new_buffer(k, torch.float64, "cpu")
    layout.pack_batched(buf, grads)
    natural = layout.to_natural(buf)
    assert torch.equal(natural, torch.cat([g.reshape(k, -1) for g in grads], 1))
    for pc in layout.pieces:  # every piece holds whole rows of one parameter
        assert 0 <= pc.row0 < pc.row1 <= (params[pc.index].shape[0] if params[pc.index].dim() else 1)
    layout.unpack_into_grads(buf[:, 1])  # signal 1 as an "update"
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g[1])


def test_batched_and_sequential_engines_agree():
    model = _tiny_model()
    params = list(model.parameters())
    x = torch.rand(4, 3, 16, 24, dtype=torch.float64)
    preds = model(x)
    seg = torch.randint(0, 5, (4, 16, 24))
    depth = torch.rand(4, 1, 16, 24, dtype=torch.float64) + 0.1
    losses = [
        TASKS["seg"].per_sample_loss(preds["seg"], seg)[:2].sum(),
        TASKS["depth"].per_sample_loss(preds["depth"], depth)[2:].sum(),
        TASKS["seg"].per_sample_loss(preds["seg"], seg).sum(),
    ]
    layout = ParamLayout(params, 2)
    a, b = layout.new_buffer(3, torch.float64, "cpu"), layout.new_buffer(3, torch.float64, "cpu")
    engines.sequential(losses, params, layout, a)
    engines.batched(losses, params, layout, b)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert a.abs().sum() > 0


def test_projection_is_exact():
    torch.manual_seed(1)
    basis = _orth(torch.randn(20, 6, dtype=torch.float64))
    grads = torch.randn(5, 7, 20, dtype=torch.float64)  # 5 signals, 7 rows, in = 20
    off = project_rows(grads, basis, "off")
    # protected component after projection <= 1e-6 of the norm
    assert (off @ basis).norm() <= 1e-6 * off.norm()
    onto = project_rows(grads, basis, "onto")
    torch.testing.assert_close(off + onto, grads, rtol=0, atol=1e-12)
    # linear: projecting the mean == mean of projections (what makes the reduce-then-project order valid)
    torch.testing.assert_close(project_rows(grads.mean(0), basis, "off"), off.mean(0), rtol=0, atol=1e-12)


def _task_eig(seed: int, n: int = 20, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """A task's truncated eigendecomposition (vals descending, orthonormal basis) with a spread spectrum."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
    return torch.tensor([40.0, 9.0, 2.0, 0.5, 0.01], dtype=torch.float64)[:k], basis


def test_scaled_projection_is_the_hard_one_at_the_limit():
    torch.manual_seed(3)
    g = torch.randn(7, 20, dtype=torch.float64)
    vals, basis = _task_eig(0)
    for mode in ("off", "onto"):
        hard = project_rows(g, basis, mode)
        torch.testing.assert_close(project_rows(g, importance_scaled(vals, basis, None), mode), hard, rtol=0, atol=0)
        limit = project_rows(g, importance_scaled(vals, basis, 1e12), mode)
        torch.testing.assert_close(limit, hard, rtol=0, atol=1e-9)
        assert (project_rows(g, importance_scaled(vals, basis, 1.0), mode) - hard).norm() > 1e-3  # and soft below
    # the union of two tasks' bases, rotated to their joint importance: the hard off_others projection at the limit
    parts = [_task_eig(1), _task_eig(2)]
    union = _orth(torch.cat([b for _, b in parts], dim=1))
    joint_vals, joint = union_eig(parts)
    assert joint.shape == union.shape == (20, 10)
    torch.testing.assert_close(joint.T @ joint, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-12)
    hard = project_rows(g, union, "off")
    torch.testing.assert_close(
        project_rows(g, importance_scaled(joint_vals, joint, 1e12), "off"), hard, atol=1e-9, rtol=0
    )
    # the joint importance is the spectrum of sum_u B_u diag(vals_u) B_u^T
    direct = sum(b @ torch.diag(v) @ b.T for v, b in parts)
    torch.testing.assert_close(joint_vals, torch.linalg.eigvalsh(direct).flip(0)[:10], rtol=0, atol=1e-10)
    torch.testing.assert_close(joint.T @ direct @ joint, torch.diag(joint_vals), rtol=0, atol=1e-10)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 5.0])
def test_scaled_projection_never_increases_a_protected_component(alpha):
    """Off: each basis direction keeps 1 - lambda_i of its component, lambda_i = (a+1)s/(a s+1) of its
    normalised singular value; onto: lambda_i of it. Outside the span: untouched (off) or removed (onto)."""
    torch.manual_seed(4)
    g = torch.randn(7, 20, dtype=torch.float64)
    vals, basis = _task_eig(5)
    s = (vals / vals.max()).sqrt()
    lam = (alpha + 1) * s / (alpha * s + 1)
    assert bool((lam > 0).all() and (lam <= 1 + 1e-15).all()) and lam[0] == 1  # the strongest is fully protected
    w = importance_scaled(vals, basis, alpha)
    off, onto = project_rows(g, w, "off"), project_rows(g, w, "onto")
    torch.testing.assert_close(off @ basis, (g @ basis) * (1 - lam), rtol=0, atol=1e-12)
    torch.testing.assert_close(onto @ basis, (g @ basis) * lam, rtol=0, atol=1e-12)
    assert bool(((off @ basis).abs() <= (g @ basis).abs() + 1e-12).all())
    outside = torch.eye(20, dtype=torch.float64) - basis @ basis.T
    torch.testing.assert_close(off @ outside, g @ outside, rtol=0, atol=1e-12)
    torch.testing.assert_close(onto @ outside, torch.zeros_like(g), rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha", [None, 2.0])
def test_off_all_removes_the_target_tasks_own_subspace_and_off_others_keeps_it(alpha):
    """Per target task, the basis `_bases` builds: off_others spans the other tasks' bases only, off_all
    the target's own too (hard: their orthonormal union; scaled: the joint importance of all of them)."""
    own = {0: {"seg": _task_eig(6), "depth": _task_eig(7)}}
    ctx = SimpleNamespace(targets=["seg"])
    g = torch.randn(7, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    seg_b, depth_b = own[0]["seg"][1], own[0]["depth"][1]
    expected = {"off_others": [own[0]["depth"]], "off_all": [own[0]["depth"], own[0]["seg"]]}
    for mode, parts in expected.items():
        m = Iamu({"mode": mode, "scaled_alpha": alpha})
        basis = m._bases(ctx, own)["seg"][0]
        assert m.direction == "off"
        want = importance_scaled(*union_eig(parts), alpha)
        torch.testing.assert_close(project_rows(g, basis, "off"), project_rows(g, want, "off"), rtol=0, atol=1e-10)
        if alpha is None:  # hard: nothing of the removed bases is left, the kept one is untouched where apart
            assert (project_rows(g, basis, "off") @ depth_b).norm() < 1e-10
            left = (project_rows(g, basis, "off") @ seg_b).norm()
            assert (left < 1e-10) if mode == "off_all" else (left > 1e-2)


def test_scaled_projection_options():
    assert IamuOptions(mode="off_others", scaled_alpha=2).scaled_alpha == 2
    with pytest.raises(ValueError, match="scaled_alpha applies to modes off_others, off_all and onto_own, not both"):
        IamuOptions(mode="both", scaled_alpha=2)
    with pytest.raises(ValueError):
        IamuOptions(scaled_alpha=-1)
    vals, vecs = energy_eig(torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64)), 0.75)
    assert vals.tolist() == [4.0] and vecs.shape == (3, 1)


def test_energy_basis_keeps_stated_energy():
    torch.manual_seed(2)
    q = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))[0]
    vals = torch.tensor([50, 30, 15, 3, 1, 0.5, 0.3, 0.1, 0.1, 0.0], dtype=torch.float64)
    cov = q @ torch.diag(vals) @ q.T
    b = energy_eig(cov, 0.97)[1]
    assert b.shape[1] == 4  # 50+30+15 = 95% < 97% <= 98%
    assert energy_eig(torch.zeros(4, 4, dtype=torch.float64), 0.97)[1].shape[1] == 0


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_gram_orthogonalization_matches_direct_reference(rank_deficient):
    torch.manual_seed(3)
    span = torch.randn(4, 50, dtype=torch.float64)
    if rank_deficient:
        span[2] = span[0] + 2 * span[1]  # dependent row
        span[3] = 0  # empty retain gradient
    g = torch.randn(50, dtype=torch.float64)
    vecs = torch.cat([g[None], span])
    c = orthogonalize(vecs @ vecs.T)
    ours = g - c @ span
    # direct: subtract the projection onto the column space of span^T
    q = _orth(span.T)
    ref = g - q @ (q.T @ g)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    assert (span @ ours).abs().max() <= 1e-9 * g.norm()


def _eigh_raises(real_eigh):
    def eigh(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    return eigh


def _eigh_returns_nan(real_eigh):
    def eigh(x, *args, **kwargs):
        vals, vecs = real_eigh(x, *args, **kwargs)
        return vals, torch.full_like(vecs, float("nan"))

    return eigh


@pytest.mark.parametrize("broken_eigh", [_eigh_raises, _eigh_returns_nan], ids=["raises", "returns_nan"])
def test_energy_basis_falls_back_to_svd_when_eigh_fails(monkeypatch, broken_eigh):
    """eigh may not converge on rank-deficient covariances of deep layers, and float32 eigh can return NaN
    without raising (seen on a 576x576 one of a model trained one epoch); the SVD path gives the same span."""
    a = torch.randn(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cov = a @ a.T
    ref = energy_eig(cov, 0.97)[1]
    monkeypatch.setattr(torch.linalg, "eigh", broken_eigh(torch.linalg.eigh))
    got = energy_eig(cov, 0.97)[1]
    assert got.shape == ref.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got @ got.T, ref @ ref.T, rtol=0, atol=1e-12)  # same projector


def test_forget_norm_sets_the_forget_directions_length_over_its_columns():
    from mtu_dist.methods.iamu import Iamu

    g = torch.tensor([[3.0, 4.0, 0.0, 7.0]], dtype=torch.float64)  # [blocks, S]; column 3 outside cols
    cols = torch.tensor([[True, True, True, False]])
    norm2, pre = torch.tensor(25.0, dtype=torch.float64), torch.tensor(100.0, dtype=torch.float64)

    def run(mode, n2=norm2):
        return Iamu({"forget_norm": mode})._rescaled(g.clone(), n2, pre, cols)

    torch.testing.assert_close(run("as_is"), g)
    unit, restored = run("unit"), run("restored")
    assert unit[0, :3].norm().item() == pytest.approx(1.0) and unit[0, 3] == 7.0
    assert restored[0, :3].norm().item() == pytest.approx(10.0) and restored[0, 3] == 7.0
    assert torch.allclose(unit[0, :3] / unit[0, :3].norm(), g[0, :3] / 5.0)  # the direction is kept
    # constraints that removed (numerically) all of it: rounding noise is not scaled up to a step
    tiny = torch.tensor(1e-20, dtype=torch.float64)
    torch.testing.assert_close(run("unit", tiny), g)


def test_conflict_removal_is_the_non_negative_least_squares_and_leaves_no_conflict():
    """`remove: conflicts` against scipy's NNLS on random spans (some rows conflicting with g, some not);
    afterwards no retain row has a positive inner product with g (an ascent step climbs none of them)."""
    from scipy.optimize import nnls

    from mtu_dist.methods.iamu import conflict_coefficients

    gen = torch.Generator().manual_seed(0)
    for m in (1, 2, 3, 5):
        for _ in range(20):
            r = torch.randn(m, 12, generator=gen, dtype=torch.float64)
            g = torch.randn(12, generator=gen, dtype=torch.float64)
            vecs = torch.cat([g[None], r])
            c = conflict_coefficients(vecs @ vecs.T)
            want, _ = nnls(r.T.numpy(), g.numpy())
            torch.testing.assert_close(c, torch.from_numpy(want), rtol=1e-8, atol=1e-10)
            g2 = g - c @ r
            assert bool((c >= 0).all()) and bool((r @ g2 <= 1e-10).all())


def test_conflict_removal_matches_span_removal_when_everything_conflicts_and_is_a_no_op_when_nothing_does():
    from mtu_dist.methods.iamu import conflict_coefficients

    r = torch.eye(3, 6, dtype=torch.float64)  # orthogonal retain rows
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    vecs = torch.cat([g[None], r])
    torch.testing.assert_close(conflict_coefficients(vecs @ vecs.T), orthogonalize(vecs @ vecs.T))
    vecs = torch.cat([-g[None], r])  # every <g, r> < 0: nothing to remove
    assert conflict_coefficients(vecs @ vecs.T).abs().max() == 0
    # more rows than dimensions (rank-deficient Gram, c not unique): the same residual as scipy's NNLS
    from scipy.optimize import nnls

    r = torch.randn(14, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    big = torch.cat([g[None], r])
    c = conflict_coefficients(big @ big.T)
    _, want = nnls(r.T.numpy(), g.numpy())
    assert bool((c >= 0).all()) and bool((r @ (g - c @ r) <= 1e-9).all())
    assert (g - c @ r).norm().item() == pytest.approx(want, rel=1e-8, abs=1e-10)


@pytest.mark.parametrize(
    ("method", "options", "configured", "expected"),
    [
        ("iamu", {}, 0.0, 0.9),  # iamu's update rule: momentum 0.9 whatever unlearn.momentum says
        ("iamu_no_momentum", {}, 0.5, 0.0),
        ("iamu", {"momentum": None}, 0.5, 0.5),  # None: the config's
        ("neggrad_plus", {}, 0.3, 0.3),  # every other method: the config's
    ],
)
def test_the_unlearning_optimizer_gets_the_methods_momentum(monkeypatch, method, options, configured, expected):
    from mtu_dist.methods import build_method
    from mtu_dist.runner import unlearn

    built = {}

    def prepare(acc, model, opt, **kwargs):
        built["opt"] = opt
        return model, None

    monkeypatch.setattr(unlearn, "prepare", prepare)
    cfg = RunConfig()
    cfg.unlearn.momentum = configured
    unlearn._prepare(SimpleNamespace(cfg=cfg, world=1, acc=None), _tiny_model(), build_method(method, options))
    assert built["opt"].param_groups[0]["momentum"] == expected

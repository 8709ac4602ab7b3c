"""iamu's bounded-rank task bases (mtu_dist/methods/lowrank.py): error vs exact, the exact path for short
rows, 1 vs 2 real gloo ranks, and sharded basis memory."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import ROOT, accelerate_launch
from safetensors.torch import load_file

from mtu_dist.methods.iamu import energy_eig
from mtu_dist.methods.lowrank import gaussian_sketch, lowrank_basis

SCRIPT = ROOT / "tests" / "scripts" / "iamu_bases.py"
# short rows (in = 27) stay exact; rows of 72 and 144 get a sketch of 12 + 8 columns
LOWRANK = {"lowrank_min_in": 64, "max_rank": 12, "oversample": 8, "subspace_batches": 3}
_spec = importlib.util.spec_from_file_location("iamu_bases", SCRIPT)
bases_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bases_script)


def _decaying_gradients(n=300, rows=30, batches=4, decay=0.96, seed=0):
    """Gradients [rows, n] whose covariance has eigenvalues decaying like decay^i."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    scale = (decay ** torch.arange(n, dtype=torch.float64)).sqrt()
    return [torch.randn(rows, n, generator=g, dtype=torch.float64) * scale @ q.T for _ in range(batches)]


def _captured(basis, cov):
    return float(torch.trace(basis.T @ cov @ basis) / torch.trace(cov))


@pytest.mark.parametrize("power_iters", [0, 1])
def test_sketch_captures_what_the_exact_basis_captures(power_iters):
    """Tolerance: the low-rank basis keeps >= (1 - 0.01) of the trace share the exact basis keeps, and its
    own estimate is a lower bound of what it really keeps (to 1e-12)."""
    gs = _decaying_gradients()
    cov = sum(g.T @ g for g in gs)
    exact = energy_eig(cov, 0.97)[1]
    omega = gaussian_sketch(cov.shape[0], exact.shape[1] + 40, seed=0, dtype=torch.float64, device="cpu")
    for it in range(power_iters + 1):
        y = sum(g.T @ (g @ omega) for g in gs)
        if it < power_iters:
            omega = torch.linalg.qr(y)[0]
    basis, estimate = lowrank_basis(y, omega, float(torch.trace(cov)), 0.97, max_rank=1000)
    assert 0 < exact.shape[1] < 300
    assert _captured(basis, cov) >= 0.99 * _captured(exact, cov)
    assert estimate <= _captured(basis, cov) + 1e-12
    assert estimate >= 0.97  # the rule's target was reached (the cap did not bind)
    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64), rtol=0, atol=1e-10)


def test_cap_binds_and_says_how_much_is_kept():
    gs = _decaying_gradients()
    cov = sum(g.T @ g for g in gs)
    omega = gaussian_sketch(300, 30, seed=1, dtype=torch.float64, device="cpu")
    y = sum(g.T @ (g @ omega) for g in gs)
    basis, estimate = lowrank_basis(y, omega, float(torch.trace(cov)), 0.97, max_rank=10)
    assert basis.shape[1] == 10
    assert estimate < 0.97 and estimate <= _captured(basis, cov) + 1e-12


def test_short_rows_keep_the_exact_path():
    """Default options: no layer of the tiny model is sketched; with a low threshold only the long rows
    are, and the short layer's bases are the very same as on the exact path."""
    exact, logs = bases_script.setup_bases(1, 0, "replicated", {"subspace_batches": 3})
    low, low_logs = bases_script.setup_bases(1, 0, "replicated", LOWRANK)
    assert not any(exact.sketched(i) for i in exact.projected_idx) and "lowrank_layers" not in logs
    short = [i for i in low.projected_idx if not low.sketched(i)]
    long_ = [i for i in low.projected_idx if low.sketched(i)]
    assert short and long_ and low_logs["lowrank_layers"] == len(long_)
    for t in exact.bases:
        for i in short:
            assert torch.equal(exact.bases[t][i], low.bases[t][i])
        for i in long_:
            assert 0 < low.bases[t][i].shape[1] <= LOWRANK["max_rank"] < exact.bases[t][i].shape[1]
    assert low.basis_bytes() < exact.basis_bytes()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The script on 2 gloo ranks (both reduction modes), and the same bases on 1 rank in this process."""
    d = tmp_path_factory.mktemp("bases")
    accelerate_launch([SCRIPT, d, json.dumps(LOWRANK)], nproc=2, timeout=300)
    two = {
        (red, r): (load_file(d / f"{red}-rank{r}.safetensors"), json.loads((d / f"{red}-rank{r}.json").read_text()))
        for red in ("replicated", "sharded")
        for r in range(2)
    }
    one, _ = bases_script.setup_bases(1, 0, "replicated", LOWRANK)
    ref = {f"{t}/{i}": b for t, per_i in one.bases.items() for i, b in per_i.items()}
    return {
        1: {
            ("replicated", 0): (
                ref,
                {"basis_bytes": one.basis_bytes(), "sketched": [i for i in one.projected_idx if one.sketched(i)]},
            )
        },
        2: two,
    }


@pytest.mark.slow
def test_one_and_two_ranks_give_the_same_bases(launched):
    """Projectors B B^T (sign- and rotation-free) of every kept basis equal the 1-rank ones to 1e-9 (float64;
    the sketch sums rows in another order)."""
    ref, _ = launched[1]["replicated", 0]
    assert ref and launched[1]["replicated", 0][1]["sketched"]
    for (red, r), (bases, _) in launched[2].items():
        assert bases
        for key, b in bases.items():
            assert b.shape == ref[key].shape, (red, r, key)
            torch.testing.assert_close(
                b @ b.T,
                ref[key] @ ref[key].T,
                rtol=0,
                atol=1e-9,
                msg=lambda m, red=red, r=r, key=key: f"{red} {r} {key}: {m}",
            )


@pytest.mark.slow
def test_sharded_ranks_keep_only_the_bases_of_layers_they_own(launched):
    full, rep_info = launched[1]["replicated", 0]
    per_layer = {}
    for key, b in full.items():
        per_layer[int(key.split("/")[1])] = per_layer.get(int(key.split("/")[1]), 0) + b.numel() * b.element_size()
    assert rep_info["basis_bytes"] == sum(per_layer.values())
    owned = [set(launched[2]["sharded", r][1]["owned"]) for r in range(2)]
    shared = owned[0] & owned[1]
    assert owned[0] and owned[1] and len(shared) <= 1  # one boundary: at most one layer split
    for r in range(2):
        bases, info = launched[2]["sharded", r]
        assert {int(k.split("/")[1]) for k in bases} == owned[r]
        assert info["basis_bytes"] == sum(per_layer[i] for i in owned[r])
    # the tiny model's heads hold a third of the parameters: rank 1 owns only the split last layer's rows
    assert min(launched[2]["sharded", r][1]["basis_bytes"] for r in range(2)) < rep_info["basis_bytes"]
    # together the ranks hold the replicated bytes once, plus the split layer's twice
    total = sum(launched[2]["sharded", r][1]["basis_bytes"] for r in range(2))
    assert total == rep_info["basis_bytes"] + sum(per_layer[i] for i in shared)
    for r in range(2):  # replicated mode keeps every layer on every rank
        assert launched[2]["replicated", r][1]["basis_bytes"] == rep_info["basis_bytes"]

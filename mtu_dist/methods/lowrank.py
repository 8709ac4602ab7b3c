"""Bounded-rank task bases from streamed gradients, without forming the [in, in] covariance.

iamu's task basis of a layer is the top eigenspace of C = sum_b G_b^T G_b (G_b: a retain gradient as
[rows, in]). For a long row (`in` in the thousands) C costs rows*in^2 per batch to form, in^2 to hold
and in^3 to decompose. Here C is only ever applied to a thin matrix:

* sketch: Y = C Omega = sum_b G_b^T (G_b Omega), Omega [in, k] orthonormal Gaussian, accumulated over
  the same retain batches (and over ranks: the sum is additive over rows, so ranks owning different
  rows of a layer add their partial Y); optional power iterations repeat the pass with Omega <- orth(Y);
* Nyström: C_hat = Y (Omega^T Y)^+ Y^T, whose eigenpairs come from a [k, k] eigendecomposition and a
  thin SVD (Tropp, Yurtsever, Udell, Cevher 2017, "Fixed-rank approximation of a PSD matrix from
  streaming data", with their small shift for stability).

Energy rule. The trace of C (sum of squared gradient entries) is known exactly, and C_hat <= C in the
PSD order, so for C_hat's top-r eigenvectors U_r: sum_{i<=r} lambda_hat_i = tr(U_r^T C_hat U_r)
<= tr(U_r^T C U_r). Taking the smallest r with sum lambda_hat_i >= energy * tr(C) therefore keeps at
least `energy` of C's trace (conservative: it may keep a few more directions than the exact rule), and
the estimate is a lower bound on what the basis captures. When the cap (`max_rank`) binds, the basis
keeps less than `energy`; the estimate says how much.
"""

from __future__ import annotations

import torch


def gaussian_sketch(n: int, k: int, seed: int, dtype, device) -> torch.Tensor:
    """Orthonormal Gaussian [n, k], the same on every rank for the same seed (drawn on the host)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q.to(dtype=dtype, device=device)


def nystrom_eig(y: torch.Tensor, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors [n, k'] of the Nyström approximation from Y = C Omega.

    The shift nu (machine epsilon of Y's dtype times its norm) keeps the [k, k] core positive definite
    when C has rank below k; it is subtracted again from the eigenvalues."""
    eps = torch.finfo(y.dtype).eps
    y64, om = y.double(), omega.double()
    nu = eps * y.shape[0] ** 0.5 * torch.linalg.matrix_norm(y64)
    yv = y64 + nu * om
    core = om.T @ yv
    w, v = torch.linalg.eigh((core + core.T) / 2)
    keep = w > w.max().clamp(min=0) * 1e-12
    if not bool(keep.any()):
        return y.new_zeros(0), y.new_zeros(y.shape[0], 0)
    e = yv @ (v[:, keep] / w[keep].sqrt())
    u, s, _ = torch.linalg.svd(e, full_matrices=False)
    lam = (s.pow(2) - nu).clamp(min=0)
    return lam.to(y.dtype), u.to(y.dtype)


def energy_rank(vals: torch.Tensor, total: float, energy: float, max_rank: int) -> tuple[int, float]:
    """Smallest r whose leading `vals` reach `energy` of `total` (capped), and the share they hold."""
    if total <= 0 or vals.numel() == 0:
        return 0, 0.0
    share = torch.cumsum(vals.double(), 0) / total
    r = int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype, device=share.device)).item()) + 1
    r = min(r, max_rank, vals.numel())
    return r, float(share[r - 1])


def lowrank_basis(
    y: torch.Tensor, omega: torch.Tensor, total: float, energy: float, max_rank: int
) -> tuple[torch.Tensor, float]:
    """Basis [n, r] of a sketched covariance by the energy rule, and the (lower-bound) share it keeps."""
    _, basis, kept = lowrank_eig(y, omega, total, energy, max_rank)
    return basis, kept


def lowrank_eig(
    y: torch.Tensor, omega: torch.Tensor, total: float, energy: float, max_rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """As `lowrank_basis`, with the basis directions' (Nyström) eigenvalues [r] first."""
    vals, vecs = nystrom_eig(y, omega)
    r, kept = energy_rank(vals, total, energy, max_rank)
    return vals[:r].contiguous(), vecs[:, :r].contiguous(), kept

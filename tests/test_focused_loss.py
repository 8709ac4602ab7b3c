"""objective.focused_losses: the forget loss weighted toward the samples the model fits best."""

from __future__ import annotations

import pytest
import torch

from mtu_dist.runner.objective import focused_losses, global_counts, normalised_losses


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    depth = torch.rand(n, 1, 4, 5, generator=g, dtype=torch.float64) + 0.5
    mask = torch.ones(n, 1, dtype=torch.bool)
    mask[-1, 0] = False  # an unsupervised sample has no weight
    preds = {"depth": (depth + torch.randn(n, 1, 4, 5, generator=g, dtype=torch.float64) * 0.3).requires_grad_()}
    return preds, {"depth": depth, "mask": mask, "valid": torch.ones(n, dtype=torch.bool)}


def test_power_zero_is_the_plain_loss():
    preds, batch = _batch()
    plain = normalised_losses(preds, batch, ("depth",), global_counts(batch, 1))["depth"]
    focused = focused_losses(preds, batch, ("depth",), 1, 0.0)["depth"]
    torch.testing.assert_close(focused, plain, rtol=1e-12, atol=0)


def test_weights_follow_mean_over_loss_to_the_power_and_average_one():
    preds, batch = _batch()
    power = 2.0
    per = (preds["depth"] - batch["depth"]).abs().mean((1, 2, 3)).detach()[:-1]  # the supervised samples
    w = (per.mean() / per) ** power
    w = w / w.mean()
    expected = (w * per).sum() / per.numel()
    got = focused_losses(preds, batch, ("depth",), 1, power)["depth"]
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    # the gradient of sample b is w_b times its plain gradient (the weights carry none)
    got.backward()
    grads = preds["depth"].grad.clone()
    preds["depth"].grad = None
    normalised_losses(preds, batch, ("depth",), global_counts(batch, 1))["depth"].backward()
    plain = preds["depth"].grad
    assert grads[-1].abs().sum() == 0  # the unsupervised sample
    for b in range(per.numel()):
        torch.testing.assert_close(grads[b], w[b] * plain[b], rtol=1e-10, atol=1e-14)
    assert w[per.argmin()] == w.max() and w.max() > 1 > w.min()  # the best-fit sample weighs most

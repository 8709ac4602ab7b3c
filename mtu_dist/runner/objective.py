"""Masked multi-task losses, normalised by *global* supervision counts.

Task t's loss on a step is  sum_b mask[b,t] * l_t(b) / N_t  with N_t the number of supervised samples
of task t across all ranks, and the total is the sum over tasks. The sum of every rank's local total
is then exactly the loss of the global batch, so 1-rank and N-rank runs optimise the same objective
whatever the split (DDP averages gradients, so callers scale by the world size before backward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mtu_dist.tasks import TASKS


def global_counts(batch: dict, world: int) -> torch.Tensor:
    """[T] supervised-sample counts summed over ranks (one tiny all-reduce)."""
    counts = (batch["mask"] & batch["valid"][:, None]).sum(0).double()
    if world > 1:
        dist.all_reduce(counts)
    return counts


def task_loss_sums(preds: dict, batch: dict, tasks: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Per task: sum over local supervised samples of the per-sample loss (a differentiable scalar)."""
    mask = (batch["mask"] & batch["valid"][:, None]).float()
    return {t: (TASKS[t].per_sample_loss(preds[t], batch[t]) * mask[:, j]).sum() for j, t in enumerate(tasks)}


def normalised_losses(
    preds: dict, batch: dict, tasks: tuple[str, ...], counts: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per task: this rank's share of the global-batch loss."""
    sums = task_loss_sums(preds, batch, tasks)
    return {t: sums[t] / counts[j].clamp(min=1).to(sums[t].dtype) for j, t in enumerate(tasks)}


def focused_losses(
    preds: dict, batch: dict, tasks: tuple[str, ...], world: int, power: float
) -> dict[str, torch.Tensor]:
    """Per task: this rank's share of the global-batch loss with sample b weighted by (m_t / l_t(b))^power,
    m_t the global batch's mean loss, the weights rescaled to mean 1 over its supervised samples (power 0:
    `normalised_losses`). An ascent on it pushes hardest on the samples the model still fits best, the
    ones a membership attack picks out. Weights and means are global (two small all-reduces) and carry
    no gradient, so 1 and N ranks optimise the same objective."""
    mask = (batch["mask"] & batch["valid"][:, None]).to(torch.float64)
    per = torch.stack([TASKS[t].per_sample_loss(preds[t], batch[t]) for t in tasks], 1)  # [B, T]
    loss = per.detach().double()
    sums = torch.cat([(loss * mask).sum(0), mask.sum(0)])
    if world > 1:
        dist.all_reduce(sums)
    counts = sums[len(tasks) :].clamp(min=1)
    mean = sums[: len(tasks)] / counts
    raw = (mean / loss.clamp(min=1e-12)).clamp(max=1e6).pow(power) * mask  # a zero loss is not an infinite weight
    total = raw.sum(0)
    if world > 1:
        dist.all_reduce(total)
    weights = (raw * (counts / total.clamp(min=1e-30))).to(per.dtype)
    return {t: (per[:, j] * weights[:, j]).sum() / counts[j].to(per.dtype) for j, t in enumerate(tasks)}


def reduce_for_logging(values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """Sum each rank's share (detached) -> the global-batch value, in one all-reduce."""
    keys = sorted(values)
    flat = torch.stack([values[k].detach().double() for k in keys])
    if world > 1:
        dist.all_reduce(flat)
    return dict(zip(keys, flat.tolist()))

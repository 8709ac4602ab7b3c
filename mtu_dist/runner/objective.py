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


def reduce_for_logging(values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """Sum each rank's share (detached) -> the global-batch value, in one all-reduce."""
    keys = sorted(values)
    flat = torch.stack([values[k].detach().double() for k in keys])
    if world > 1:
        dist.all_reduce(flat)
    return dict(zip(keys, flat.tolist()))

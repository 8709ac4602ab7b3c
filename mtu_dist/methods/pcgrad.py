"""`pcgrad`: gradient surgery across the forget and retain task gradients (PCGrad: Yu et al.,
"Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1).

The "tasks" are the negated forget gradients of the target tasks, -(1 - alpha) g_forget^t, and the
retain gradients of every task, alpha g_retain^u. For each task i, in a random order over the others
j: if g_i^PC . g_j < 0, g_i^PC <- g_i^PC - (g_i^PC . g_j) / |g_j|^2 g_j (projection onto the normal
plane of the ORIGINAL g_j). The update is sum_i g_i^PC.

Every projected gradient stays a linear combination of the originals, g_i^PC = sum_k C[i, k] g_k, and
the surgery only ever needs inner products, so it runs on the K x K Gram matrix alone: one small
all-reduce in the sharded mode (docs/design.md §5), bit-for-bit the same recipe in either mode. The
random orders come from a generator seeded by (seed, step): identical on every rank, never the
global RNG. Surgery covers the shared parameters (the paper's setting: task-specific parameters get
their own gradients); `heads: true` extends it to the heads' columns.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from mtu_dist.distributed.gradstep import allreduce_small
from mtu_dist.methods.base import StepContext
from mtu_dist.methods.signal_method import SignalMethod


class PCGradOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    heads: bool = False  # surgery over the task heads' columns too (default: shared parameters only)


def pcgrad_orders(k: int, gen: torch.Generator) -> list[list[int]]:
    """Per task i, the other tasks in a random order (from the CPU generator `gen`, whatever the device)."""
    return [[j for j in torch.randperm(k, generator=gen, device="cpu").tolist() if j != i] for i in range(k)]


def pcgrad_coefficients(gram: torch.Tensor, orders: list[list[int]]) -> tuple[torch.Tensor, int]:
    """C [K, K] with g_i^PC = sum_k C[i, k] g_k, from the Gram matrix of the g_k only; and the number of
    projections made (conflicting pairs met)."""
    coef = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    projections = 0
    for i, order in enumerate(orders):
        for j in order:
            dot = coef[i] @ gram[:, j]
            if dot < 0 and gram[j, j] > 0:
                coef[i, j] -= dot / gram[j, j]
                projections += 1
    return coef, projections


class PCGrad(SignalMethod):
    Options = PCGradOptions

    def setup(self, ctx: StepContext, retain_batches, forget_batches) -> dict[str, float]:
        self.setup_layout(ctx)
        self.surgery_cols = self.column_mask(heads=self.opts.heads)
        return {}

    def step(self, ctx: StepContext, forget: dict, retain: dict) -> tuple[torch.Tensor, dict]:
        tasks, targets = ctx.tasks, ctx.targets
        f, r, _ = self.forward_losses(ctx, forget, retain)
        x = self.signals([f[t] for t in targets] + [r[u] for u in tasks], ctx, probe=True)  # [blocks, K, S]
        weight = torch.tensor(
            [-(1 - ctx.alpha)] * len(targets) + [ctx.alpha] * len(tasks), dtype=x.dtype, device=x.device
        )
        vecs = x * weight[None, :, None]
        cols = self.surgery_cols[self.blocks][:, None].to(x.dtype)  # [blocks, 1, S]
        masked = vecs * cols
        gram = allreduce_small(torch.einsum("bks,bls->kl", masked, masked), self.mode, ctx.world)
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + ctx.step)
        # the K x K surgery runs on the host: K^2 sign tests would each wait on the device
        coef, projections = pcgrad_coefficients(gram.cpu(), pcgrad_orders(gram.shape[0], gen))
        combined = torch.einsum("k,bks->bs", coef.sum(0).to(vecs.device), vecs)
        update = torch.where(cols[:, 0].bool(), combined, vecs.sum(1))  # outside surgery: the plain sum
        self.write_update(update, ctx)
        k = gram.shape[0]
        share = projections / max(k * (k - 1), 1) / ctx.world  # global: divided as the runner sums over ranks
        return self.step_result(ctx, f, r, {"pcgrad/projected_pairs": torch.tensor(share, device=x.device)})

"""`orthograd`: the forget gradient projected off the span of the per-sample retain gradients
(OrthoGrad: Shamsian et al., "Go Beyond Your Means: Unlearning with Per-Sample Gradient
Orthogonalization", arXiv 2503.02312).

Each step: g_f = gradient of the summed forget losses of the target tasks; R = the per-sample retain
gradients of the retain batch (each sample's supervised task losses summed; `span_samples` per rank,
default the whole local batch). g_f <- g_f - R^T (R R^T)^+ R g_f, over every parameter, so to first
order the forget step changes no retain sample's loss. Each row of R comes from that sample's own
forward and backward (GroupNorm: a sample's output does not depend on its batch), so the m rows cost
about one batch backward, not m backward passes through the whole batch's graph; the other ranks'
rows are exact zeros from a graph-free zero loss. Only the Gram matrix of [g_f; R] is needed:
one small all-reduce in the sharded mode (docs/design.md §5). The update is the runner's common
alpha * g_retain - (1 - alpha) * g_f (alpha = `unlearn.alpha`; the retain term does not compete with
the forget term, which is orthogonal to every retain sample; `unlearn.alpha=0` is the pure projected
ascent).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from mtu_dist.distributed.gradstep import allreduce_small
from mtu_dist.methods.base import StepContext
from mtu_dist.methods.iamu import orthogonalize
from mtu_dist.methods.signal_method import SignalMethod
from mtu_dist.tasks import TASKS


class OrthoGradOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    span_samples: int | None = Field(None, ge=1)  # per-sample retain gradients per rank (None: the local batch)


class OrthoGrad(SignalMethod):
    Options = OrthoGradOptions

    def setup(self, ctx: StepContext, retain_batches, forget_batches) -> dict[str, float]:
        self.setup_layout(ctx)
        return {}

    def step(self, ctx: StepContext, forget: dict, retain: dict) -> tuple[torch.Tensor, dict]:
        f, r, _ = self.forward_losses(ctx, forget, retain)
        n = self.opts.span_samples or retain["image"].shape[0]
        x = self.signals(
            [sum(f[t] for t in ctx.targets), sum(r.values()), *self.span_losses(retain, ctx, n)], ctx, probe=True
        )
        g_f, g_r, span = x[:, 0], x[:, 1], x[:, 2:]  # [blocks, S], [blocks, S], [blocks, m, S]
        vecs = torch.cat([g_f[:, None], span], 1)
        gram = allreduce_small(torch.einsum("bks,bls->kl", vecs, vecs), self.mode, ctx.world)
        c = orthogonalize(gram)
        g_orth = g_f - torch.einsum("k,bks->bs", c, span)
        kept = (gram[0, 0] - 2 * c @ gram[1:, 0] + c @ gram[1:, 1:] @ c) / gram[0, 0].clamp(min=1e-30)
        self.write_update(ctx.alpha * g_r - (1 - ctx.alpha) * g_orth, ctx)
        return self.step_result(ctx, f, r, {"orthograd/kept_norm2": kept.detach() / ctx.world})  # global

    def span_losses(self, retain: dict, ctx: StepContext, n: int) -> list[torch.Tensor]:
        """world * n scalar losses whose gradients are the span rows: rank r fills rows r*n..r*n+n-1 with
        its first n samples' supervised task losses (summed), each forwarded alone, and zeros elsewhere, so
        the sum-reduce of the signal buffer concatenates every rank's per-sample gradients."""
        zero = sum(p.sum() for p in self.params) * 0.0  # a zero gradient without a backward through the model
        sup = retain["mask"] & retain["valid"][:, None]
        mine = []
        for i in range(n):
            if i >= sup.shape[0]:  # span_samples above the local batch
                mine.append(zero)
                continue
            preds = ctx.model(retain["image"][i : i + 1])
            mine.append(
                sum(
                    TASKS[t].per_sample_loss(preds[t], retain[t][i : i + 1])[0] * sup[i, j].to(preds[t].dtype)
                    for j, t in enumerate(ctx.tasks)
                )
            )
        return [mine[i] if r == ctx.rank else zero for r in range(ctx.world) for i in range(n)]

"""`salun`: saliency-masked random labeling (Fan et al., "SalUn: Empowering Machine Unlearning via
Gradient-based Weight Saliency", ICLR 2024).

1. Weight saliency (setup, once, at the original parameters): s = |grad of the forget loss|, the loss
   summed over `saliency_batches` batches of the forget stream (the paper uses the whole forget set).
   The mask keeps exactly the top `fraction` of all trainable weights by saliency — one global
   ranking over every parameter, as in the authors' mask generation (paper default: half).
2. Each step: the random_label objective (random targets for the forget pairs + the retain loss), with
   the gradient of every non-salient weight set to zero, so only salient weights move (under SGD, with
   or without momentum, and Adam alike: a weight whose gradient is always zero never moves).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from mtu_dist.methods.random_label import RandomLabel


class SalUnOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fraction: float = Field(0.5, gt=0, le=1)  # share of weights kept trainable (the most salient)
    saliency_batches: int = Field(4, ge=1)  # forget batches the saliency gradient is summed over


def top_fraction_mask(scores: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """Bool masks (shaped like `scores`) keeping exactly round(fraction * total) of the highest scores,
    ranked globally across every tensor (ties broken by position, identically on every rank)."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, round(fraction * flat.numel()), sorted=False).indices] = True
    return [m.view_as(s) for m, s in zip(keep.split([s.numel() for s in scores]), scores)]


class SalUn(RandomLabel):
    Options = SalUnOptions

    def setup(self, ctx, retain_batches, forget_batches) -> dict[str, float]:
        # The saliency gradient is taken on the unwrapped model and reduced here: under DeepSpeed the
        # engine would partition it (no .grad to read); one all-reduce per batch, as DDP did.
        net = getattr(ctx.model, "module", ctx.model)
        self.params = [p for p in net.parameters() if p.requires_grad]
        total = [torch.zeros_like(p) for p in self.params]
        for _ in range(self.opts.saliency_batches):
            (f,) = replace(ctx, model=net).losses(next(forget_batches))
            grads = torch.autograd.grad(sum(f.values()), self.params, allow_unused=True)
            flat = torch.cat(
                [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, self.params)]
            )
            if ctx.world > 1:  # every rank's share of the global forget loss: their sum is its gradient
                dist.all_reduce(flat)
            for t, g in zip(total, flat.split([p.numel() for p in self.params])):
                t += g.view_as(t)
        self.masks = top_fraction_mask([t.abs() for t in total], self.opts.fraction)
        if ctx.world > 1:  # one mask for every rank, whatever the last bits of the reduced gradients
            flat = torch.cat([m.reshape(-1) for m in self.masks]).to(torch.uint8)
            dist.broadcast(flat, src=0)
            self.masks = [
                m.view_as(p).bool() for m, p in zip(flat.split([p.numel() for p in self.params]), self.params)
            ]
        # masked where each gradient is formed, before DDP or DeepSpeed reduces (and partitions) it
        for p, m in zip(self.params, self.masks):
            p.register_hook(lambda g, m=m: g * m.to(g.dtype))
        kept = sum(int(m.sum()) for m in self.masks) / sum(m.numel() for m in self.masks)
        return {"saliency_kept": kept}

"""`l1_sparse`: finetune on the retain signal with an L1 penalty on the parameters (l1-sparse MU: Jia
et al., "Model Sparsity Can Simplify Machine Unlearning", NeurIPS 2023, eq. 4:
min_theta L_retain(theta) + gamma * ||theta||_1).

gamma follows the paper's schedule by default: it decays linearly from `l1` at the first step towards
0 over the step budget (`schedule: linear`); `schedule: constant` keeps it fixed. The penalty covers
every trainable parameter. Each rank adds 1/world of it, so the objective summed over ranks is
exactly retain + gamma * ||theta||_1 whatever the world size.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mtu_dist.methods.base import Method


class L1SparseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    l1: float = Field(5e-4, ge=0)  # gamma at the first step
    schedule: Literal["linear", "constant"] = "linear"  # linear: gamma * (1 - (step - 1) / steps)


class L1Sparse(Method):
    Options = L1SparseOptions
    uses_forget = False

    def gamma(self, ctx) -> float:
        if self.opts.schedule == "constant":
            return self.opts.l1
        return self.opts.l1 * (1 - (ctx.step - 1) / ctx.config.steps)

    def objective(self, ctx, forget, retain):
        (r,) = ctx.losses(retain)
        norm = sum(p.abs().sum() for p in ctx.model.parameters() if p.requires_grad)
        penalty = self.gamma(ctx) * norm / ctx.world
        total = sum(r.values()) + penalty
        return total, {**{f"retain/{t}": v for t, v in r.items()}, "l1_penalty": penalty}

"""`grad_ascent`: maximise the loss on the forget pairs only (Thudi et al., "Unrolling SGD:
Understanding Factors Influencing Machine Unlearning", EuroS&P 2022). No retain term: the reference
point for how much damage unconstrained forgetting does."""

from __future__ import annotations

from mtu_dist.methods.base import Method


class GradAscent(Method):
    uses_retain = False

    def objective(self, ctx, forget, retain):
        (f,) = ctx.losses(forget)
        return -sum(f.values()), {f"forget/{t}": v for t, v in f.items()}

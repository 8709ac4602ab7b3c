"""`neggrad_plus`: alpha * retain loss - (1 - alpha) * forget loss (NegGrad+, Kurmanji et al.,
"Towards Unbounded Machine Unlearning", NeurIPS 2023). alpha is `unlearn.alpha`."""

from __future__ import annotations

from mtu_dist.methods.base import Method


class NegGradPlus(Method):
    def objective(self, ctx, forget, retain):
        f, r = ctx.losses(forget, retain)
        total = ctx.alpha * sum(r.values()) - (1 - ctx.alpha) * sum(f.values())
        return total, {**{f"forget/{t}": v for t, v in f.items()}, **{f"retain/{t}": v for t, v in r.items()}}

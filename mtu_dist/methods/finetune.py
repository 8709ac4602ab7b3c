"""`finetune`: keep training on the retain signal only, letting the forget pairs fade (catastrophic
forgetting as unlearning; the standard baseline, e.g. Golatkar et al., CVPR 2020, "Eternal Sunshine
of the Spotless Net", and every benchmark since)."""

from __future__ import annotations

from mtu_dist.methods.base import Method


class Finetune(Method):
    uses_forget = False

    def objective(self, ctx, forget, retain):
        (r,) = ctx.losses(retain)
        total = sum(r.values())
        return total, {**{f"retain/{t}": v for t, v in r.items()}}

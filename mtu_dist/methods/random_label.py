"""`random_label`: fit the forget pairs to random targets while training on the retain signal
(Random Labeling: Graves et al., "Amnesiac Machine Learning", AAAI 2021; the objective SalUn builds on,
Fan et al., ICLR 2024, eq. 6: E_forget l(x, y' != y) + E_retain l(x, y)).

Dense analogue, per forget pair (instance i, task t):
* class-label tasks (`seg`): every labelled pixel gets a class other than its label, uniform over the
  other C - 1 (y' != y, as in SalUn); ignored pixels stay ignored. The draw depends only on (seed, key):
  the forget set is relabelled once, as in the papers, whatever the step or the rank.
* map-valued tasks (`depth`, `normal`): there is no "wrong class" for a map, so the target is the whole
  map of ANOTHER instance — a donor drawn (seeded by seed, step, key) from this step's local retain batch
  among the samples whose task t is retain-supervised. Such a pair is never a forget pair (the retain
  stream masks and blanks those) and never instance i itself; donors are recorded in the ledger under
  role `target` for the leak audit. A forget pair with no donor in the local batch gets no random
  target this step (its mask is turned off, and the global normalisation counts without it).
Objective: alpha * retain + (1 - alpha) * random-target forget loss (alpha = `unlearn.alpha`).
"""

from __future__ import annotations

import zlib

import torch

from mtu_dist.methods.base import Method
from mtu_dist.tasks import IGNORE_INDEX


def seeded(*parts) -> torch.Generator:
    """A generator that depends only on `parts` (identical on every rank and in every world size)."""
    return torch.Generator().manual_seed(zlib.crc32("|".join(map(str, parts)).encode()))


def random_classes(labels: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """Each labelled pixel -> a class other than its own, uniform over the other C - 1; ignore stays.
    Drawn from the CPU generator `gen` (the same draw on any device), then moved to the labels."""
    if num_classes < 2:
        raise ValueError("random_label needs at least 2 classes")
    shift = torch.randint(1, num_classes, labels.shape, generator=gen, device="cpu").to(labels.device)
    labelled = (labels >= 0) & (labels < num_classes) & (labels != IGNORE_INDEX)
    return torch.where(labelled, (labels + shift) % num_classes, labels)


def random_targets(ctx, forget: dict, retain: dict) -> dict:
    """`forget` with every supervised pair's label replaced by its random target (see module docstring)."""
    out = {**forget, "mask": forget["mask"].clone()}
    sup = forget["mask"] & forget["valid"][:, None]
    donated = torch.zeros_like(retain["mask"])  # [B_retain, T]: the retain pairs lent as targets
    for j, t in enumerate(ctx.tasks):
        rows = sup[:, j].nonzero().flatten().tolist()
        if not rows:
            continue
        label = forget[t].clone()
        pool = (retain["mask"][:, j] & retain["valid"]).nonzero().flatten().tolist()
        for b in rows:
            key = forget["key"][b]
            if not label.is_floating_point():
                label[b] = random_classes(forget[t][b], ctx.num_classes, seeded(ctx.seed, t, key))
                continue
            donors = [d for d in pool if retain["key"][d] != key]
            if not donors:
                out["mask"][b, j] = False
                continue
            draw = torch.randint(len(donors), (1,), generator=seeded(ctx.seed, ctx.step, t, key), device="cpu")
            d = donors[int(draw)]
            label[b] = retain[t][d]
            donated[d, j] = True
        out[t] = label
    ctx.record({"key": retain["key"], "mask": donated, "valid": retain["valid"]}, "target")
    return out


class RandomLabel(Method):
    def objective(self, ctx, forget, retain):
        f, r = ctx.losses(random_targets(ctx, forget, retain), retain)
        total = ctx.alpha * sum(r.values()) + (1 - ctx.alpha) * sum(f.values())
        return total, {**{f"random/{t}": f[t] for t in ctx.targets}, **{f"retain/{t}": v for t, v in r.items()}}

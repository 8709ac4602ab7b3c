"""The unlearning-method interface: a method implements one function.

Most methods are an objective over a forget batch and a retain batch (`objective`); the runner does
the forward/backward, clipping, divergence guard and optimizer step, identically for every method.
Methods that manipulate per-task gradients override `step` instead. Method knobs are a pydantic
`Options` model, validated from `unlearn.options` in the config.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict

from ..objective import global_counts, normalised_losses


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class StepContext:
    """What a method may use at one step."""
    model: torch.nn.Module       # possibly DDP-wrapped
    tasks: tuple[str, ...]
    world: int
    alpha: float                 # unlearn.alpha: retain weight
    step: int

    def losses(self, *batches: dict) -> list[dict[str, torch.Tensor]]:
        """Per batch and task: this rank's share of the global-batch loss (masked, globally normalised).

        All batches go through ONE forward pass (concatenated): cheaper, and DDP sees one forward per
        backward. GroupNorm keeps samples independent, so concatenation changes no value.
        """
        sizes = [b["image"].shape[0] for b in batches]
        preds = self.model(torch.cat([b["image"] for b in batches]))
        out, start = [], 0
        for b, n in zip(batches, sizes):
            part = {t: p[start:start + n] for t, p in preds.items()}
            out.append(normalised_losses(part, b, self.tasks, global_counts(b, self.world)))
            start += n
        return out


class Method:
    """Base class. Subclasses set `Options` and implement `objective`."""

    Options: type[BaseModel] = NoOptions
    uses_retain: bool = True     # whether the runner needs to stream retain batches

    def __init__(self, options: dict):
        self.opts = self.Options.model_validate(options)

    def objective(self, ctx: StepContext, forget: dict, retain: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (scalar to minimise, named parts to log) for this rank's share of the global batch."""
        raise NotImplementedError

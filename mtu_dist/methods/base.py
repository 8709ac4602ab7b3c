"""The unlearning-method interface: a method implements one function.

Most methods are an objective over a forget batch and a retain batch (`objective`); the runner does
the forward/backward, clipping, divergence guard and optimizer step, identically for every method.
Methods that manipulate per-task gradients override `step` instead. Method knobs are a pydantic
`Options` model, validated from `unlearn.options` in the config.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict

from mtu_dist.runner.objective import global_counts, normalised_losses

if TYPE_CHECKING:
    from mtu_dist.config import UnlearnConfig


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _record_nothing(batch: dict, role: str) -> None:
    pass


@dataclass
class StepContext:
    """What a method may use at one step."""

    model: torch.nn.Module  # DDP-wrapped (or DeepSpeed's engine) unless the method manages gradients itself
    tasks: tuple[str, ...]
    world: int
    alpha: float  # unlearn.alpha: retain weight
    step: int
    rank: int = 0
    targets: tuple[str, ...] = ()  # tasks with at least one forget pair in the request
    kept: tuple[str, ...] = ()  # tasks at least one forget instance keeps (a partial request's other tasks)
    config: UnlearnConfig | None = None  # the `unlearn` config section
    seed: int = 0  # the run's seed: methods derive every random draw from it (same on every rank)
    num_classes: int = 0  # seg classes
    # record(batch, role): put the supervision pairs of `batch` in the run's ledger under `role` (e.g. the
    # retain pairs a method borrows as targets); the runner wires it to the ledger
    record: Callable[[dict, str], None] = field(default=_record_nothing)
    # backward(loss): how a loss reaches the optimizer's gradients (under DeepSpeed: the engine's backward)
    backward: Callable[[torch.Tensor], None] = field(default=torch.Tensor.backward)
    # True under DeepSpeed: `backward` averages gradients over the ranks even for a model DDP does not wrap
    reducing_backward: bool = False

    def losses(self, *batches: dict) -> list[dict[str, torch.Tensor]]:
        """Per batch and task: this rank's share of the global-batch loss (masked, globally normalised).

        All batches go through ONE forward pass (concatenated): cheaper, and DDP sees one forward per
        backward. GroupNorm keeps samples independent, so concatenation changes no value.
        """
        sizes = [b["image"].shape[0] for b in batches]
        preds = self.model(torch.cat([b["image"] for b in batches]))
        out, start = [], 0
        for b, n in zip(batches, sizes):
            part = {t: p[start : start + n] for t, p in preds.items()}
            out.append(normalised_losses(part, b, self.tasks, global_counts(b, self.world)))
            start += n
        return out


@functools.cache
def _strict(options: type[BaseModel]) -> type[BaseModel]:
    """The method's option schema under the config's type rules (no bool for a number, no fraction for
    an integer, no NaN/inf)."""
    from mtu_dist.config import Strict

    return type(options.__name__, (options, Strict), {})


class Method:
    """Base class. Subclasses set `Options` and implement `objective` (loss-based methods) or
    override `step` and set `manages_gradients` (methods that combine per-task gradient signals)."""

    Options: type[BaseModel] = NoOptions
    uses_retain: bool = True  # whether the runner streams retain batches to this method
    uses_forget: bool = True  # ... and forget batches (what is not used is not consumed or recorded)
    manages_gradients: bool = False  # True: `step` writes .grad itself; the model is not DDP-wrapped
    # True: forget batches also carry their instances' kept supervision (`kept_mask`, `kept_<task>`;
    # stream.kept_view reads it as a batch), recorded as retain pairs
    uses_kept: bool = False

    def __init__(self, options: dict):
        self.opts = _strict(self.Options).model_validate(options)

    def momentum(self, configured: float) -> float:
        """The SGD momentum the runner's optimizer gets: `unlearn.momentum`, unless the method's update
        rule fixes its own (the optimizer keeps the buffer: checkpointed and resumed as any optimizer state)."""
        return configured

    def setup(
        self, ctx: StepContext, retain_batches: Iterator[dict] | None, forget_batches: Iterator[dict] | None
    ) -> dict[str, float]:
        """Once before unlearning (e.g. subspaces from the retain stream, a saliency mask from the forget
        stream); either iterator is None when the method does not use it. Returns values to log.
        A resumed run calls it again on the original model with the same batches, so whatever it
        computes comes back by itself; state that changes later belongs in `resume_state`."""
        return {}

    def resume_state(self) -> dict:
        """JSON-able state, changed after `setup`, that a resumed run must get back (`restore`)."""
        return {}

    def restore(self, state: dict) -> None:
        """Take back what `resume_state` returned at the resume point."""

    def objective(self, ctx: StepContext, forget: dict, retain: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (scalar to minimise, named parts to log) for this rank's share of the global batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement objective() or step()")

    def step(self, ctx: StepContext, forget: dict, retain: dict | None) -> tuple[torch.Tensor, dict]:
        """Leave this step's gradient in every parameter's .grad; return (objective, parts to log)."""
        loss, parts = self.objective(ctx, forget, retain)
        ctx.backward(loss * ctx.world)  # DDP/DeepSpeed average over ranks; the objective is a sum
        return loss, parts

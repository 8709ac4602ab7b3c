"""What the training and unlearning loops share: resume points, the divergence guard, the stop rule.

A resume point is a checkpoint `checkpoints/step-NNNNNNN/` with the optimizer state and the ledger of
everything consumed so far (gathered over the ranks); a loop adds its own state under a key of its
own (`unlearn`: stream positions, guard reference, done tasks, the method's state). Loading one first
checks that the run may continue from it (same config, world size, data, request, origin).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from mtu_dist.compliance.ledger import Ledger
from mtu_dist.data.stream import blank_sample
from mtu_dist.errors import UserError
from mtu_dist.evaluation.evaluate import instance_batches, primary, run_split
from mtu_dist.runner.checkpoint import (
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    prune,
    read_state,
    save_checkpoint,
)
from mtu_dist.runner.session import Session, run_info

if TYPE_CHECKING:
    from pathlib import Path


# ---------------------------------------------------------------- resume points


def save_resume_point(
    s: Session,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    step: int,
    epoch: int,
    ledger: Ledger,
    keep: int,
    **state,
) -> None:
    """Write `checkpoints/step-NNNNNNN` (rank 0) and prune all but the newest `keep`; every rank calls it."""
    consumed = ledger.gather(s.world)  # collective: every rank calls it
    if s.is_main:
        folder = s.run_dir / "checkpoints" / f"step-{step:07d}"
        save_checkpoint(
            folder,
            model,
            step=step,
            epoch=epoch,
            config=s.cfg.model_dump(mode="json"),
            info={**run_info(s), "ledger": consumed, **state},
            optimizer=optimizer,
        )
        prune(folder.parent, keep)
    s.barrier()


def load_resume_point(
    s: Session, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, ledger: Ledger
) -> dict | None:
    """Load the newest good resume point into `model`, `optimizer` and `ledger`; its state.json, or None
    when the run has none yet (it then starts from step 0)."""
    folder: Path | None = latest_checkpoint(s.run_dir / "checkpoints")
    if folder is None:
        return None
    check_resumable(read_state(folder), s.cfg.model_dump(mode="json"), run_info(s))  # before loading anything
    meta = load_checkpoint(folder, model, optimizer)
    ledger.restore(meta.get("ledger", {}), s.is_main)  # rank 0 carries what was consumed before the crash
    if s.is_main:
        print(f"resuming from {folder} (step {meta['step']})")
    return meta


# ---------------------------------------------------------------- divergence guard


def diverged(
    loss: float, gnorm: float, first: tuple[float, float] | None = None, factor: float = math.inf
) -> str | None:
    """Why a step diverged, or None: a non-finite loss or gradient norm, or (given the first step's
    `first` = (|loss|, grad norm)) one above `factor` times its first value."""
    if not math.isfinite(loss) or not math.isfinite(gnorm):
        return "non-finite loss or gradient"
    if first is None:
        return None
    if abs(loss) > factor * first[0]:
        return f"|loss| {abs(loss):.3g} > {factor} x first {first[0]:.3g}"
    if gnorm > factor * first[1]:
        return f"grad norm {gnorm:.3g} > {factor} x first {first[1]:.3g}"
    return None


class DivergenceGuard:
    """Keeps the parameters of the last good step, so a diverged step can be undone. The norm before
    clipping is known only after the optimizer stepped (under ZeRO), so a diverged step is undone
    rather than skipped (the same parameters either way)."""

    def __init__(self, model: torch.nn.Module, factor: float, first: tuple[float, float] | None = None):
        self.model, self.factor, self.first = model, factor, first
        self.good = _keep(model)

    def check(self, loss: float, gnorm: float) -> str | None:
        """After a step: why it diverged, or None (the first step sets the reference)."""
        self.first = self.first or (abs(loss) + 1e-8, gnorm + 1e-8)
        return diverged(loss, gnorm, self.first, self.factor)

    def undo(self) -> None:
        self.model.load_state_dict(self.good)

    def passed(self) -> None:
        """The step is good: its parameters become the ones to go back to."""
        _keep(self.model, self.good)


def _keep(model: torch.nn.Module, good: dict | None = None) -> dict:
    """The guard's copy of the parameters and buffers: cloned once, then refreshed in place after every
    step (a deep copy per step cost as much as a few percent of an unlearning step)."""
    state = model.state_dict()
    if good is None:
        return {k: v.detach().clone() for k, v in state.items()}
    with torch.no_grad():
        for k, v in state.items():
            good[k].copy_(v)
    return good


# ---------------------------------------------------------------- stop rule


class StopRule:
    """Per target task, a primary-metric level on the forget pairs at which the task is *done*
    (`unlearn.stop_at`, `stop_drop` or `stop_band`); none of them set: never done. Thresholds come
    from the original model, before any step (a resumed run recomputes the same ones)."""

    def __init__(
        self,
        s: Session,
        model: torch.nn.Module,
        forget_set: list[dict],
        original_val: dict | None,
        targets: tuple[str, ...],
    ):
        self.s, self.forget_set, self.targets = s, forget_set, targets
        self.thresholds = self._thresholds(model, original_val)
        self.done: set[str] = set()

    def mask(self) -> torch.Tensor:
        """Bool over tasks, the done ones on; it masks the recorded batches on the CPU, before they move."""
        return torch.tensor([t in self.done for t in self.s.manifest.tasks], device="cpu")

    def update(self, model: torch.nn.Module) -> bool:
        """After a step: the tasks done now (forget pairs at or below their threshold); True when every
        target task is done at once. Every target task is measured at every check: a task that was done
        can come back above its level while the shared layers move on for the others (measured: a
        100-scene request whose depth pairs, once done and no longer ascended, climbed back to 0.845
        against a threshold of 0.642), so it is ascended again instead of being counted as forgotten."""
        if not self.thresholds:
            return False
        metrics = self._forget_metrics(model, only=set(self.thresholds))
        self.done = {t for t in metrics if t in self.thresholds and primary(metrics, t) <= self.thresholds[t]}
        return self.done >= set(self.targets)

    def _thresholds(self, model: torch.nn.Module, original_val: dict | None) -> dict[str, float]:
        u = self.s.cfg.unlearn
        if u.stop_at is not None:
            missing = [t for t in self.targets if t not in u.stop_at]
            if missing:
                raise UserError(f"unlearn.stop_at: no level for target task(s) {missing} (got {sorted(u.stop_at)})")
            return {t: float(u.stop_at[t]) for t in self.targets}
        if u.stop_drop is not None:
            before = self._forget_metrics(model)
            return {t: primary(before, t) * (1 - u.stop_drop) for t in before}
        if u.stop_band is not None:
            if not original_val:
                raise UserError("unlearn.stop_band needs the original model's val metrics (metrics.json beside --from)")
            return {t: primary(original_val, t) + u.stop_band for t in self.targets}
        return {}

    def _forget_metrics(self, model: torch.nn.Module, only: set[str] | None = None) -> dict:
        s, m = self.s, self.s.manifest
        metrics, _ = run_split(
            model,
            instance_batches(self.forget_set, s.rank, s.world, 16, blank_sample(m)),
            m.tasks,
            m.num_classes,
            s.world,
            only=only,
            losses=False,
        )
        model.train()
        return metrics

"""`scrub`: teacher-student unlearning with alternating max and min steps (SCRUB: Kurmanji et al.,
"Towards Unbounded Machine Unlearning", NeurIPS 2023).

The teacher is a frozen copy of the original model; the student (the model being unlearned) starts
from it. A *max step* maximises the student-teacher divergence on the forget pairs; a *min step*
minimises `kd_weight` * divergence + `task_weight` * task loss on the retain signal. Max steps are
interleaved (one after every `min_per_max` min steps) during the first `max_until` of the step budget
only; the rest are min steps, so the student recovers on the retain set at the end, as in the paper
(max steps only for the first `msteps` epochs).
Schedule order: a cycle starts with its min steps. At the start the student IS the teacher, where the
divergence and its gradient are exactly zero: a max step there would be a no-op, so the first min
step moves the student off that stationary point first.

Dense divergences, per pixel, averaged over the sample's pixels: `seg` KL(teacher || student) of the
temperature-softened class distributions, times T^2 (Hinton distillation, as SCRUB's DistillKL);
`depth` squared error; `normal` 1 - cos. Divergences are weighted by the per-task supervision mask and
normalised by global counts, exactly like the losses. Defaults (T = 4, task_weight 0.99, kd_weight
0.001) are the weights of the authors' public CIFAR configuration.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from mtu_dist.methods.base import Method
from mtu_dist.runner.objective import global_counts, normalised_losses


class ScrubOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(4.0, gt=0)  # seg distillation temperature T
    task_weight: float = Field(0.99, ge=0)  # min step: weight of the retain task loss (gamma)
    kd_weight: float = Field(0.001, ge=0)  # min step: weight of the retain divergence (alpha)
    min_per_max: int = Field(1, ge=1)  # min steps before each max step
    max_until: float = Field(0.5, ge=0, le=1)  # max steps only within this fraction of unlearn.steps


def seg_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_s = F.log_softmax(student / temperature, dim=1)
    log_t = F.log_softmax(teacher / temperature, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(1)  # [B, H, W]
    return kl.flatten(1).mean(1) * temperature**2


def depth_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return (student - teacher).pow(2).flatten(1).mean(1)


def normal_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return (1 - (student * teacher).sum(1)).flatten(1).mean(1)  # both unit vectors


DIVERGENCES = {"seg": seg_divergence, "depth": depth_divergence, "normal": normal_divergence}


def divergences(student: dict, teacher: dict, batch: dict, tasks, world: int, temperature: float) -> dict:
    """Per task: this rank's share of the global-batch mean divergence over the supervised pairs."""
    counts = global_counts(batch, world)
    sup = batch["mask"] & batch["valid"][:, None]
    out = {}
    for j, t in enumerate(tasks):
        per = DIVERGENCES[t](student[t], teacher[t], temperature)
        out[t] = (per * sup[:, j].to(per.dtype)).sum() / counts[j].clamp(min=1).to(per.dtype)
    return out


class Scrub(Method):
    Options = ScrubOptions

    def setup(self, ctx, retain_batches, forget_batches) -> dict[str, float]:
        self.teacher = copy.deepcopy(getattr(ctx.model, "module", ctx.model)).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.history: list[str] = []  # "max" / "min" per step (tests, logs)
        return {}

    def kind(self, ctx) -> str:
        """'max' or 'min' for this step (see the module docstring)."""
        cycle = self.opts.min_per_max + 1
        in_max_phase = ctx.step <= self.opts.max_until * ctx.config.steps
        return "max" if in_max_phase and ctx.step % cycle == 0 else "min"

    def objective(self, ctx, forget, retain):
        kind = self.kind(ctx)
        self.history.append(kind)
        batch = forget if kind == "max" else retain
        student = ctx.model(batch["image"])
        with torch.no_grad():
            teacher = self.teacher(batch["image"])
        div = divergences(student, teacher, batch, ctx.tasks, ctx.world, self.opts.temperature)
        device = batch["image"].device
        if kind == "max":
            return -sum(div.values()), {
                "max_step": torch.tensor(1.0 / ctx.world, device=device),
                **{f"forget_div/{t}": div[t] for t in ctx.targets},
            }
        losses = normalised_losses(student, batch, ctx.tasks, global_counts(batch, ctx.world))
        total = self.opts.task_weight * sum(losses.values()) + self.opts.kd_weight * sum(div.values())
        return total, {
            "max_step": torch.tensor(0.0, device=device),
            **{f"retain_div/{t}": v for t, v in div.items()},
            **{f"retain/{t}": v for t, v in losses.items()},
        }

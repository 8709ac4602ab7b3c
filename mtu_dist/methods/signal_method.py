"""Base for methods that combine per-task gradient *signals* (iamu, pcgrad, orthograd, ...).

`setup_layout` builds the row-aligned parameter partition once; `signals` turns K scalar losses into
their reduced gradients with ONE collective over the [K, P] buffer (docs/design.md §5), in either
reduction mode, and returns the columns this rank works on as [blocks, K, S]. A subclass combines
them into an update, hands it to `write_update` (the optimizer's gradient, with or without DeepSpeed),
and the runner's optimizer steps. The model is not DDP-wrapped for these methods (no second all-reduce).
"""

from __future__ import annotations

import torch

from mtu_dist.distributed import signals as engines
from mtu_dist.distributed.gradstep import ParamLayout, gather_update, reduce_signals
from mtu_dist.methods.base import Method, StepContext
from mtu_dist.runner.objective import focused_losses, global_counts, normalised_losses
from mtu_dist.tasks import TASKS

Losses = dict[str, torch.Tensor]  # task -> this rank's share of the global-batch loss


class SignalMethod(Method):
    manages_gradients = True

    def setup_layout(self, ctx: StepContext) -> None:
        self.params = [p for p in ctx.model.parameters() if p.requires_grad]
        self.layout = ParamLayout(self.params, ctx.world)
        self.mode, self.engine = ctx.config.reduction, ctx.config.signal_engine
        # replicated (or 1 rank): this rank works on every block; sharded: only on its own
        self.blocks = list(range(ctx.world)) if (self.mode == "replicated" or ctx.world == 1) else [ctx.rank]
        shared_ids = {id(p) for p in ctx.model.shared_parameters()}
        self.shared_idx = {i for i, p in enumerate(self.params) if id(p) in shared_ids}
        index = {id(p): i for i, p in enumerate(self.params)}
        self.head_idx = {t: {index[id(p)] for p in ctx.model.task_parameters(t) if id(p) in index} for t in ctx.tasks}

    def column_mask(self, heads) -> torch.Tensor:
        """[N, S] bool: the shared parameters' columns, plus the heads' — all of them (`heads=True`), or
        those of the tasks named in `heads`; never padding."""
        tasks = self.head_idx if heads is True else (heads or ())
        wanted = self.shared_idx.union(*(self.head_idx[t] for t in tasks))
        mask = torch.zeros(self.layout.world, self.layout.shard, dtype=torch.bool, device="cpu")
        for pc in self.layout.pieces:
            if pc.index in wanted:
                mask[pc.rank, pc.dst : pc.dst + pc.n] = True
        return mask.to(self.params[0].device)  # filled on the host (one write per piece), moved once

    def my_pieces(self, indices):
        """The pieces (parameter rows) of `indices` that live in this rank's blocks."""
        wanted = set(indices)
        return [pc for b in self.blocks for pc in self.layout.pieces_of(b) if pc.index in wanted]

    def forward_losses(
        self, ctx: StepContext, forget: dict, retain: dict, focus: float = 0.0
    ) -> tuple[Losses, Losses, dict]:
        """The opening of every step: forget and retain batches through ONE forward pass (GroupNorm keeps
        samples independent), then per task the forget losses (weighted toward the best-fit samples with
        `focus` > 0: objective.focused_losses), the retain losses, and the predictions."""
        nf, tasks = forget["image"].shape[0], ctx.tasks
        preds = ctx.model(torch.cat([forget["image"], retain["image"]]))
        f_preds = {t: p[:nf] for t, p in preds.items()}
        f = (
            focused_losses(f_preds, forget, tasks, ctx.world, focus)
            if focus
            else normalised_losses(f_preds, forget, tasks, global_counts(forget, ctx.world))
        )
        r = normalised_losses({t: p[nf:] for t, p in preds.items()}, retain, tasks, global_counts(retain, ctx.world))
        return f, r, preds

    @staticmethod
    def step_result(ctx: StepContext, f: Losses, r: Losses, stats: dict) -> tuple[torch.Tensor, dict]:
        """The ending of every step: the objective it stands for, alpha * retain - (1 - alpha) * forget,
        and the parts to log, the method's `stats` last. The runner sums parts over ranks (they are
        per-rank shares), so a stat that is global already comes divided by the world size."""
        loss = ctx.alpha * sum(r.values()) - (1 - ctx.alpha) * sum(f.values())
        parts = {**{f"forget/{t}": f[t] for t in ctx.targets}, **{f"retain/{t}": r[t] for t in ctx.tasks}}
        return loss.detach(), {**parts, **stats}

    def signals(self, losses: list[torch.Tensor], ctx: StepContext, probe: bool = False) -> torch.Tensor:
        """Losses -> reduced signals, as [blocks, K, S] (the columns this rank works on)."""
        dtype = self.params[0].dtype
        buf = self.layout.new_buffer(len(losses), dtype, self.params[0].device)
        engine = self.engine
        if engine == "auto":  # measured once, on the first real step's K signals (setup just uses sequential)
            engine = (
                self._agreed(engines.pick_engine(losses, self.params, self.layout, buf, repeats=1), ctx)
                if probe
                else "sequential"
            )
            self.engine = engine if probe else "auto"
        engines.ENGINES[engine](losses, self.params, self.layout, buf)
        out = reduce_signals(buf, self.mode, ctx.rank, ctx.world)
        return out if out.dim() == 3 else out[None]

    def write_update(self, update: torch.Tensor, ctx: StepContext) -> None:
        """The combined update, [blocks, S] (the columns this rank worked on) -> the optimizer's gradient.

        Plain path: all-gathered (sharded mode) and written to .grad. Under DeepSpeed the engine's
        backward averages over the ranks, so each rank backwards the surrogate `sum_p <p, u_p>`, whose
        gradient is exactly its `u`: the whole update (replicated), or only the rows it owns times the
        world size (sharded: the average is the whole update, and no rank ever gathers it). The engine
        then reduces and partitions it like any gradient, and ZeRO steps each rank's partition.
        """
        if not ctx.reducing_backward:
            self.layout.unpack_into_grads(gather_update(update, self.mode, ctx.world))
            return
        scale = ctx.world if len(self.blocks) < ctx.world else 1  # sharded: rank r feeds only block r
        grads = [torch.zeros_like(p) for p in self.params]
        self.layout.unpack(update.reshape(len(self.blocks), -1) * scale, self.blocks, grads)
        ctx.backward(sum((p * g).sum() for p, g in zip(self.params, grads)))

    def resume_state(self) -> dict:
        return {"engine": self.engine}  # `auto` is measured once: a resumed run keeps what was picked

    def restore(self, state: dict) -> None:
        self.engine = state.get("engine", self.engine)

    def _agreed(self, engine: str, ctx: StepContext) -> str:
        """Rank 0's timing decides for every rank, so all ranks (and a resumed run) use one engine."""
        if ctx.world == 1:
            return engine
        choice = torch.tensor([list(engines.ENGINES).index(engine)], device=self.params[0].device)  # NCCL: GPU only
        torch.distributed.broadcast(choice, src=0)
        return list(engines.ENGINES)[int(choice)]

    @staticmethod
    def per_sample_signals(preds: dict, batch: dict, ctx: StepContext, n: int, start: int = 0) -> list[torch.Tensor]:
        """Per-sample losses (summed over supervised tasks) of this rank's first `n` samples of `batch`
        (predicted from row `start` of `preds` on), as world * n signals: rank r fills rows r*n..r*n+n-1
        and zeros elsewhere, so the sum-reduce of the signal buffer concatenates every rank's per-sample
        gradients (the span of iamu's `span: per_sample`)."""
        zero = sum(p.sum() * 0 for p in preds.values())
        sup = (batch["mask"] & batch["valid"][:, None]).float()
        per = sum(TASKS[t].per_sample_loss(preds[t][start:], batch[t]) * sup[:, j] for j, t in enumerate(ctx.tasks))
        mine = [per[i] if i < per.shape[0] else zero for i in range(n)]
        return [mine[i] if r == ctx.rank else zero for r in range(ctx.world) for i in range(n)]

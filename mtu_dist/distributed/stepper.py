"""One optimizer step — backward, clip on the global gradient norm, step — with or without DeepSpeed.

`prepare` hands the model and optimizer to Accelerate and returns the model to run forward and a
stepper with one interface for every path:

* plain (one process or DDP): `backward` fills `.grad` (DDP averages it over the ranks), `step` clips
  the global norm at `clip` with torch's `clip_grad_norm_` and steps the optimizer.
* DeepSpeed (Accelerate's plugin, ZeRO stage 0, 1 or 2; launch/accelerate/deepspeed_zero{1,2}.yaml):
  Accelerate's own `backward` steps the engine inside it, leaving no window for the divergence guard,
  so the engine is driven directly: `engine.backward` (which averages the gradients over the ranks,
  like DDP: callers keep scaling their per-rank share of the global loss by the world size), then
  `engine.step`. Clipping is torch's rule, `g * min(1, clip / (norm + 1e-6))`: at stages 1 and 2
  DeepSpeed applies it to the partitioned gradient with the global norm it computes over the
  partitions (`gradient_clipping`), and reports that norm; at stage 0 every rank holds the whole
  averaged gradient in `.grad` and torch clips it as in the plain path. Under ZeRO the norm is known
  only once the engine has stepped (a non-finite one makes DeepSpeed skip the step), so a caller's
  divergence guard restores the parameters it kept instead of skipping the step: the same result.

Methods that write the update themselves (`reduces_gradients`): under DeepSpeed they hand it to
`backward` as the surrogate loss `sum_p <p, u_p>`, whose gradient is exactly `u`; the engine reduces
and partitions it and its optimizer steps on its partition (see SignalMethod.write_update).

Checkpoints (`checkpoint_optimizer`): the torch optimizer whose `state_dict` is the whole state and
the same on every rank — always in the plain path and at stage 0; at stages 1 and 2 only while it
holds no state (SGD without momentum, unlearning's default), since ZeRO partitions any state over the
ranks. Otherwise checkpoints carry no optimizer state, and `--resume` refuses them.
"""

from __future__ import annotations

import torch

from mtu_dist.distributed.runtime import zero_stage

BUCKET = 500_000_000  # DeepSpeed's default reduce/all-gather bucket, in elements


class PlainStepper:
    reduces_gradients = False  # .grad is averaged by DDP only, for a wrapped model

    def __init__(self, params, opt, clip: float):
        self.params, self.opt, self.clip = list(params), opt, clip

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, step, clear; the global gradient norm before clipping."""
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(gnorm)

    def checkpoint_optimizer(self):
        return self.opt

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def parameters_loaded(self) -> None:
        """Parameters were loaded into the model (resume, divergence guard): nothing else holds them."""


class ZeroStepper:
    reduces_gradients = True  # the engine's backward averages over ranks, whatever the model

    def __init__(self, engine, opt, clip: float, stage: int):
        self.engine, self.opt, self.clip, self.stage = engine, opt, clip, stage
        self.params = [p for p in engine.module.parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.clip) if self.stage == 0 else None
        self.engine.step()  # clears the gradients
        return float(gnorm if gnorm is not None else self.engine.get_global_grad_norm())

    def checkpoint_optimizer(self):
        return self.opt if self.stage == 0 or not any(self.opt.state.values()) else None  # ZeRO leaves {} entries

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:  # DeepSpeed's ZeRO optimizers expose their inner groups
            group["lr"] = lr

    def parameters_loaded(self) -> None:
        """ZeRO-1/2 optimizers step a float32 master copy of their partition: refresh it from the module."""
        from deepspeed.utils import safe_set_full_fp32_param

        for p in self.params:
            safe_set_full_fp32_param(p, p.detach())


def prepare(acc, model, opt, *, wrap: bool, micro_batch: int, clip: float):
    """(model to run forward, stepper). `wrap`: the model is DDP-wrapped (plain path; methods that write
    their gradients themselves must not be). `micro_batch`: the local batch (DeepSpeed's bookkeeping)."""
    stage = zero_stage(acc)
    if stage is None:
        if wrap:
            model, prepared = acc.prepare(model, opt)
        else:  # Accelerate places only what it prepares: the unwrapped model goes to its device here
            model.to(acc.device)
            prepared = acc.prepare(opt)
        return model, PlainStepper(model.parameters(), prepared, clip)
    ds = acc.state.deepspeed_plugin.deepspeed_config
    ds.update(
        train_micro_batch_size_per_gpu=micro_batch,
        train_batch_size=micro_batch * acc.num_processes,
        gradient_accumulation_steps=1,
        zero_allow_untested_optimizer=True,
        gradient_clipping=0.0 if stage == 0 else clip,
    )  # stage 0: torch clips .grad (ZeroStepper.step)
    # ZeRO allocates its reduce buckets afresh at every backward (default 5e8 elements, 2 GB in float32:
    # a quarter of a second per step on CPU); a bucket larger than the model holds nothing more. Rounded up
    # to a multiple of 1024: ZeRO wants it aligned to its communication alignment (2 or 4 elements).
    size = min(BUCKET, -(-sum(p.numel() for p in model.parameters()) // 1024) * 1024)
    zero = ds.setdefault("zero_optimization", {})
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        given = zero.get(key)
        zero[key] = min(int(given), size) if isinstance(given, (int, float)) else size
    engine, _ = acc.prepare(model, opt)
    return engine, ZeroStepper(engine, opt, clip, stage)

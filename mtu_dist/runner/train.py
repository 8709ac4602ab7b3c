"""`mtu train` (the original model) and `mtu retrain` (from scratch on the retain signal only).

Both are the same loop; retrain differs only in its supervision mask (forget pairs masked out and
their labels blanked by the stream). Data parallel through Accelerate/DDP; losses normalised by global
counts (see objective.py) so N ranks optimise exactly the 1-rank objective.
"""

from __future__ import annotations

import math
import time

import torch

from mtu_dist.compliance.ledger import Ledger
from mtu_dist.data.stream import BatchLoader, full_mask, retain_mask
from mtu_dist.distributed.stepper import prepare
from mtu_dist.errors import UserError
from mtu_dist.model import build_model
from mtu_dist.runner.device import pins_memory, to_device
from mtu_dist.runner.faults import fault_point
from mtu_dist.runner.loop import diverged, load_resume_point, save_resume_point
from mtu_dist.runner.objective import global_counts, normalised_losses, reduce_for_logging
from mtu_dist.runner.session import Session


def fit(s: Session, resume: bool = False) -> tuple[torch.nn.Module, float, int]:
    cfg, m = s.cfg, s.manifest
    model = build_model(cfg.model, m.tasks, m.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    ledger = Ledger()  # the ledger is cumulative: a resumed run's rank 0 carries what was consumed before
    meta = load_resume_point(s, model, opt, ledger) if resume else None
    start_step = meta["step"] if meta else 0
    local_batch = s.local_batch(cfg.train.global_batch, "train.global_batch")
    model, stepper = prepare(s.acc, model, opt, wrap=True, micro_batch=local_batch, clip=cfg.train.grad_clip)
    mask_fn = retain_mask(m, s.request.entries) if s.request else full_mask(m)
    loader = BatchLoader(
        m,
        "train",
        rank=s.rank,
        world=s.world,
        local_batch=local_batch,
        workers=cfg.data.workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.seed,
        mask_fn=mask_fn,
        pin_memory=pins_memory(s.acc.device),
    )
    spe = loader.steps_per_epoch()
    total = spe * cfg.train.epochs
    every = cfg.train.checkpoint_every or spe
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total) / total)))
    for _ in range(start_step):  # the schedule is a pure function of the step
        sched.step()
    step, t0, valid = start_step, time.perf_counter(), 0
    bar = _progress(s, total, start_step, f"{s.command}")
    for epoch in range(start_step // spe, cfg.train.epochs):
        for i, batch in enumerate(loader.epoch(epoch)):
            if epoch * spe + i < start_step:
                continue  # replaying the deterministic stream up to the resume point
            ledger.record(batch, m.tasks)  # on the CPU, before the batch moves
            valid += int(batch["valid"].sum())  # padding is not throughput
            batch = to_device(batch, s.acc.device)
            counts = global_counts(batch, s.world)
            losses = normalised_losses(model(batch["image"]), batch, m.tasks, counts)
            loss = sum(losses.values())
            stepper.backward(loss * s.world)  # DDP/DeepSpeed average over ranks; the objective is a sum
            logged = reduce_for_logging({**{f"loss/{t}": v for t, v in losses.items()}}, s.world)
            logged["loss/total"] = sum(logged.values())
            gnorm = stepper.step()  # clipped at train.grad_clip; the norm before clipping
            if diverged(logged["loss/total"], gnorm):
                raise UserError(
                    f"{s.command}: non-finite loss at step {step}; last good checkpoint kept in "
                    f"{s.run_dir / 'checkpoints'}"
                )
            sched.step()
            step += 1
            s.tracker.log_metrics({**logged, "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm)}, step)
            bar.update(1)
            bar.set_postfix(loss=f"{logged['loss/total']:.3f}")
            if step % every == 0 or step == total:
                save_resume_point(
                    s,
                    s.acc.unwrap_model(model),
                    stepper.checkpoint_optimizer(),
                    step=step,
                    epoch=epoch,
                    ledger=ledger,
                    keep=cfg.train.keep_checkpoints,
                )
            fault_point(s.command, step)  # phase = train or retrain
    bar.close()
    elapsed = time.perf_counter() - t0
    samples = _sum_over_ranks(valid, s.world, s.acc.device)
    s.tracker.log_scores(
        {
            "time/train_s": elapsed,
            "throughput/samples_per_s": samples / max(elapsed, 1e-9),
            "time/step_s": elapsed / max(step - start_step, 1),
        }
    )
    s.ledger = ledger.gather(s.world)
    return s.acc.unwrap_model(model), elapsed, step


def _sum_over_ranks(n: int, world: int, device) -> int:
    if world == 1:
        return n
    t = torch.tensor([n], dtype=torch.float64, device=device)  # on the rank's device: NCCL takes no host tensor
    torch.distributed.all_reduce(t)
    return int(t.item())


def _progress(s: Session, total: int, initial: int, desc: str):
    from tqdm import tqdm

    from mtu_dist.utils.logs import quiet

    return tqdm(
        total=total, initial=initial, desc=desc, disable=not s.is_main or quiet(), leave=False, dynamic_ncols=True
    )

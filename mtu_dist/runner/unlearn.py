"""`mtu unlearn`: run a registered method from an original checkpoint on a forget request.

The loop is method-agnostic: stream forget and retain batches, ask the method for its objective,
backward, clip, guard, step. The divergence guard stops on a non-finite loss or gradient, or on a
loss / gradient norm above `unlearn.diverge_factor` times its first value, restores the last good
parameters (copied every step, on their device) and says so. The optional stop rule is checked after every step on
the forget pairs: a target task is *done* once its primary metric is at or below the original model's
val level plus `unlearn.stop_band`, or (`unlearn.stop_drop`) has fallen by that fraction of its value
before unlearning, or (`unlearn.stop_at`) is at a given level per task (e.g. the retrain's forget
level: the benchmark's equal-forgetting runs). A done task — its forget pairs are masked out of later forget
batches, so no method keeps ascending a task that is already forgotten — and the run ends when every
target task is done. Observable without a retrain, and the same for every method.

Resume points (`unlearn.checkpoint_every` steps; `mtu unlearn --resume`): parameters, optimizer and
RNG state, the method's own state after setup (`Method.resume_state`), the divergence guard's
reference, the stop rule's done set, the ledger and how many batches each stream has handed out. On
resume the method's setup and the stop thresholds are recomputed on the original model exactly as in
the first attempt (same batches, same result), then the resume point is loaded and each stream
restarts at its recorded position, so the run ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import math
import time
from itertools import islice

import numpy as np
import torch

from mtu_dist.runner.checkpoint import check_resumable, latest_checkpoint, load_checkpoint, prune, read_state, save_checkpoint
from mtu_dist.data.stream import BatchLoader, blank_sample, forget_batches, load_instances, retain_mask
from mtu_dist.runner.device import pins_memory, to_device
from mtu_dist.distributed.stepper import prepare
from mtu_dist.errors import UserError
from mtu_dist.evaluation.evaluate import instance_batches, run_split, primary
from mtu_dist.compliance.ledger import Ledger
from mtu_dist.runner.faults import fault_point
from mtu_dist.methods import build_method
from mtu_dist.methods.base import StepContext
from mtu_dist.model import build_model
from mtu_dist.runner.objective import reduce_for_logging
from mtu_dist.runner.session import Session, run_info
from mtu_dist.evaluation.trajectory import Recorder


def load_original(s: Session, ckpt: str):
    meta = read_state(ckpt)
    m = s.manifest
    if meta.get("dataset") != m.dataset:
        raise UserError(f"{ckpt}: checkpoint was trained on {meta.get('dataset')!r}, the data is {m.dataset!r}")
    model = build_model(s.cfg.model, m.tasks, m.num_classes)
    load_checkpoint(meta["_folder"], model)
    return model.to(s.acc.device), meta


def _endless(loader: BatchLoader, start: int = 0):
    """Local batches, epoch after epoch, from batch number `start` on (whole epochs skipped unread)."""
    epoch = 0
    while start >= loader.steps_per_epoch(epoch):
        start, epoch = start - loader.steps_per_epoch(epoch), epoch + 1
    while True:
        yield from islice(loader.epoch(epoch), start, None)
        start, epoch = 0, epoch + 1


def unlearn(s: Session, model, original_val: dict | None, resume: bool = False):
    cfg, m = s.cfg, s.manifest
    u = cfg.unlearn
    method = build_method(u.method, u.options)
    opt = (torch.optim.SGD(model.parameters(), lr=u.lr, momentum=u.momentum) if u.optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=u.lr))
    # a method that manages its gradients runs its own collectives: DDP's all-reduce must not run a second time
    model, stepper = prepare(s.acc, model, opt, wrap=not method.manages_gradients,
                             micro_batch=max(1, u.retain_batch // s.world), clip=cfg.train.grad_clip)
    blank = blank_sample(m)
    # a lineage step forgets its new pairs only (repeats of earlier requests are skipped), and its retain
    # stream excludes everything the lineage has forgotten, not just this request
    forgetting, forgotten = s.forget_entries, s.forgotten_entries
    target_mask = lambda k: np.array([t in forgetting[k] for t in m.tasks])  # noqa: E731
    forget_set = load_instances(m, "train", list(forgetting), target_mask)
    # role -> (batches already handed out -> the stream from there on); a resumed run restarts each one
    restart = {"forget": lambda drawn: islice(forget_batches(forget_set, global_batch=u.forget_batch, rank=s.rank,
                                                              world=s.world, seed=cfg.seed, blank=blank), drawn, None)}
    forget_it, retain_it = restart["forget"](0), None
    if method.uses_retain:
        loader = BatchLoader(m, "train", rank=s.rank, world=s.world,
                             local_batch=s.local_batch(u.retain_batch, "unlearn.retain_batch"),
                             workers=cfg.data.workers, seed=cfg.seed, mask_fn=retain_mask(m, forgotten, forgetting),
                             pin_memory=pins_memory(s.acc.device))
        restart["retain"] = lambda drawn: _endless(loader, drawn)
        retain_it = restart["retain"](0)
    raw = s.acc.unwrap_model(model)
    targets = target_tasks(forgetting, m.tasks)
    forward = raw if method.manages_gradients else model  # DDP-wrapped or DeepSpeed's engine for a loss
    make_ctx = lambda step: StepContext(model=forward, tasks=m.tasks, world=s.world, alpha=u.alpha, step=step,  # noqa: E731
                                        rank=s.rank, targets=targets, config=u, seed=cfg.seed, num_classes=m.num_classes,
                                        record=lambda b, role: ledger.record(b, m.tasks, role),
                                        backward=stepper.backward, reducing_backward=stepper.reduces_gradients)
    ledger = Ledger()
    # every batch a method sees, in setup or in a step, is recorded (the leak audit reads the ledger)
    forget_it = ledger.recording(forget_it, m.tasks, role="forget") if method.uses_forget else None
    retain_it = ledger.recording(retain_it, m.tasks, role="retain") if retain_it else None
    # the method draws the recorded (CPU) batches moved to the model's device
    feed = lambda it: None if it is None else (to_device(b, s.acc.device) for b in it)  # noqa: E731
    forget_in, retain_in = feed(forget_it), feed(retain_it)
    t0 = t_setup = time.perf_counter()  # the unlearning cost includes the method's setup
    setup_logs = method.setup(make_ctx(0), retain_in, forget_in)
    s.tracker.log_metrics({**{f"setup/{k}": v for k, v in setup_logs.items()},
                           "time/setup_s": time.perf_counter() - t_setup}, 0)
    thresholds = _stop_thresholds(s, raw, forget_set, original_val)  # on the original model, resumed or not
    traj = Recorder(s, forget_set, targets) if u.trajectory_every else None
    if traj is not None:
        traj.record(raw, 0)  # the model before any step: the reference of every later point
    streams = {"forget": forget_it, "retain": retain_it}
    start, first, done = 0, None, set()
    if resume and (last := latest_checkpoint(s.run_dir / "checkpoints")) is not None:
        start, first, done = _resume(s, last, raw, stepper, method, ledger, streams, restart)
    good = _keep(raw)
    stopped = "budget"
    from tqdm import tqdm
    bar = tqdm(total=u.steps, initial=start, desc=f"unlearn {u.method}", disable=not s.is_main, leave=False,
               dynamic_ncols=True)
    step = start
    done_mask = _task_mask(done, m.tasks)
    for step in range(start + 1, u.steps + 1):
        if forget_it is not None:
            forget_it.mask_tasks(done_mask)  # a task already forgotten is not ascended further
        fb = next(forget_in) if forget_in is not None else None
        rb = next(retain_in) if retain_in is not None else None
        loss, parts = method.step(make_ctx(step), fb, rb)
        logged = reduce_for_logging({"loss": loss, **parts}, s.world)
        # clip at train.grad_clip and step; the norm before clipping is known only then under ZeRO, so a
        # diverged step is undone rather than skipped (the same parameters either way)
        gnorm = stepper.step()
        first = first or (abs(logged["loss"]) + 1e-8, gnorm + 1e-8)
        why = _diverged(logged["loss"], gnorm, first, u.diverge_factor)
        if why:
            raw.load_state_dict(good)
            stepper.parameters_loaded()
            stopped = f"diverged at step {step} ({why}); restored the parameters of step {step - 1}"
            if s.is_main:
                print(f"mtu: unlearning stopped: {stopped}")
            break
        if u.check_sync:
            _check_in_sync(raw, s.world, step)
        good = _keep(raw, good)
        s.tracker.log_metrics({f"unlearn/{k}": v for k, v in logged.items()} | {"unlearn/grad_norm": float(gnorm)}, step)
        bar.update(1)
        if thresholds:
            done |= _tasks_done(s, raw, forget_set, thresholds, done)
            done_mask = _task_mask(done, m.tasks)
        if u.checkpoint_every and step % u.checkpoint_every == 0:
            _save_resume_point(s, raw, stepper.checkpoint_optimizer(), step, method, ledger, streams, first, done)
        fault_point("unlearn", step)
        all_done = thresholds and done >= set(targets)
        if traj is not None and (step % u.trajectory_every == 0 or all_done or step == u.steps):
            traj.record(raw, step)
        if all_done:
            stopped = f"stop rule at step {step}: every target task's forget-pair metric reached its threshold"
            break
    bar.close()
    if traj is not None and traj.points[-1]["step"] != step:  # a diverged run: its restored parameters
        traj.record(raw, step)
    elapsed = time.perf_counter() - t0 - (traj.seconds if traj is not None else 0.0)  # measuring is not unlearning
    s.trajectory = traj.result() if traj is not None else None
    s.tracker.log_metrics({"time/unlearn_s": elapsed, "unlearn/steps_run": step}, step)
    s.tracker.set_tags({"mtu.stop_reason": stopped})
    s.ledger = ledger.gather(s.world)
    return raw, elapsed, stopped


def _keep(raw, good: dict | None = None) -> dict:
    """The divergence guard's copy of the parameters and buffers: cloned once, then refreshed in place
    after every step (a deep copy per step cost as much as a few percent of an unlearning step)."""
    state = raw.state_dict()
    if good is None:
        return {k: v.detach().clone() for k, v in state.items()}
    with torch.no_grad():
        for k, v in state.items():
            good[k].copy_(v)
    return good


def target_tasks(entries: dict, tasks) -> tuple[str, ...]:
    """Every task some entry targets, in the dataset's order."""
    return tuple(t for t in tasks if any(t in ts for ts in entries.values()))


def _task_mask(done: set, tasks) -> torch.Tensor:
    """Bool over tasks; it masks the recorded batches on the CPU, before they move."""
    return torch.tensor([t in done for t in tasks], device="cpu")


def _save_resume_point(s: Session, raw, opt, step: int, method, ledger: Ledger, streams: dict, first, done) -> None:
    consumed = ledger.gather(s.world)  # collective: every rank calls it
    if s.is_main:
        state = {"drawn": {role: it.drawn for role, it in streams.items() if it is not None},
                 "first": list(first) if first else None, "done": sorted(done), "method": method.resume_state()}
        folder = s.run_dir / "checkpoints" / f"step-{step:07d}"
        save_checkpoint(folder, raw, step=step, epoch=0, config=s.cfg.model_dump(mode="json"), optimizer=opt,
                        info={**run_info(s), "ledger": consumed, "unlearn": state})
        prune(folder.parent, s.cfg.unlearn.keep_checkpoints)
    s.barrier()


def _resume(s: Session, folder, raw, stepper, method, ledger: Ledger, streams: dict, restart: dict):
    """Load a resume point into a run whose setup has just been redone on the original model."""
    check_resumable(read_state(folder), s.cfg.model_dump(mode="json"), run_info(s))  # before loading anything
    meta = load_checkpoint(folder, raw, stepper.checkpoint_optimizer())
    stepper.parameters_loaded()
    state = meta["unlearn"]
    method.restore(state["method"])
    for role, it in streams.items():
        if it is not None:  # batches before the resume point are not recorded again: the ledger holds them
            it.resume_at(restart[role](state["drawn"][role]), state["drawn"][role])
    ledger.restore(meta["ledger"], s.is_main)
    if s.is_main:
        print(f"resuming from {folder} (step {meta['step']})")
    return meta["step"], tuple(state["first"]) if state["first"] else None, set(state["done"])


def _check_in_sync(model, world: int, step: int) -> None:
    """Every rank must hold bit-identical parameters: compare a checksum across ranks."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    weights = torch.arange(1, flat.numel() + 1, dtype=flat.dtype, device=flat.device)
    mine = torch.stack([flat.sum(), (flat * weights).sum()])
    if world > 1:
        every = [torch.zeros_like(mine) for _ in range(world)]
        torch.distributed.all_gather(every, mine)
        if any(not torch.equal(every[0], e) for e in every[1:]):
            raise RuntimeError(f"ranks hold different parameters after step {step}: {[e.tolist() for e in every]}")


def _diverged(loss: float, gnorm: float, first: tuple[float, float], factor: float) -> str | None:
    if not math.isfinite(loss) or not math.isfinite(gnorm):
        return "non-finite loss or gradient"
    if abs(loss) > factor * first[0]:
        return f"|loss| {abs(loss):.3g} > {factor} x first {first[0]:.3g}"
    if gnorm > factor * first[1]:
        return f"grad norm {gnorm:.3g} > {factor} x first {first[1]:.3g}"
    return None


def _forget_metrics(s: Session, model, forget_set, only=None) -> dict:
    m = s.manifest
    metrics, _ = run_split(model, instance_batches(forget_set, s.rank, s.world, 16, blank_sample(m)),
                            m.tasks, m.num_classes, s.world, only=only, losses=False)
    model.train()
    return metrics


def _stop_thresholds(s: Session, model, forget_set, original_val) -> dict[str, float]:
    """Per target task: the primary-metric level on the forget pairs at which the task is done."""
    u = s.cfg.unlearn
    if u.stop_at is not None:
        targets = target_tasks(s.forget_entries, s.manifest.tasks)
        missing = [t for t in targets if t not in u.stop_at]
        if missing:
            raise UserError(f"unlearn.stop_at: no level for target task(s) {missing} (got {sorted(u.stop_at)})")
        return {t: float(u.stop_at[t]) for t in targets}
    if u.stop_drop is not None:
        before = _forget_metrics(s, model, forget_set)
        return {t: primary(before, t) * (1 - u.stop_drop) for t in before}
    if u.stop_band is not None:
        if not original_val:
            raise UserError("unlearn.stop_band needs the original model's val metrics (metrics.json beside --from)")
        return {t: primary(original_val, t) + u.stop_band for t in target_tasks(s.forget_entries, s.manifest.tasks)}
    return {}


def _tasks_done(s: Session, model, forget_set, thresholds: dict[str, float], done: set) -> set[str]:
    """The target tasks done after this step; a done task stays done, so only the others are measured
    (the same decisions as measuring every task, at a fraction of the cost once some are done)."""
    metrics = _forget_metrics(s, model, forget_set, only=set(thresholds) - done)
    return {t for t in metrics if t in thresholds and primary(metrics, t) <= thresholds[t]}

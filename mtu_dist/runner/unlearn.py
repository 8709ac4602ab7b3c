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
restarts at its recorded position, so the run ends bit-identical to an uninterrupted one. Resume
points, the divergence guard and the stop rule are in loop.py (the first two shared with train.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from itertools import islice

import torch

from mtu_dist.compliance.ledger import Ledger
from mtu_dist.data.stream import (
    BatchLoader,
    blank_sample,
    forget_batches,
    forget_mask,
    kept_mask,
    kept_view,
    load_instances,
    retain_mask,
    with_kept,
)
from mtu_dist.distributed.stepper import PlainStepper, ZeroStepper, prepare
from mtu_dist.errors import UserError
from mtu_dist.evaluation.trajectory import Recorder
from mtu_dist.methods import build_method
from mtu_dist.methods.base import Method, StepContext
from mtu_dist.model import build_model
from mtu_dist.runner.checkpoint import load_checkpoint, read_state
from mtu_dist.runner.device import pins_memory, to_device
from mtu_dist.runner.faults import fault_point
from mtu_dist.runner.loop import DivergenceGuard, StopRule, load_resume_point, save_resume_point
from mtu_dist.runner.objective import reduce_for_logging
from mtu_dist.runner.session import Session

Stepper = PlainStepper | ZeroStepper  # what distributed.stepper.prepare returns


def load_original(s: Session, ckpt: str) -> tuple[torch.nn.Module, dict]:
    meta = read_state(ckpt)
    m = s.manifest
    if meta.get("dataset") != m.dataset:
        raise UserError(f"{ckpt}: checkpoint was trained on {meta.get('dataset')!r}, the data is {m.dataset!r}")
    model = build_model(s.cfg.model, m.tasks, m.num_classes)
    load_checkpoint(meta["_folder"], model)
    return model.to(s.acc.device), meta


def _endless(loader: BatchLoader, start: int = 0) -> Iterator[dict]:
    """Local batches, epoch after epoch, from batch number `start` on (whole epochs skipped unread)."""
    epoch = 0
    while start >= loader.steps_per_epoch(epoch):
        start, epoch = start - loader.steps_per_epoch(epoch), epoch + 1
    while True:
        yield from islice(loader.epoch(epoch), start, None)
        start, epoch = 0, epoch + 1


def unlearn(
    s: Session, model: torch.nn.Module, original_val: dict | None, resume: bool = False
) -> tuple[torch.nn.Module, float, str]:
    u = s.cfg.unlearn
    method = build_method(u.method, u.options)
    model, stepper = _prepare(s, model, method)
    raw = s.acc.unwrap_model(model)
    ledger = Ledger()
    streams = Streams(s, method, ledger)
    targets = target_tasks(s.forget_entries, s.manifest.tasks)
    forward = raw if method.manages_gradients else model  # DDP-wrapped or DeepSpeed's engine for a loss
    ctx = _context(s, forward, stepper, ledger, targets)

    t0 = time.perf_counter()  # the unlearning cost includes the method's setup
    _setup(s, method, ctx, streams)
    stop = StopRule(s, raw, streams.forget_set, original_val, targets)  # on the original model, resumed or not
    traj = Recorder(s, streams.forget_set, targets) if u.trajectory_every else None
    if traj is not None:
        traj.record(raw, 0)  # the model before any step: the reference of every later point
    start, first = _resume(s, raw, stepper, method, ledger, streams, stop) if resume else (0, None)
    guard = DivergenceGuard(raw, u.diverge_factor, first)

    stopped = "budget"
    from tqdm import tqdm

    from mtu_dist.utils.logs import quiet

    bar = tqdm(
        total=u.steps,
        initial=start,
        desc=f"unlearn {u.method}",
        disable=not s.is_main or quiet(),
        leave=False,
        dynamic_ncols=True,
    )
    step = start
    for step in range(start + 1, u.steps + 1):
        streams.mask_tasks(stop.mask())  # a task already forgotten is not ascended further
        lr = u.lr * u.lr_growth ** (step - 1)  # a function of the step: a resume continues the ramp
        if u.lr_growth != 1.0:
            stepper.set_lr(lr)
        logged, gnorm = _step(s, method, replace(ctx, step=step), streams, stepper)
        why = guard.check(logged["loss"], gnorm)
        if why:
            stopped = _undo_diverged(s, guard, stepper, step, why)
            break
        if u.check_sync:
            _check_in_sync(raw, s.world, step)
        guard.passed()
        s.tracker.log_metrics(
            {f"unlearn/{k}": v for k, v in logged.items()} | {"unlearn/grad_norm": float(gnorm), "unlearn/lr": lr}, step
        )
        bar.update(1)
        all_done = stop.update(raw)
        if u.checkpoint_every and step % u.checkpoint_every == 0:
            _save(s, raw, stepper, step, method, ledger, streams, guard, stop)
        fault_point("unlearn", step)
        if traj is not None and (step % u.trajectory_every == 0 or all_done or step == u.steps):
            traj.record(raw, step)
        if all_done:
            stopped = f"stop rule at step {step}: every target task's forget-pair metric reached its threshold"
            break
    bar.close()

    elapsed = _wrap_up(s, raw, traj, ledger, t0, step, stopped)
    return raw, elapsed, stopped


def _prepare(s: Session, model: torch.nn.Module, method: Method) -> tuple[torch.nn.Module, Stepper]:
    """The optimizer, and the model to run forward (wrapped for the gradient reduction, or not)."""
    u = s.cfg.unlearn
    opt = (
        torch.optim.SGD(model.parameters(), lr=u.lr, momentum=method.momentum(u.momentum))
        if u.optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=u.lr)
    )
    # a method that manages its gradients runs its own collectives: DDP's all-reduce must not run a second time
    return prepare(
        s.acc,
        model,
        opt,
        wrap=not method.manages_gradients,
        micro_batch=max(1, u.retain_batch // s.world),
        clip=s.cfg.train.grad_clip,
    )


def _setup(s: Session, method: Method, ctx: StepContext, streams: Streams) -> None:
    t0 = time.perf_counter()
    logs = method.setup(ctx, streams.retain_in, streams.forget_in)
    s.tracker.log_metrics({**{f"setup/{k}": v for k, v in logs.items()}, "time/setup_s": time.perf_counter() - t0}, 0)


def _undo_diverged(s: Session, guard: DivergenceGuard, stepper: Stepper, step: int, why: str) -> str:
    """Back to the last good parameters; the stop reason."""
    guard.undo()
    stepper.parameters_loaded()
    stopped = f"diverged at step {step} ({why}); restored the parameters of step {step - 1}"
    if s.is_main:
        print(f"mtu: unlearning stopped: {stopped}")
    return stopped


def _wrap_up(
    s: Session, raw: torch.nn.Module, traj: Recorder | None, ledger: Ledger, t0: float, step: int, stopped: str
) -> float:
    """The run's last trajectory point, its cost (measuring is not unlearning), the ledger; the cost."""
    if traj is not None and traj.points[-1]["step"] != step:  # a diverged run: its restored parameters
        traj.record(raw, step)
    elapsed = time.perf_counter() - t0 - (traj.seconds if traj is not None else 0.0)
    s.trajectory = traj.result() if traj is not None else None
    s.tracker.log_scores({"time/unlearn_s": elapsed, "unlearn/steps_run": step})
    s.tracker.set_tags({"mtu.stop_reason": stopped})
    s.ledger = ledger.gather(s.world)
    return elapsed


class Streams:
    """The forget and retain batches of an unlearning run. Every batch a method sees, in setup or in a
    step, is recorded in the ledger as it is drawn (the leak audit reads the ledger), on the CPU; the
    method draws them moved to the model's device (`forget_in`, `retain_in`). A stream the method
    does not use is neither drawn nor recorded (None)."""

    def __init__(self, s: Session, method: Method, ledger: Ledger):
        self.s, m = s, s.manifest
        # a lineage step forgets its new pairs only (repeats of earlier requests are skipped), and its retain
        # stream excludes everything the lineage has forgotten, not just this request
        forgetting, forgotten = s.forget_entries, s.forgotten_entries
        self.forget_set = load_instances(m, "train", list(forgetting), forget_mask(m, forgetting))
        # a method that uses the kept supervision of the forget instances (partial requests) gets it in the
        # forget batches (stream.with_kept), recorded as what it is: retain pairs
        carries_kept = method.uses_forget and method.uses_kept
        self.forget_samples, self.blank = self.forget_set, blank_sample(m)
        if carries_kept:
            kept = load_instances(m, "train", list(forgetting), kept_mask(m, forgetting, forgotten))
            self.forget_samples = [with_kept(f, k, m.tasks) for f, k in zip(self.forget_set, kept)]
            self.blank = with_kept(self.blank, self.blank, m.tasks)
        self.loader = (
            BatchLoader(
                m,
                "train",
                rank=s.rank,
                world=s.world,
                local_batch=s.local_batch(s.cfg.unlearn.retain_batch, "unlearn.retain_batch"),
                workers=s.cfg.data.workers,
                seed=s.cfg.seed,
                mask_fn=retain_mask(m, forgotten, forgetting),
                pin_memory=pins_memory(s.acc.device),
            )
            if method.uses_retain
            else None
        )
        self.recorded = {
            "forget": ledger.recording(self.batches("forget"), m.tasks, role="forget") if method.uses_forget else None,
            "retain": ledger.recording(self.batches("retain"), m.tasks, role="retain") if self.loader else None,
        }
        forget = self.recorded["forget"]
        if carries_kept:
            forget = _recording_kept(forget, ledger, m.tasks)
        self.forget_in = _on_device(forget, s.acc.device)
        self.retain_in = _on_device(self.recorded["retain"], s.acc.device)

    def batches(self, role: str, drawn: int = 0) -> Iterator[dict]:
        """The local batches of `role` after the first `drawn` (a resumed run restarts each stream there)."""
        s, u = self.s, self.s.cfg.unlearn
        if role == "retain":
            return _endless(self.loader, drawn)
        return islice(
            forget_batches(
                self.forget_samples,
                global_batch=u.forget_batch,
                rank=s.rank,
                world=s.world,
                seed=s.cfg.seed,
                blank=self.blank,
            ),
            drawn,
            None,
        )

    def next(self) -> tuple[dict | None, dict | None]:
        """This step's (forget, retain) batches on the model's device."""
        return (
            next(self.forget_in) if self.forget_in is not None else None,
            next(self.retain_in) if self.retain_in is not None else None,
        )

    def mask_tasks(self, mask: torch.Tensor) -> None:
        if self.recorded["forget"] is not None:
            self.recorded["forget"].mask_tasks(mask)

    def drawn(self) -> dict[str, int]:
        return {role: it.drawn for role, it in self.recorded.items() if it is not None}

    def resume_at(self, drawn: dict[str, int]) -> None:
        for role, it in self.recorded.items():
            if it is not None:  # batches before the resume point are not recorded again: the ledger holds them
                it.resume_at(self.batches(role, drawn[role]), drawn[role])


def _recording_kept(batches: Iterator[dict], ledger: Ledger, tasks: tuple[str, ...]) -> Iterator[dict]:
    """Forget batches that carry their instances' kept supervision: that part recorded under `retain`."""
    for batch in batches:
        ledger.record(kept_view(batch, tasks), tasks, role="retain")
        yield batch


def _on_device(batches: Iterator[dict] | None, device: torch.device) -> Iterator[dict] | None:
    return None if batches is None else (to_device(b, device) for b in batches)


def _context(
    s: Session, forward: torch.nn.Module, stepper: Stepper, ledger: Ledger, targets: tuple[str, ...]
) -> StepContext:
    """What the method may use (step 0: setup; each step gets a copy with its number)."""
    m, u = s.manifest, s.cfg.unlearn

    def record(batch: dict, role: str) -> None:
        ledger.record(batch, m.tasks, role)

    return StepContext(
        model=forward,
        tasks=m.tasks,
        world=s.world,
        alpha=u.alpha,
        step=0,
        rank=s.rank,
        targets=targets,
        kept=kept_tasks(s.forget_entries, m.tasks),
        config=u,
        seed=s.cfg.seed,
        num_classes=m.num_classes,
        record=record,
        backward=stepper.backward,
        reducing_backward=stepper.reduces_gradients,
    )


def _step(s: Session, method: Method, ctx: StepContext, streams: Streams, stepper: Stepper) -> tuple[dict, float]:
    """One unlearning step: the method's gradient, then clip at train.grad_clip and step. Returns the
    logged values summed over ranks and the gradient norm before clipping."""
    forget, retain = streams.next()
    loss, parts = method.step(ctx, forget, retain)
    logged = reduce_for_logging({"loss": loss, **parts}, s.world)
    return logged, stepper.step()


def target_tasks(entries: dict, tasks) -> tuple[str, ...]:
    """Every task some entry targets, in the dataset's order."""
    return tuple(t for t in tasks if any(t in ts for ts in entries.values()))


def kept_tasks(entries: dict, tasks) -> tuple[str, ...]:
    """Every task some forget instance keeps (partial requests; none in a full one), in the dataset's order."""
    return tuple(t for t in tasks if any(t not in ts for ts in entries.values()))


def _save(
    s: Session,
    raw: torch.nn.Module,
    stepper: Stepper,
    step: int,
    method: Method,
    ledger: Ledger,
    streams: Streams,
    guard: DivergenceGuard,
    stop: StopRule,
) -> None:
    state = {
        "drawn": streams.drawn(),
        "first": list(guard.first) if guard.first else None,
        "done": sorted(stop.done),
        "method": method.resume_state(),
    }
    save_resume_point(
        s,
        raw,
        stepper.checkpoint_optimizer(),
        step=step,
        epoch=0,
        ledger=ledger,
        keep=s.cfg.unlearn.keep_checkpoints,
        unlearn=state,
    )


def _resume(
    s: Session, raw: torch.nn.Module, stepper: Stepper, method: Method, ledger: Ledger, streams: Streams, stop: StopRule
) -> tuple[int, tuple[float, float] | None]:
    """Load the newest resume point into a run whose setup has just been redone on the original model:
    (the step it was written at, the divergence guard's reference); (0, None) when there is none."""
    meta = load_resume_point(s, raw, stepper.checkpoint_optimizer(), ledger)
    if meta is None:
        return 0, None
    stepper.parameters_loaded()
    state = meta["unlearn"]
    method.restore(state["method"])
    streams.resume_at(state["drawn"])
    stop.done = set(state["done"])
    return meta["step"], tuple(state["first"]) if state["first"] else None


def _check_in_sync(model: torch.nn.Module, world: int, step: int) -> None:
    """Every rank must hold bit-identical parameters: compare a checksum across ranks."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    weights = torch.arange(1, flat.numel() + 1, dtype=flat.dtype, device=flat.device)
    mine = torch.stack([flat.sum(), (flat * weights).sum()])
    if world > 1:
        every = [torch.zeros_like(mine) for _ in range(world)]
        torch.distributed.all_gather(every, mine)
        if any(not torch.equal(every[0], e) for e in every[1:]):
            raise RuntimeError(f"ranks hold different parameters after step {step}: {[e.tolist() for e in every]}")

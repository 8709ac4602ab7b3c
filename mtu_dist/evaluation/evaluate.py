"""`mtu eval`: metrics per split and task (docs/design.md §6), reduced across ranks.

Splits: `forget` (the request's target pairs), `forget_kept` (partial setting, or a mixed request with
a partial entry: the kept tasks of the forgotten instances, which must not move), `retain` (a fixed
sample: the first `eval.retain_sample` train instances not in the request, nor in `retain_exclude`,
in manifest order) and `val`. Alongside the metrics, the
per-instance, per-task losses are kept (the features of the membership-inference attack).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from mtu_dist.data.stream import BatchLoader, blank_sample, collate, forget_mask, full_mask, kept_mask, load_instances
from mtu_dist.runner.device import model_device, pins_memory, to_device
from mtu_dist.tasks import TASKS, reduce_meters
from mtu_dist.utils.logs import progress_bar


def instance_batches(samples: list[dict], rank: int, world: int, local_batch: int, blank: dict):
    """Rank r evaluates samples r::world, padded so every rank runs the same number of batches."""
    mine = samples[rank::world]
    n = batch_count(len(samples), world, local_batch)
    mine = mine + [blank] * (n * local_batch - len(mine))
    for i in range(n):
        yield collate(mine[i * local_batch : (i + 1) * local_batch])


def batch_count(n_samples: int, world: int, local_batch: int) -> int:
    """Batches every rank runs over `n_samples` instances (instance_batches)."""
    return math.ceil(math.ceil(n_samples / world) / local_batch) if n_samples else 0


@torch.no_grad()
def run_split(model, batches, tasks, num_classes, world, *, only=None, losses: bool = True) -> tuple[dict, list]:
    """Metrics per task (reduced over ranks) and the per-instance losses. `only`: the tasks to measure
    (the others are left out); `losses=False`: metrics only (the stop rule's check after every step)."""
    device = model_device(model)
    keep_losses = losses
    meters = {t: TASKS[t].new_meter(num_classes, device) for t in tasks}  # states reduced on the device
    losses = []  # (key, task, loss)
    for batch in batches:
        batch = to_device(batch, device)
        preds = model(batch["image"])
        sup = batch["mask"] & batch["valid"][:, None]
        flags = sup.cpu()  # which pairs count: read on the host once per batch, not once per sample
        for j, t in enumerate(tasks):
            if not flags[:, j].any() or (only is not None and t not in only):
                continue
            meters[t].update(preds[t], batch[t], sample_mask=sup[:, j])
            if not keep_losses:
                continue
            per_sample = TASKS[t].per_sample_loss(preds[t], batch[t]).cpu().tolist()
            losses += [(k, t, v) for k, v, ok in zip(batch["key"], per_sample, flags[:, j].tolist()) if ok]
    reduce_meters(meters, dist.all_reduce if world > 1 else None)
    computed = {t: meters[t].compute() for t in tasks}
    metrics = {t: v for t, v in computed.items() if not math.isnan(v[TASKS[t].primary])}  # drop unseen tasks
    if world > 1 and keep_losses:
        gathered = [None] * world
        dist.all_gather_object(gathered, losses)
        losses = [x for part in gathered for x in part]
    return metrics, losses


def evaluate(model, s, request=None) -> dict:
    """{"splits": {split: {task: {metric: value}}}, "losses": {split: [(key, task, loss)]}}."""
    m, cfg = s.manifest, s.cfg
    model.eval()
    tasks, blank = m.tasks, blank_sample(m)
    local = max(1, cfg.eval.batch // s.world)
    splits, losses = {}, {}
    forgotten = request.entries if request else {}
    # a lineage step also keeps what earlier requests forgot out of the retain sample
    out_of_retain = set(forgotten) | set(request.retain_exclude if request else ())
    retain_ids = [k for k in m.split("train").keys if k not in out_of_retain][: cfg.eval.retain_sample]
    sets = {"retain": (retain_ids, full_mask(m))}
    if request:
        sets["forget"] = (list(forgotten), forget_mask(m, forgotten))
        if request.setting == "partial" or (
            request.setting == "mixed" and any(len(ts) < len(tasks) for ts in forgotten.values())
        ):
            sets["forget_kept"] = (list(forgotten), kept_mask(m, forgotten))
    for name, (ids, mask_fn) in sets.items():
        samples = load_instances(m, "train", ids, mask_fn)
        batches = progress_bar(
            instance_batches(samples, s.rank, s.world, local, blank),
            desc=f"eval {name}",
            total=batch_count(len(samples), s.world, local),
            main=s.rank == 0,
        )
        splits[name], losses[name] = run_split(model, batches, tasks, m.num_classes, s.world)
    val = BatchLoader(
        m,
        "val",
        rank=s.rank,
        world=s.world,
        local_batch=local,
        shuffle=False,
        workers=0,
        pin_memory=pins_memory(model_device(model)),
    )
    batches = progress_bar(val.epoch(0), desc="eval val", total=val.steps_per_epoch(0), main=s.rank == 0)
    splits["val"], losses["val"] = run_split(model, batches, tasks, m.num_classes, s.world)
    model.train()
    return {"splits": splits, "losses": losses}


def primary(metrics: dict, task: str) -> float:
    return metrics[task][TASKS[task].primary]


def flat_metrics(splits: dict) -> dict[str, float]:
    """`eval/<split>/<task>/<metric>` as MLflow metric names."""
    return {
        f"eval/{sp}/{t}/{k}": v
        for sp, tasks in splits.items()
        for t, mets in tasks.items()
        for k, v in mets.items()
        if isinstance(v, (int, float)) and math.isfinite(v)
    }

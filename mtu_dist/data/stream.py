"""Streaming multi-task batches from WebDataset shards, with per-sample, per-task supervision masks.

Reader slots. With R ranks and W loader workers per rank there are R*W reader slots; slot
`rank + R*worker` reads shards `slot::R*W` of the (per-epoch shuffled) shard list — exactly what
WebDataset's split_by_node followed by split_by_worker gives. Each slot emits fixed-size chunks of
`local_batch / W` samples and the DataLoader interleaves workers round-robin, so one local batch is
one chunk from every worker. Consequence: 1 rank x 2 workers and 2 ranks x 1 worker read the same
global batch at every step, which is what the 1-vs-N-rank equivalence tests rely on.

Uneven shards (policy). Every slot's sample count is known from the manifest, so every slot emits
the same number of chunks per epoch: `ceil(max_slot_samples / chunk)`. Short slots are padded with
*invalid* samples (blank inputs, every task mask False, `valid` False) that contribute nothing to
any loss or metric. Every (sample, task) pair of the split is therefore seen exactly once per epoch
and all ranks run the same number of steps.

More slots than shards, or shards so uneven that a slot would read mostly padding (more than half of
its chunks), would leave ranks computing on blanks: an epoch of 1 shard over 2 ranks is twice as
long as it needs to be. Such an epoch is split *by sample* instead: every slot reads every shard (in
the same shuffled order, sha256-checked as always) and keeps the samples at positions `slot::slots`,
decoding only those. Still exactly once per epoch, every slot within one sample of the others; the
price is that each slot reads every shard's bytes (slots x the reads), so the loader says so once
and names the shard size that would avoid it. Refusing would make users re-shard for a correct run;
silently shrinking the loader workers would change the batches a topology reads.

Masks. `mask[b, j]` says whether sample b's task `tasks[j]` may supervise this step. For the retain
stream it is False on forget pairs, and the label itself is blanked too (ignore/invalid values), so
forget supervision never reaches a retain step even if a loss forgot to apply the mask.

Integrity. A worker reads each shard into memory, checks its sha256 against the manifest and only
then expands it; every sample is decoded and range-checked (NaN/inf refused) on load.
"""

from __future__ import annotations

import io
import math
import random
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtu_dist.data.keycheck import KeyCheck
from mtu_dist.data.manifest import Manifest
from mtu_dist.data.sample import SEG_IGNORE, decode_sample
from mtu_dist.errors import UserError
from mtu_dist.runner.faults import deliberate_leak
from mtu_dist.tasks import TASKS
from mtu_dist.utils.fileio import sha256_bytes
from mtu_dist.utils.lifecycle import quiet_loader_worker, signals_deferred

MaskFn = Callable[[str], np.ndarray]  # instance key -> bool[T] supervision mask


def full_mask(manifest: Manifest) -> MaskFn:
    ones = np.ones(len(manifest.tasks), dtype=bool)
    return lambda key: ones


def retain_mask(
    manifest: Manifest, forget_entries: dict[str, tuple[str, ...]], newest: dict[str, tuple[str, ...]] | None = None
) -> MaskFn:
    """Supervision mask of the retain signal: everything except the forget pairs (a lineage step: every
    pair forgotten so far; `newest`, its own request's, only matters to the test hook)."""
    forget_entries = deliberate_leak(forget_entries, newest)  # a no-op unless the MTU_TEST_LEAK test hook is set
    ones = np.ones(len(manifest.tasks), dtype=bool)
    masked = {k: np.array([t not in ts for t in manifest.tasks]) for k, ts in forget_entries.items()}
    return lambda key: masked.get(key, ones)


def forget_mask(manifest: Manifest, entries: dict[str, tuple[str, ...]]) -> MaskFn:
    """Supervision mask of the forget pairs themselves: an instance's forgotten tasks only."""
    return lambda key: np.array([t in entries[key] for t in manifest.tasks])


def kept_mask(
    manifest: Manifest, entries: dict[str, tuple[str, ...]], forgotten: dict[str, tuple[str, ...]] | None = None
) -> MaskFn:
    """The tasks a forget instance keeps (a partial request's other tasks), less those `forgotten` lists (a
    lineage step: every pair forgotten so far, so an earlier request's pair never comes back as kept)."""
    gone = forgotten or {}
    return lambda key: np.array([t not in entries[key] and t not in gone.get(key, ()) for t in manifest.tasks])


def to_tensors(s: dict, tasks: tuple[str, ...], mask: np.ndarray, key: str, valid: bool = True) -> dict:
    """Checked numpy sample -> tensors, blanking labels of masked-out tasks."""
    out = {
        "image": torch.from_numpy(np.ascontiguousarray(s["image"].transpose(2, 0, 1))).float().div_(255),
        "mask": torch.from_numpy(mask.copy()),
        "valid": torch.tensor(valid),
        "key": key,
    }
    for j, t in enumerate(tasks):
        keep = bool(mask[j])
        if t == "seg":
            seg = torch.from_numpy(s["seg"].astype(np.int64))
            out["seg"] = seg if keep else torch.full_like(seg, SEG_IGNORE)
        elif t == "depth":
            d = torch.from_numpy(s["depth"].astype(np.float32))[None]
            out["depth"] = d if keep else torch.zeros_like(d)
        elif t == "normal":
            n = torch.from_numpy(s["normal"].astype(np.float32))
            out["normal"] = n if keep else torch.zeros_like(n)
    return out


def blank_sample(manifest: Manifest) -> dict:
    h, w = manifest.resolution
    s = {
        "image": np.zeros((h, w, 3), np.uint8),
        "seg": np.full((h, w), SEG_IGNORE, np.uint8),
        "depth": np.zeros((h, w), np.float32),
        "normal": np.zeros((3, h, w), np.float32),
    }
    return to_tensors(s, manifest.tasks, np.zeros(len(manifest.tasks), bool), key="", valid=False)


KEPT = "kept_"  # the prefix of the kept supervision a forget sample carries (`with_kept`)


def with_kept(sample: dict, kept: dict, tasks: tuple[str, ...]) -> dict:
    """A forget sample that also carries its instance's kept supervision (`kept_mask`, `kept_<task>`):
    the labels of the tasks a partial request leaves, which are retain data (`kept_view` reads them
    back as a batch of their own, which the runner records under `retain`)."""
    return {**sample, "kept_mask": kept["mask"], **{KEPT + t: kept[t] for t in tasks}}


def kept_view(batch: dict, tasks: tuple[str, ...]) -> dict:
    """The kept supervision of a batch of `with_kept` samples, as a batch (the same images and keys)."""
    view = {k: batch[k] for k in ("image", "valid", "key")}
    return {**view, "mask": batch["kept_mask"], **{t: batch[KEPT + t] for t in tasks}}


def mirrored(batch: dict, tasks: tuple[str, ...]) -> dict:
    """A batch mirrored left-right, images and labels alike (the task dictionary's `hflip`), with the same
    keys and masks: the same supervision pairs, seen as a model that memorised them has not seen them."""
    return {**batch, "image": batch["image"].flip(-1), **{t: TASKS[t].hflip(batch[t]) for t in tasks}}


def collate(samples: list[dict]) -> dict:
    out = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "key"}
    out["key"] = [s["key"] for s in samples]
    return out


def concat_batches(parts: list[dict], pin_memory: bool = False) -> dict:
    """One batch from the workers' chunks; `pin_memory`: into pinned memory, like the chunks (so the
    batch still moves to the GPU asynchronously)."""
    if len(parts) == 1:
        return parts[0]  # nothing to join
    out = {k: _cat([p[k] for p in parts], pin_memory) for k in parts[0] if k != "key"}
    out["key"] = [k for p in parts for k in p["key"]]
    return out


def _cat(tensors: list[torch.Tensor], pin_memory: bool) -> torch.Tensor:
    if not pin_memory:
        return torch.cat(tensors)
    shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
    return torch.cat(tensors, out=torch.empty(shape, dtype=tensors[0].dtype, device="cpu", pin_memory=True))


@dataclass
class SlotPlan:
    """What every reader slot reads in one epoch; identical on every rank (computed from the manifest)."""

    shard_order: list[int]  # indices into split.shards, shuffled per epoch
    num_slots: int
    chunk: int
    chunks_per_epoch: int
    by_sample: bool = False  # every slot reads every shard and keeps positions slot::num_slots

    def shards_of(self, slot: int) -> list[int]:
        return self.shard_order[slot :: self.num_slots]


def plan_epoch(
    manifest: Manifest, split: str, *, world: int, workers: int, local_batch: int, seed: int, epoch: int, shuffle: bool
) -> SlotPlan:
    if local_batch % max(workers, 1):
        raise UserError(f"local batch size {local_batch} must be divisible by the number of loader workers ({workers})")
    shards = manifest.split(split).shards
    order = list(range(len(shards)))
    if shuffle:
        random.Random(f"{seed}-{epoch}-shards").shuffle(order)
    num_slots = world * max(workers, 1)
    chunk = local_batch // max(workers, 1)
    sizes = [sum(shards[i].num_samples for i in order[s::num_slots]) for s in range(num_slots)]
    chunks = max(1, math.ceil(max(sizes) / chunk))
    if num_slots > 1 and 2 * min(sizes) < chunks * chunk:  # some slot would read mostly padding
        share = math.ceil(sum(sizes) / num_slots)
        return SlotPlan(order, num_slots, chunk, max(1, math.ceil(share / chunk)), by_sample=True)
    return SlotPlan(order, num_slots, chunk, chunks)


class ShardStream(IterableDataset):
    """One epoch of one rank's share of a split, as chunks (see the module docstring)."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        plan: SlotPlan,
        *,
        rank: int,
        world: int,
        mask_fn: MaskFn,
        shuffle_buffer: int,
        seed: int,
        epoch: int,
    ):
        self.manifest, self.split, self.plan = manifest, split, plan
        self.rank, self.world, self.mask_fn = rank, world, mask_fn
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, epoch

    def _slot(self) -> int:
        info = get_worker_info()
        return self.rank + self.world * (info.id if info else 0)

    def _my_shards(self) -> Iterator[int]:
        # split_by_node (explicit rank/world, so it never guesses from the environment), then
        # WebDataset's own split_by_worker.
        if self.plan.by_sample:
            return iter(self.plan.shard_order)  # every shard; _samples keeps this slot's positions
        by_node = islice(self.plan.shard_order, self.rank, None, self.world)
        return wds.split_by_worker(by_node)

    def _open_verified(self, indices) -> Iterator[dict]:
        for i in indices:
            shard = self.manifest.split(self.split).shards[i]
            path = self.manifest.shard_path(shard)
            data = read_verified(path, shard.sha256)
            self._reading = str(path)  # the shard a tar error below the expander comes from
            yield {"url": str(path), "stream": io.BytesIO(data)}

    def _samples(self) -> Iterator[dict]:
        m = self.manifest
        mine, keys = list(self._my_shards()), KeyCheck(m, self.split)
        expanded = wds.tariterators.tar_file_expander(self._open_verified(mine))
        try:
            for n, raw in enumerate(wds.tariterators.group_by_keys(expanded)):
                key = raw["__key__"]
                keys.check(raw["__url__"], key)  # an unlisted (renamed) instance never reaches a mask or a loss
                if self.plan.by_sample and n % self.plan.num_slots != self._slot():
                    continue  # another slot's sample: checked above, not decoded
                members = {k: v for k, v in raw.items() if not k.startswith("__")}
                s = decode_sample(members, m.tasks, m.resolution, m.num_classes, where=f"{raw['__url__']}: {key}")
                yield to_tensors(s, m.tasks, self.mask_fn(key), key)
            for i in mine:
                keys.finish(str(m.shard_path(m.split(self.split).shards[i])))
        except UserError:
            raise
        except Exception as e:  # tar/format errors from the expander carry the url in args
            url = next(
                (a for a in e.args if isinstance(a, str) and a.endswith(".tar")), getattr(self, "_reading", "shard")
            )
            detail = (str(e).splitlines() or [""])[0][:200]
            raise UserError(
                f"{url}: corrupt or truncated tar ({type(e).__name__}{': ' + detail if detail else ''})"
            ) from None

    def _shuffled(self, samples: Iterator[dict]) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        rng = random.Random(f"{self.seed}-{self.epoch}-{self._slot()}")
        buf = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        blank, chunk, emitted, buf = blank_sample(self.manifest), self.plan.chunk, 0, []
        for s in self._shuffled(self._samples()):
            buf.append(s)
            if len(buf) == chunk:
                yield collate(buf)
                emitted, buf = emitted + 1, []
        while emitted < self.plan.chunks_per_epoch:
            buf += [blank] * (chunk - len(buf))
            yield collate(buf)
            emitted, buf = emitted + 1, []


_WRAPPED = re.compile(r"UserError: (.*)\s*$", re.S)


class BatchLoader:
    """Iterate local batches of one split for one rank, epoch by epoch (see module docstring)."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        *,
        rank: int,
        world: int,
        local_batch: int,
        workers: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 64,
        seed: int = 0,
        mask_fn: MaskFn | None = None,
        pin_memory: bool = False,
    ):
        self.manifest, self.split, self.rank, self.world = manifest, split, rank, world
        self.pin_memory = (
            pin_memory  # for a CUDA consumer (mtu_dist.runner.device.pins_memory): batches move asynchronously
        )
        self.local_batch, self.workers, self.shuffle = local_batch, workers, shuffle
        self.shuffle_buffer, self.seed = (shuffle_buffer if shuffle else 0), seed
        self.mask_fn = mask_fn or full_mask(manifest)
        for shard in manifest.split(split).shards:  # fail fast, before any worker starts
            if not manifest.shard_path(shard).is_file():
                raise UserError(f"{manifest.shard_path(shard)}: shard listed in manifest.json is missing")
        if rank == 0 and self.plan(0).by_sample:
            print(f"mtu: note: {split_note(manifest, split, world, workers)}", file=sys.stderr)

    def plan(self, epoch: int) -> SlotPlan:
        return plan_epoch(
            self.manifest,
            self.split,
            world=self.world,
            workers=self.workers,
            local_batch=self.local_batch,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
        )

    def steps_per_epoch(self, epoch: int = 0) -> int:
        return self.plan(epoch).chunks_per_epoch

    def epoch(self, epoch: int) -> Iterator[dict]:
        plan = self.plan(epoch)
        ds = ShardStream(
            self.manifest,
            self.split,
            plan,
            rank=self.rank,
            world=self.world,
            mask_fn=self.mask_fn,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            epoch=epoch,
        )
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            prefetch_factor=4 if self.workers else None,
            worker_init_fn=quiet_loader_worker if self.workers else None,
        )
        parts, nw = [], max(self.workers, 1)
        try:
            with signals_deferred():  # an interrupt while the workers start waits until they have started
                chunks = iter(loader)
            for chunk in chunks:
                parts.append(chunk)
                if len(parts) == nw:
                    yield concat_batches(parts, self.pin_memory)
                    parts = []
        except Exception as e:  # a UserError raised inside a worker arrives re-wrapped, the worker's traceback
            match = _WRAPPED.search(str(e))  # in its message: keep only the original message
            if match:
                raise UserError(match.group(1).strip().splitlines()[-1]) from None
            raise


def split_note(manifest: Manifest, split: str, world: int, workers: int) -> str:
    """Why a split is read by sample, and the shard size that would give every slot its own shards."""
    shards, slots = manifest.split(split).shards, world * max(workers, 1)
    n, sizes = sum(sh.num_samples for sh in shards), sorted(sh.num_samples for sh in shards)
    have = f"{len(shards)} shard(s) of {sizes[0]}" + (f"-{sizes[-1]}" if sizes[-1] != sizes[0] else "") + " samples"
    fix = (
        f"re-shard with at most {n // slots} samples per shard (`mtu data synth`/`mtu data convert` with "
        f"--shard-size {n // slots}, or without --shard-size for the default layout)"
        if n >= slots
        else "the split has fewer samples than slots"
    )
    if workers > 1 and world <= len(shards):
        fix += " or use fewer loader workers (data.workers)"
    return (
        f"{world} rank(s) x {max(workers, 1)} loader worker(s) = {slots} reader slots over "
        f"{manifest.dataset}/{split}'s {have}: split by sample (every slot reads every shard and keeps one "
        f"sample in {slots}: exactly once per epoch, {slots}x the reads); to give each slot its own shards, {fix}"
    )


def read_verified(path, sha256: str) -> bytes:
    """A shard's bytes, read once and checked against its manifest sha256 before anything is expanded."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read shard ({e.strerror or e})") from None
    if sha256_bytes(data) != sha256:
        raise UserError(
            f"{path}: sha256 does not match manifest.json (corrupt or replaced shard; run `mtu data verify`)"
        )
    return data


def load_instances(manifest: Manifest, split: str, ids: list[str], mask_fn: MaskFn) -> list[dict]:
    """Materialise a few instances (the forget stream is small) by reading only their shards."""
    from mtu_dist.data.tario import iter_entries

    wanted, keys, offset = set(ids), manifest.split(split).keys, 0
    found, check = {}, KeyCheck(manifest, split)
    for shard in manifest.split(split).shards:
        span = set(keys[offset : offset + shard.num_samples])
        offset += shard.num_samples
        if not span & wanted:
            continue
        path = manifest.shard_path(shard)
        if not path.is_file():
            raise UserError(f"{path}: shard listed in manifest.json is missing")
        data = read_verified(path, shard.sha256)  # the same checks as the streaming reader
        for key, members in iter_entries(path, data):
            check.check(str(path), key)
            if key in wanted:
                s = decode_sample(
                    members, manifest.tasks, manifest.resolution, manifest.num_classes, where=f"{path}: {key}"
                )
                found[key] = to_tensors(s, manifest.tasks, mask_fn(key), key)
        check.finish(str(path))
    missing = wanted - set(found)
    if missing:
        raise UserError(f"instances not found in the shards: {sorted(missing)[:5]}")
    return [found[i] for i in ids]


def forget_batches(
    samples: list[dict], *, global_batch: int, rank: int, world: int, seed: int, blank: dict
) -> Iterator[dict]:
    """Endless local forget batches: each step draws the next `global_batch` instances of a seeded
    per-pass permutation (identical on every rank) and rank r takes the r-th equal slice; the global
    batch is padded with invalid samples to a multiple of the world size."""
    gb = min(global_batch, len(samples))
    per_rank = math.ceil(gb / world)
    pass_no = 0
    while True:
        order = list(range(len(samples)))
        random.Random(f"{seed}-forget-{pass_no}").shuffle(order)
        for start in range(0, len(order) - gb + 1, gb):
            picked = [samples[i] for i in order[start : start + gb]]
            picked += [blank] * (per_rank * world - len(picked))
            yield collate(picked[rank * per_rank : (rank + 1) * per_rank])
        pass_no += 1

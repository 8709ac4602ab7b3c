"""Write a dataset as WebDataset shards plus manifest.json, in parallel and atomically.

Each worker process renders and writes whole shards, so memory stays at one shard per worker no
matter how many samples are requested. Everything goes to a staging folder that replaces the
dataset folder only once every shard and the manifest are complete: an interrupted or failed run
never leaves a half-written dataset in place of a good one.
"""

from __future__ import annotations

import io
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import tarfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mtu_dist.data.manifest import Manifest, ShardInfo, SplitInfo
from mtu_dist.data.sample import encode_sample
from mtu_dist.errors import UserError
from mtu_dist.utils.fileio import ensure_writable_dir, replace_dir, sha256_file
from mtu_dist.utils.lifecycle import quiet_worker
from mtu_dist.utils.locks import OWNER, make_staging, release, remove_stale
from mtu_dist.utils.logs import progress_bar


@dataclass(frozen=True)
class DatasetLayout:
    dataset: str
    tasks: tuple[str, ...]
    num_classes: int
    class_names: list[str]
    resolution: tuple[int, int]


FIT_SLOTS = 16  # reader slots the default layout serves evenly: 8 ranks x 2 loader workers (and 1, 2, 4)
MAX_SHARD = 1000  # samples per default shard at most: large data gets more shards, not bigger ones


def shard_bounds(n: int, shard_size: int | None) -> list[tuple[int, int]]:
    """[start, stop) of every shard of a split of n samples. `shard_size` given: shards of that size (the
    last one shorter). None: a multiple of FIT_SLOTS shards whose sizes differ by at most one, so 1, 2,
    4, 8 or 16 reader slots each get their own, equally full shards (see stream.py's reader slots)."""
    if shard_size:
        return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]
    k = min(n, FIT_SLOTS * math.ceil(n / (FIT_SLOTS * MAX_SHARD)))
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


def instance_key(dataset: str, split: str, index: int) -> str:
    return f"{dataset}/{split}/{index:06d}"


def write_tar(path: Path, entries: list[tuple[str, dict[str, bytes]]]) -> None:
    """Deterministic tar: fixed mtime/owner so the same samples give byte-identical shards."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in entries:
            for name, data in members.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def _write_shard(job) -> tuple[str, int, str, list[str]]:
    layout, sample_fn, folder, split, shard_idx, start, stop = job
    entries = []
    for index in range(start, stop):
        key = instance_key(layout.dataset, split, index)
        sample = sample_fn(split, index)
        meta = {"key": key, "split": split, "source": sample.get("source", layout.dataset), **sample.get("meta", {})}
        entries.append((key, encode_sample(sample, layout.tasks, meta)))
    name = f"{split}-{shard_idx:06d}.tar"
    write_tar(Path(folder) / name, entries)
    return name, stop - start, sha256_file(Path(folder) / name), [k for k, _ in entries]


def write_dataset(
    out_root: str | Path,
    layout: DatasetLayout,
    split_sizes: dict[str, int],
    sample_fn: Callable[[str, int], dict],
    *,
    shard_size: int | None,
    workers: int,
    overwrite: bool,
    source: dict,
    progress: Callable[[str], None] = print,
) -> Manifest:
    """Render `split_sizes[split]` samples per split with `sample_fn(split, index)` into shards
    (`shard_size` None: the default layout of `shard_bounds`).

    `sample_fn` must be picklable (a module-level function or a functools.partial of one).
    """
    root = ensure_writable_dir(out_root)
    final = root / layout.dataset
    if final.exists() and not overwrite:
        raise UserError(
            f"{final}: already exists; pass --overwrite to replace it "
            "(the old data is kept until the new data is complete)"
        )
    if shard_size is not None and shard_size < 1:
        raise UserError(f"--shard-size must be >= 1 (got {shard_size})")
    remove_stale(root, ".*.staging-*")  # left by writers killed outright (SIGKILL, power loss)
    staging = root / f".{layout.dataset}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    owner = make_staging(staging)  # locked while we write: a later run can tell it is not stale
    try:
        splits = {}
        for split, n in split_sizes.items():
            if n <= 0:
                continue
            jobs = [
                (layout, sample_fn, str(staging), split, i, start, stop)
                for i, (start, stop) in enumerate(shard_bounds(n, shard_size))
            ]
            with progress_bar(total=len(jobs), desc=f"{layout.dataset}/{split}", unit="shard") as bar:
                results = _run(jobs, workers, owner, done=bar.update)
            splits[split] = SplitInfo(
                keys=[k for r in results for k in r[3]],
                shards=[ShardInfo(file=r[0], num_samples=r[1], sha256=r[2]) for r in results],
            )
            progress(f"{layout.dataset}/{split}: {n} samples in {len(jobs)} shards")
        manifest = Manifest(
            dataset=layout.dataset,
            tasks=layout.tasks,
            num_classes=layout.num_classes,
            class_names=layout.class_names,
            resolution=layout.resolution,
            splits=splits,
            source=source,
        )
        manifest.save(staging)
        (staging / OWNER).unlink()
        replace_dir(staging, final)
    except BaseException:  # errors, Ctrl-C and SIGTERM (lifecycle.Terminated) alike
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        release(owner)
    manifest.root = final
    return manifest


def _run(jobs, workers: int, owner: int, done: Callable[[], object] = lambda: None):
    """Shards in job order, written by up to `workers` forked processes (fork keeps start-up cheap; the
    workers only use numpy/PIL), `done()` called as each one is in. Each worker has a pipe of its own:
    multiprocessing.Pool's shared queue locks deadlock its terminate() when Ctrl-C or SIGTERM kills a
    worker that holds one, and then the interrupt never ends. Here an interrupt only stops the workers
    (they leave interrupts to us)."""
    if workers <= 1 or len(jobs) == 1:
        results = []
        for job in jobs:
            results.append(_write_shard(job))
            done()
        return results
    ctx, n = mp.get_context("fork"), min(workers, len(jobs))
    procs, pending, results = [], [], [None] * len(jobs)
    try:
        for w in range(n):
            reader, writer = ctx.Pipe(duplex=False)
            procs.append(
                ctx.Process(
                    target=_worker, args=(list(enumerate(jobs))[w::n], writer, owner, [*pending, reader]), daemon=True
                )
            )
            procs[-1].start()
            writer.close()
            pending.append(reader)
        while pending:
            for reader in mp.connection.wait(pending):
                try:
                    index, result = reader.recv()
                except EOFError:  # that worker is done (or died: its shards are missing below)
                    pending.remove(reader)
                    continue
                if index is None:
                    raise result
                results[index] = result
                done()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    if any(r is None for r in results):
        raise RuntimeError(f"a shard writer process died (exit codes {[p.exitcode for p in procs]})")
    return results


def _worker(jobs, conn, owner: int, others: list) -> None:
    # drop what the fork copied but is not ours: the staging lock (an orphan of a parent killed outright
    # would keep it held) and every pipe's reading end (a copy of one keeps its writer from EPIPE)
    quiet_worker(owner)
    for reader in others:
        reader.close()
    try:
        for index, job in jobs:
            conn.send((index, _write_shard(job)))
    except BrokenPipeError:  # the parent is gone (killed outright): nobody to report to
        pass
    except Exception as e:  # noqa: BLE001 - re-raised by the parent: a bad input is one line there
        try:
            conn.send((None, e if isinstance(e, UserError) else RuntimeError(traceback.format_exc())))
        except BrokenPipeError:
            pass
    finally:
        conn.close()

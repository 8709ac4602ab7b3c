"""Timing helpers shared by the bench scripts: medians, interleaved variant order, and how busy
the rest of the machine was while a section ran (on a shared machine, scaling is only meaningful
when that is near 0)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def ordered(variants, rep):
    """Alternate the variant order between repeats (A B C, C B A, ...)."""
    return list(variants) if rep % 2 == 0 else list(reversed(variants))


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (writer pools, loader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def machine_busy_seconds() -> float | None:
    """CPU-seconds all processes of the machine have been busy (Linux /proc/stat), or None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """Average number of cores busy with *other* processes while a section ran (shared machines)."""

    def __enter__(self):
        self.t0, self.c0, self.m0 = time.perf_counter(), cpu_seconds(), machine_busy_seconds()
        return self

    def __exit__(self, *exc):
        wall, m1 = time.perf_counter() - self.t0, machine_busy_seconds()
        own = cpu_seconds() - self.c0
        self.result = {
            "wall_s": wall,
            "own_cores": own / wall,
            "other_cores": None if m1 is None else max(0.0, (m1 - self.m0 - own) / wall),
        }
        return False


def describe_load(load: dict) -> str:
    """'section cores, ...' for the sections whose foreign load could be measured."""
    busy = ", ".join(f"{k} {v['other_cores']:.2f}" for k, v in load.items() if v["other_cores"] is not None)
    return busy or "unknown"


def synchronize() -> None:
    """Wait for queued CUDA work, so a wall-clock interval covers the kernels it launched (no-op on CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PeakMemory:
    """Peak CUDA memory allocated by this process while a section ran (MiB); None unless `device` is cuda."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        self.mib = None
        if self.cuda:
            import torch

            self.mib = torch.cuda.max_memory_allocated() / 2**20
        return False

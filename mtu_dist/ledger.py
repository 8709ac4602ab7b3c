"""Which (instance, task) supervision pairs a run consumed, and deliberate fault injection for tests.

Every training or unlearning step records the pairs whose supervision mask was on. The counts are
gathered to rank 0 and written as `ledger.json` beside the final model, so a run can prove that no
forget pair ever supervised it (`mtu_dist.ledger.leaked`).
"""
from __future__ import annotations

import os
from collections import Counter

import torch.distributed as dist


class Ledger:
    def __init__(self):
        self.pairs: Counter = Counter()

    def record(self, batch: dict, tasks: tuple[str, ...], role: str = "retain") -> None:
        sup = (batch["mask"] & batch["valid"][:, None]).tolist()
        for key, row in zip(batch["key"], sup):
            for t, on in zip(tasks, row):
                if on:
                    self.pairs[f"{role}|{key}|{t}"] += 1

    def recording(self, batches, tasks: tuple[str, ...], role: str) -> "RecordedStream":
        return RecordedStream(batches, self, tasks, role)

    def gather(self, world: int) -> dict[str, int]:
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, dict(self.pairs))
            total = Counter()
            for p in parts:
                total.update(p)
            return dict(total)
        return dict(self.pairs)


class RecordedStream:
    """Wraps a batch iterator: every batch handed out is recorded under `role` first, after the
    optional task mask (so what is recorded is exactly what the consumer could use)."""

    def __init__(self, batches, ledger: Ledger, tasks: tuple[str, ...], role: str):
        self.batches, self.ledger, self.tasks, self.role = batches, ledger, tasks, role
        self.masked = None

    def mask_tasks(self, mask) -> None:
        """Turn off these tasks' supervision in every later batch (a bool tensor over tasks)."""
        self.masked = mask if mask is not None and bool(mask.any()) else None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        if self.masked is not None:
            batch = {**batch, "mask": batch["mask"] & ~self.masked}
        self.ledger.record(batch, self.tasks, role=self.role)
        return batch


def leaked(ledger: dict[str, int], forget_pairs: set[tuple[str, str]], role: str = "retain") -> list[str]:
    """Ledger entries of `role` steps that are forget pairs (must be empty)."""
    return sorted(k for k in ledger if k.startswith(role + "|") and tuple(k.split("|")[1:]) in forget_pairs)


def fault_point(phase: str, step: int) -> None:
    """Test hook: `MTU_FAULT=phase:step[:rank]` kills this process hard (like kill -9) after that step."""
    spec = os.environ.get("MTU_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    rank = int(os.environ.get("RANK", "0"))
    if parts[0] == phase and int(parts[1]) == step and (len(parts) < 3 or int(parts[2]) == rank):
        os._exit(137)

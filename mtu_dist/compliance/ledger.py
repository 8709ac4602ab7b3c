"""Which (instance, task) supervision pairs a run consumed.

Every training or unlearning step records the pairs whose supervision mask was on, per role:
`retain` (supervised toward its own labels), `forget` (the forget signal a method removes) and
`target` (a pair whose labels a method borrows as the substitute target of another instance). The
counts are gathered to rank 0 and written as `final/ledger.json` (`ledger_document`): per role the
number of distinct pairs, the total uses, and the pairs both as sha256 keys (`pair_hash`, what
`mtu audit` matches against the request) and as plain `instance|task` keys (kept so an auditor can
name any pair without re-hashing the dataset; instance ids are dataset positions, and the request
holding the same ids is logged with the run anyway).

The test hooks that kill a rank or leak a pair on purpose are in runner/faults.py.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import torch.distributed as dist

FORMAT = "mtu-ledger/1"


def pair_hash(instance: str, task: str) -> str:
    return hashlib.sha256(f"{instance}|{task}".encode()).hexdigest()


class Ledger:
    def __init__(self):
        self.pairs: Counter = Counter()

    def record(self, batch: dict, tasks: tuple[str, ...], role: str = "retain") -> None:
        sup = (batch["mask"] & batch["valid"][:, None]).tolist()
        for key, row in zip(batch["key"], sup):
            for t, on in zip(tasks, row):
                if on:
                    self.pairs[f"{role}|{key}|{t}"] += 1

    def recording(self, batches, tasks: tuple[str, ...], role: str) -> RecordedStream:
        return RecordedStream(batches, self, tasks, role)

    def restore(self, counts: dict[str, int], is_main: bool) -> None:
        """Resume: rank 0 carries everything consumed up to the checkpoint (gathered over every rank),
        the other ranks start empty, so the next `gather` equals an uninterrupted run's."""
        self.pairs = Counter(counts) if is_main else Counter()

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
        self.drawn = 0  # batches handed out so far: the stream position a checkpoint records

    def resume_at(self, batches, drawn: int) -> None:
        """Continue from `batches`, an iterator already positioned after `drawn` batches (not recorded
        again: the restored ledger holds them)."""
        self.batches, self.drawn = batches, drawn

    def mask_tasks(self, mask) -> None:
        """Turn off these tasks' supervision in every later batch (a bool tensor over tasks)."""
        self.masked = mask if mask is not None and bool(mask.any()) else None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        self.drawn += 1
        if self.masked is not None:
            batch = {**batch, "mask": batch["mask"] & ~self.masked}
        self.ledger.record(batch, self.tasks, role=self.role)
        return batch


def ledger_document(counts: dict[str, int], request_sha256: str | None) -> dict:
    """`role|instance|task -> uses` (what `Ledger.gather` returns) as the ledger.json document."""
    roles: dict[str, dict] = {}
    for key in sorted(counts):
        role, instance, task = key.split("|")
        r = roles.setdefault(role, {"pairs": 0, "uses": 0, "sha256": {}, "keys": {}})
        r["pairs"] += 1
        r["uses"] += counts[key]
        r["sha256"][pair_hash(instance, task)] = counts[key]
        r["keys"][f"{instance}|{task}"] = counts[key]
    return {
        "format": FORMAT,
        "key_hash": "sha256 of the UTF-8 string '<instance>|<task>'",
        "request_sha256": request_sha256,
        "roles": roles,
    }


def ledger_bytes(counts: dict[str, int], request_sha256: str | None) -> bytes:
    """ledger.json's exact bytes (their sha256 is recorded in the final state.json)."""
    return (json.dumps(ledger_document(counts, request_sha256), indent=1) + "\n").encode()


def flat_counts(document: dict) -> dict[str, int]:
    """ledger.json -> `role|instance|task -> uses` (the inverse of `ledger_document`)."""
    return {f"{role}|{key}": n for role, r in document["roles"].items() for key, n in r["keys"].items()}

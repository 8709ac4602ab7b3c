"""Deliberate faults for tests, both loud and off unless their environment variable is set.

`MTU_FAULT=phase:step[:rank]` kills a rank hard at a chosen step (`fault_point`); `MTU_TEST_LEAK` leaves
one forget pair (the first, or a named one) in the retain stream (`deliberate_leak`): a real leak
through the real loop, which `mtu audit` must catch.
"""

from __future__ import annotations

import os
import sys


def deliberate_leak(
    forget_entries: dict[str, tuple[str, ...]], newest: dict[str, tuple[str, ...]] | None = None
) -> dict[str, tuple[str, ...]]:
    """Test hook: with `MTU_TEST_LEAK=1` the first pair of this run's own request (`newest`, default all of
    `forget_entries`; `MTU_TEST_LEAK=<instance>|<task>`: that pair, e.g. one an earlier request of a lineage
    forgot) is NOT masked out of the retain stream (its label stays too), so a run really trains on it.
    Only for proving the audit catches it."""
    spec = os.environ.get("MTU_TEST_LEAK")
    if not spec or not forget_entries:
        return forget_entries
    if spec == "1":
        instance, tasks = next(iter((newest or forget_entries).items()))
        task = tasks[0]
    else:
        instance, _, task = spec.partition("|")
        if task not in forget_entries.get(instance, ()):
            return forget_entries
    print(
        f"mtu: WARNING: MTU_TEST_LEAK: forget pair {instance}|{task} is deliberately left in the retain stream",
        file=sys.stderr,
    )
    out = dict(forget_entries)
    rest = tuple(t for t in out[instance] if t != task)
    if rest:
        out[instance] = rest
    else:
        del out[instance]
    return out


def fault_point(phase: str, step: int) -> None:
    """Test hook: `MTU_FAULT=phase:step[:rank]` kills this process hard (like kill -9) after that step;
    phases: train, retrain, unlearn."""
    spec = os.environ.get("MTU_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    rank = int(os.environ.get("RANK", "0"))
    if parts[0] == phase and int(parts[1]) == step and (len(parts) < 3 or int(parts[2]) == rank):
        os._exit(137)

"""Terminal tables from metrics.json reports."""
from __future__ import annotations

from mtu_dist.tasks import TASKS


def split_table(report: dict) -> str:
    """One row per split: the primary metric of each task."""
    splits = report["splits"]
    tasks = sorted({t for sp in splits.values() for t in sp}, key=list(TASKS).index)
    head = "| split | " + " | ".join(f"{t} {TASKS[t].primary}" for t in tasks) + " |"
    rows = [head, "|" + "---|" * (len(tasks) + 1)]
    for name, sp in splits.items():
        cells = [f"{sp[t][TASKS[t].primary]:.4f}" if t in sp else "" for t in tasks]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)

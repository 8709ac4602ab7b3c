"""Launched on N ranks by a test: make mtu's accelerator, all-reduce once, write rank/world to OUT/rank<r>.json."""

import json
import sys
from pathlib import Path

import torch

from mtu_dist.distributed.runtime import make_accelerator

acc = make_accelerator()
total = torch.tensor([float(acc.process_index + 1)])
if acc.num_processes > 1:
    torch.distributed.all_reduce(total)  # a real collective: every rank joined the same group
Path(sys.argv[1], f"rank{acc.process_index}.json").write_text(
    json.dumps(
        {"rank": acc.process_index, "world": acc.num_processes, "sum": total.item(), "backend": str(acc.state.backend)}
    )
)
acc.wait_for_everyone()
acc.end_training()  # tear the process group down before exit: a rank that exits with gloo live can abort the other

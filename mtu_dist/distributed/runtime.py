"""Process-group set-up through Accelerate, with the world size checked (never guessed)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch

from ..errors import UserError

COLLECTIVE_TIMEOUT = timedelta(minutes=int(os.environ.get("MTU_COLLECTIVE_TIMEOUT_MIN", "10")))


def make_accelerator(**kwargs):
    """An Accelerator on gloo (CPU) or NCCL (GPU) whose world size matches what the launcher asked for.

    `accelerate launch --cpu --num_processes N` silently starts ONE process; launch/accelerate/cpu_2proc.yaml
    (MULTI_GPU + use_cpu) really starts N gloo ranks. A collective timeout makes a dead rank fail the
    others instead of hanging them.
    """
    from accelerate import Accelerator, InitProcessGroupKwargs

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    handlers = kwargs.pop("kwargs_handlers", [])
    if expected > 1:  # in a single process this handler would make Accelerate expect a process group
        handlers.append(InitProcessGroupKwargs(backend="gloo" if cpu else "nccl", timeout=COLLECTIVE_TIMEOUT))
    acc = Accelerator(cpu=cpu, kwargs_handlers=handlers, **kwargs)
    if acc.num_processes != expected:
        raise UserError(f"launcher asked for WORLD_SIZE={expected} but {acc.num_processes} process(es) joined; "
                        "on CPU launch with --config_file launch/accelerate/cpu_2proc.yaml")
    return acc

"""Process-group set-up through Accelerate, with the world size checked (never guessed)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from mtu_dist.errors import UserError

COLLECTIVE_TIMEOUT = timedelta(minutes=int(os.environ.get("MTU_COLLECTIVE_TIMEOUT_MIN", "10")))


def make_accelerator(**kwargs):
    """An Accelerator on gloo (CPU) or NCCL (GPU) whose world size matches what the launcher asked for.

    `accelerate launch --cpu --num_processes N` silently starts ONE process; launch/accelerate/cpu_2proc.yaml
    (MULTI_GPU + use_cpu) really starts N gloo ranks. A collective timeout makes a dead rank fail the
    others instead of hanging them.
    """
    from accelerate import Accelerator, InitProcessGroupKwargs

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    expected = launcher_world_size()
    handlers = kwargs.pop("kwargs_handlers", [])
    # in a single process this handler would make Accelerate expect a process group (DeepSpeed always has
    # one; without the handler it asks for oneCCL on CPU and miscounts the ranks)
    if deepspeed:
        _require_deepspeed()
    if expected > 1 or deepspeed:
        handlers.append(InitProcessGroupKwargs(backend="gloo" if cpu else "nccl", timeout=COLLECTIVE_TIMEOUT))
    if deepspeed and cpu:
        _plain_cpu_collectives()
    # Accelerator(cpu=True) silently drops the DeepSpeed plugin: DeepSpeed picks its CPU accelerator itself
    acc = Accelerator(cpu=cpu and not deepspeed, kwargs_handlers=handlers, **kwargs)
    if acc.num_processes != expected:
        raise UserError(
            f"launcher asked for WORLD_SIZE={expected} but {acc.num_processes} process(es) joined; "
            "on CPU launch with --config_file launch/accelerate/cpu_2proc.yaml"
        )
    stage = zero_stage(acc)
    if stage is not None and stage > 2:
        raise UserError(
            f"DeepSpeed zero_stage = {stage} in the accelerate config: stages 0, 1 and 2 are supported "
            "(stage 3 partitions the parameters; the per-task projection works on whole parameter rows)"
        )
    return acc


def zero_stage(acc) -> int | None:
    """The ZeRO stage when Accelerate runs DeepSpeed, else None."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def _require_deepspeed() -> None:
    """DeepSpeed and the transformers that Accelerate's DeepSpeed plugin imports are an extra: say what to
    install instead of failing deep inside Accelerate with a PackageNotFoundError."""
    from importlib.util import find_spec

    missing = [name for name in ("deepspeed", "transformers") if find_spec(name) is None]
    if missing:
        raise UserError(
            f"the accelerate config asks for DeepSpeed but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install -c constraints.txt "
            "-e '.[deepspeed]' (or pip install 'mtu_dist[deepspeed]')"
        )


def _plain_cpu_collectives() -> None:
    """DeepSpeed on CPU compiles a shared-memory collective op when its process group starts (one to two
    minutes, a C++ toolchain needed); it serves inference all-reduces only, so training loses nothing
    by skipping it and its collectives stay on gloo, like every other path. `__compatible_ops__` is
    DeepSpeed's (editable) table of the ops it may build."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def launcher_world_size() -> int:
    """WORLD_SIZE, checked with the rest of the launcher's environment: a half-set environment (say
    WORLD_SIZE exported by hand) would otherwise fail deep inside the process-group set-up."""
    raw = os.environ.get("WORLD_SIZE", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(f"environment WORLD_SIZE={raw!r}: expected a positive integer")
    world = int(raw)
    if world == 1:
        _check_single_launch()
        return 1
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise UserError(
            f"environment WORLD_SIZE={world} but {', '.join(missing)} not set: start the ranks with "
            "a launcher (accelerate launch --config_file launch/accelerate/cpu_2proc.yaml ...)"
        )
    rank = os.environ["RANK"]
    if not rank.isdigit() or int(rank) >= world:
        raise UserError(f"environment RANK={rank!r}: expected 0..{world - 1} for WORLD_SIZE={world}")
    return world


def _check_single_launch() -> None:
    """`accelerate launch --cpu --num_processes N` (or a MULTI_CPU config) starts ONE process without a
    WORLD_SIZE, and exits 0 after it. What it leaves behind (accelerate/utils/launch.py,
    prepare_simple_launcher_cmd_env): its ACCELERATE_DYNAMO_BACKEND, and MASTER_ADDR/MASTER_PORT only when
    more than one process was asked for. Together, without WORLD_SIZE, they mean N were asked for and 1 came."""
    asked_many = os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")
    if "WORLD_SIZE" not in os.environ and "ACCELERATE_DYNAMO_BACKEND" in os.environ and asked_many:
        raise UserError(
            "accelerate launch was asked for several processes but started ONE (--cpu or "
            "distributed_type MULTI_CPU does that; MASTER_ADDR is set, WORLD_SIZE is not): on CPU use "
            "accelerate launch --config_file launch/accelerate/cpu_2proc.yaml --num_processes N ..."
        )

"""Where a step's tensors live.

Batches are produced on the CPU (the loader, the in-memory forget set) and moved once, by `to_device`,
where a step takes them; the supervision ledger reads them before that, on the CPU. Everything a step
creates is made on the device of the tensors it combines with (`device=x.device`, `new_*`, `*_like`),
collective buffers included (NCCL takes GPU tensors only). Values come back with `.cpu()`, `.item()`
or `.tolist()` only where they leave the step: logs, metrics, files. A few tensors are host-side by
design and say so with `device="cpu"`: draws from the seeded CPU generators (the same on every device
and world size) and the task mask applied to CPU batches.

On the CPU every move is a no-op: the CPU path runs exactly the operations it ran before.
"""

from __future__ import annotations

import torch


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch (tensors and keys) with its tensors on `device`; asynchronous from pinned memory (the
    copy is queued on the current stream, ahead of every kernel that reads it)."""
    return {
        k: v.to(device, non_blocking=device.type == "cuda" and v.is_pinned()) if torch.is_tensor(v) else v
        for k, v in batch.items()
    }


def pins_memory(device: torch.device) -> bool:
    """Whether loaders feeding `device` should pin their batches: only for CUDA (elsewhere pinning
    costs a copy and buys nothing)."""
    return torch.device(device).type == "cuda"


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device

"""Gradient signals: K scalar losses -> their gradients w.r.t. the parameters, packed into the
rank-major signal buffer (see gradstep.py).

Two engines with identical results: `sequential` (one autograd.grad per signal over a shared graph;
the floor is about one backward pass per signal) and `batched` (one vmapped backward,
`is_grads_batched=True`). `auto` times both once on the first step's losses and keeps the faster.
"""

from __future__ import annotations

import time

import torch

from mtu_dist.distributed.gradstep import ParamLayout


def sequential(losses: list[torch.Tensor], params, layout: ParamLayout, buf: torch.Tensor) -> None:
    for k, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        layout.pack(buf, k, list(grads))


def batched(losses: list[torch.Tensor], params, layout: ParamLayout, buf: torch.Tensor) -> None:
    stacked = torch.stack(losses)
    eye = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
    grads = torch.autograd.grad(
        stacked, params, grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True
    )
    layout.pack_batched(buf, list(grads))


ENGINES = {"sequential": sequential, "batched": batched}


def pick_engine(losses, params, layout, buf, repeats: int = 2) -> str:
    """Measure both engines on these losses (same graph, retained) and return the faster one's name."""
    best = {}
    for name, fn in ENGINES.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(losses, params, layout, buf)
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
    return min(best, key=best.get)

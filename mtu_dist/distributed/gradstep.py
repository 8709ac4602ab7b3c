"""The distributed per-task gradient step (docs/design.md §5).

Parameter axis. All trainable parameters, flattened in order, form one axis of length P. Its
*rows* are slices along each parameter's first dimension (a conv weight [out, in, k, k] has `out`
rows of `in*k*k`). Rank r owns a contiguous range of the axis whose ends fall on row boundaries, so
every layer projection `G (I - B B^T)` — which acts on rows independently — can run on the rows a
rank owns.

Buffer. The K gradient signals live in ONE preallocated flat buffer laid out rank-major,
`[N, K, S]` (S = the largest owned range, padded): rank r's columns of every signal are contiguous,
which is exactly what a flat `reduce_scatter_tensor` hands to rank r. Per step:
  replicated: one all_reduce of the whole buffer; every rank then holds every column.
  sharded:    one reduce_scatter; rank r holds [K, S] (its columns, summed over ranks); the update
              slice is all_gathered at the end. Per-rank signal memory after the collective: K*P/N.
Inner products for the orthogonalization are summed over owned columns and completed with one
small all_reduce of a Gram matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Piece:
    """Rows [row0, row1) of parameter `index`, stored at [dst, dst + n) of `rank`'s columns."""

    index: int
    row0: int
    row1: int
    rank: int
    dst: int
    row_size: int

    @property
    def n(self) -> int:
        return (self.row1 - self.row0) * self.row_size


class ParamLayout:
    """Row-aligned partition of the parameter axis over `world` ranks."""

    def __init__(self, params: list[torch.nn.Parameter], world: int):
        self.params, self.world = params, world
        self.shapes = [p.shape for p in params]
        self.total = sum(p.numel() for p in params)
        # A row goes to the rank whose ideal range [r*P/N, (r+1)*P/N) holds the row's midpoint: ranges
        # stay contiguous and each boundary is within half a row of ideal.
        self.pieces: list[Piece] = []
        self.owned = [0] * world
        pos = 0
        for i, p in enumerate(params):
            rows, row_size = (p.shape[0], p[0].numel()) if p.dim() > 0 else (1, 1)
            for r in range(rows):
                rank = min(world - 1, int((pos + row_size / 2) * world // self.total))
                last = self.pieces[-1] if self.pieces else None
                if last is not None and last.index == i and last.rank == rank and last.row1 == r:
                    last.row1 += 1
                else:
                    self.pieces.append(Piece(i, r, r + 1, rank, self.owned[rank], row_size))
                self.owned[rank] += row_size
                pos += row_size
        self.shard = max(self.owned)  # S

    def pieces_of(self, rank: int) -> list[Piece]:
        return [pc for pc in self.pieces if pc.rank == rank]

    def new_buffer(self, k: int, dtype, device) -> torch.Tensor:
        return torch.zeros(self.world, k, self.shard, dtype=dtype, device=device)

    def pack(self, buf: torch.Tensor, k: int, grads: list[torch.Tensor | None]) -> None:
        """Write signal k's per-parameter gradients into the rank-major buffer."""
        for pc in self.pieces:
            g = grads[pc.index]
            dst = buf[pc.rank, k, pc.dst : pc.dst + pc.n]
            if g is None:
                dst.zero_()
            else:
                dst.copy_(g.reshape(g.shape[0] if g.dim() else 1, -1)[pc.row0 : pc.row1].reshape(-1))

    def pack_batched(self, buf: torch.Tensor, grads: list[torch.Tensor | None]) -> None:
        """Same, for [K, *shape] gradients from a batched engine."""
        for pc in self.pieces:
            g = grads[pc.index]
            dst = buf[pc.rank, :, pc.dst : pc.dst + pc.n]
            if g is None:
                dst.zero_()
            else:
                kk = g.shape[0]
                rows = g.shape[1] if g.dim() > 1 else 1
                dst.copy_(g.reshape(kk, rows, -1)[:, pc.row0 : pc.row1].reshape(kk, -1))

    def to_natural(self, buf: torch.Tensor) -> torch.Tensor:
        """[N, K, S] rank-major -> [K, P] in natural parameter order (for traces and tests)."""
        offsets = [0]
        for shape in self.shapes:
            offsets.append(offsets[-1] + (torch.Size(shape).numel()))
        out = buf.new_zeros(buf.shape[1], self.total)
        for pc in self.pieces:
            start = offsets[pc.index] + pc.row0 * pc.row_size
            out[:, start : start + pc.n] = buf[pc.rank, :, pc.dst : pc.dst + pc.n]
        return out

    def unpack(self, rows: torch.Tensor, blocks, out: list[torch.Tensor]) -> None:
        """`rows` [len(blocks), S], the columns of ranks `blocks` -> their places in the per-parameter
        tensors `out` (places outside those blocks are left alone)."""
        for b, flat in zip(blocks, rows):
            for pc in self.pieces_of(b):
                t = out[pc.index]
                t.view(t.shape[0] if t.dim() else 1, -1)[pc.row0 : pc.row1] = (
                    flat[pc.dst : pc.dst + pc.n].view(pc.row1 - pc.row0, -1).to(t.dtype)
                )

    def unpack_into_grads(self, flat_by_rank: torch.Tensor) -> None:
        """`flat_by_rank` [N, S] (an update gathered from every rank) -> each parameter's .grad."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for pc in self.pieces:
            p = self.params[pc.index]
            view = p.grad.view(p.shape[0] if p.dim() else 1, -1)
            view[pc.row0 : pc.row1] = (
                flat_by_rank[pc.rank, pc.dst : pc.dst + pc.n].view(pc.row1 - pc.row0, -1).to(p.dtype)
            )


def reduce_signals(buf: torch.Tensor, mode: str, rank: int, world: int) -> torch.Tensor:
    """ONE collective over the whole buffer. Returns the [K, S] block this rank works on:
    replicated -> the full [N, K, S] buffer (all columns); sharded -> its own [K, S] slice."""
    if world == 1:
        return buf if mode == "replicated" else buf[0]
    if mode == "replicated":
        dist.all_reduce(buf)
        return buf
    out = torch.empty(buf.shape[1] * buf.shape[2], dtype=buf.dtype, device=buf.device)
    dist.reduce_scatter_tensor(out, buf.reshape(-1))
    return out.view(buf.shape[1], buf.shape[2])


def gather_blocks(x: torch.Tensor, mode: str, world: int) -> torch.Tensor:
    """[blocks, K, S] this rank works on -> the full [N, K, S] on every rank (traces/tests only)."""
    if mode == "replicated" or world == 1:
        return x
    out = torch.empty(world * x.numel(), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous().reshape(-1))
    return out.view(world, *x.shape[1:])


def gather_update(update: torch.Tensor, mode: str, world: int) -> torch.Tensor:
    """The update as [N, S] on every rank (replicated: already complete; sharded: all_gather)."""
    if mode == "replicated" or world == 1:
        return update if update.dim() == 2 else update[None]
    out = torch.empty(world * update.numel(), dtype=update.dtype, device=update.device)
    dist.all_gather_into_tensor(out, update.contiguous().reshape(-1))
    return out.view(world, -1)


def allreduce_small(t: torch.Tensor, mode: str, world: int) -> torch.Tensor:
    """Complete partial sums over owned columns (sharded only; replicated sums are already global)."""
    if mode == "sharded" and world > 1:
        dist.all_reduce(t)
    return t

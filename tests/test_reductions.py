"""The cross-rank reduction code paths, in one process and in seconds.

Every helper that reduces across ranks skips its collective at world size 1, so a one-rank run never
executes it; the multi-process tests do, but only in the slow suite. Here N ranks are N threads of this
process, and the `torch.distributed` calls the helpers make are answered by a barrier-synchronised
exchange with the real collectives' semantics (sum, scatter of the summed buffer, gather in rank order).
Each helper's N-rank result is compared with the one-rank result on all the data.
"""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mtu_dist.compliance.ledger import Ledger
from mtu_dist.config import RunConfig
from mtu_dist.data.manifest import load_manifest
from mtu_dist.data.stream import blank_sample, load_instances
from mtu_dist.distributed.gradstep import ParamLayout, allreduce_small, gather_blocks, gather_update, reduce_signals
from mtu_dist.evaluation.evaluate import instance_batches, run_split
from mtu_dist.model import build_model
from mtu_dist.runner.objective import global_counts, reduce_for_logging


class ThreadWorld:
    def __init__(self, n: int):
        self.n, self.slots, self.local = n, [None] * n, threading.local()
        self.barrier = threading.Barrier(n, timeout=60)

    def _exchange(self, value):
        self.slots[self.local.rank] = value
        self.barrier.wait()
        every = list(self.slots)
        self.barrier.wait()  # no rank overwrites its slot before every rank has read them all
        return every

    def all_reduce(self, t, op=None, group=None, async_op=False):
        t.copy_(torch.stack(self._exchange(t.clone())).sum(0))

    def reduce_scatter_tensor(self, out, inp, op=None, group=None, async_op=False):
        total = torch.stack(self._exchange(inp.clone())).sum(0)
        out.copy_(total.view(self.n, -1)[self.local.rank])

    def all_gather_into_tensor(self, out, inp, group=None, async_op=False):
        out.copy_(torch.cat([e.reshape(-1) for e in self._exchange(inp.clone())]))

    def all_gather_object(self, objs, obj, group=None):
        objs[:] = self._exchange(obj)

    def run(self, fn) -> list:
        """fn(rank) on every rank at once; its results in rank order (a rank's exception is raised)."""
        results, errors = [None] * self.n, []

        def body(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


@pytest.fixture
def world(monkeypatch):
    w = ThreadWorld(2)
    for name in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_gather_object"):
        monkeypatch.setattr(dist, name, getattr(w, name))
    return w


def _model():
    torch.manual_seed(0)
    cfg = RunConfig().model.model_copy(update={"width": 8, "head_width": 8, "dtype": "float64"})
    return build_model(cfg, ("seg", "depth", "normal"), 13)


@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_gradient_signals_reduce_to_the_sum_over_ranks(world, mode):
    layout = ParamLayout(list(_model().parameters()), world.n)
    k = 3
    bufs = [
        torch.randn(world.n, k, layout.shard, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
        for r in range(world.n)
    ]
    total = torch.stack(bufs).sum(0)

    def rank_fn(r):
        mine = reduce_signals(bufs[r].clone(), mode, r, world.n)
        full = gather_blocks(mine if mode == "replicated" else mine[None], mode, world.n)
        update = gather_update(mine[:, 0].sum(0) if mode == "replicated" else mine[0], mode, world.n)
        small = allreduce_small(torch.tensor([float(r + 1)], dtype=torch.float64), mode, world.n)
        return mine, full, update, small

    for r, (mine, full, update, small) in enumerate(world.run(rank_fn)):
        assert torch.allclose(mine, total if mode == "replicated" else total[r], atol=1e-12)
        assert torch.allclose(full, total, atol=1e-12)  # the sharded slices gathered back in rank order
        want = total[:, 0].sum(0) if mode == "replicated" else total[:, 0]
        assert torch.allclose(update.reshape(want.shape), want, atol=1e-12)
        assert small.item() == (3.0 if mode == "sharded" else r + 1.0)  # sharded partial sums are completed


def test_logged_values_counts_and_ledgers_are_summed_over_ranks(world):
    masks = [torch.tensor([[True, False, True], [True, True, True]]), torch.tensor([[False, False, True]])]
    keys = [["a", "b"], ["c"]]

    def rank_fn(r):
        batch = {"mask": masks[r], "valid": torch.ones(len(keys[r]), dtype=torch.bool), "key": keys[r]}
        ledger = Ledger()
        ledger.record(batch, ("seg", "depth", "normal"), role="retain")
        logged = reduce_for_logging({"loss": torch.tensor(r + 0.5), "forget": torch.tensor(2.0 * r)}, world.n)
        return global_counts(batch, world.n).tolist(), logged, ledger.gather(world.n)

    for counts, logged, ledger in world.run(rank_fn):
        assert counts == [2.0, 1.0, 3.0]
        assert logged == {"loss": 2.0, "forget": 2.0}
        assert ledger == dict(
            Counter(
                {
                    "retain|a|seg": 1,
                    "retain|a|normal": 1,
                    "retain|b|seg": 1,
                    "retain|b|depth": 1,
                    "retain|b|normal": 1,
                    "retain|c|normal": 1,
                }
            )
        )


def test_evaluation_over_two_ranks_equals_one_rank(world, tiny_root):
    """run_split: meters reduced with ONE all-reduce, per-instance losses gathered; the same as one rank."""
    m = load_manifest(tiny_root / "synth-indoor")
    ids = m.split("train").keys[:11]  # odd: one rank gets a padding sample
    samples = load_instances(m, "train", ids, lambda k: np.ones(3, dtype=bool))
    model, blank = _model().eval(), blank_sample(m)
    model.float()
    one, one_losses = run_split(model, instance_batches(samples, 0, 1, 4, blank), m.tasks, m.num_classes, 1)
    results = world.run(
        lambda r: run_split(model, instance_batches(samples, r, world.n, 2, blank), m.tasks, m.num_classes, world.n)
    )
    for metrics, losses in results:
        assert metrics.keys() == one.keys() == set(m.tasks)
        for t in m.tasks:
            assert metrics[t] == pytest.approx(one[t], rel=1e-5, abs=1e-6), t
        assert [x[:2] for x in sorted(losses)] == [x[:2] for x in sorted(one_losses)]  # every pair, once
        assert [x[2] for x in sorted(losses)] == pytest.approx([x[2] for x in sorted(one_losses)], rel=1e-5)
        assert len(losses) == len(ids) * len(m.tasks)

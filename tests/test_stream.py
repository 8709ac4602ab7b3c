"""Streaming loader: exactly-once epochs across ranks and workers, masks, padding, determinism."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import accelerate_launch, read_json, run_mtu

from mtu_dist.compliance.request import load_request
from mtu_dist.data.manifest import load_manifest
from mtu_dist.data.stream import (
    BatchLoader,
    blank_sample,
    forget_batches,
    forget_mask,
    kept_mask,
    kept_view,
    load_instances,
    retain_mask,
    with_kept,
)
from mtu_dist.runner.unlearn import kept_tasks


@pytest.fixture(scope="module")
def indoor(tiny_root):
    return load_manifest(tiny_root / "synth-indoor")


def _keys_per_step(m, world, workers, local_batch, epoch=0):
    """Global batches (as key lists, padding included as '') for a topology, ranks side by side."""
    loaders = [
        BatchLoader(m, "train", rank=r, world=world, local_batch=local_batch, workers=workers, seed=5)
        for r in range(world)
    ]
    per_rank = [[b["key"] for b in ld.epoch(epoch)] for ld in loaders]
    assert len({len(p) for p in per_rank}) == 1, "ranks must run the same number of steps"
    return [sum((p[s] for p in per_rank), []) for s in range(len(per_rank[0]))]


def test_topologies_read_the_same_global_batches(indoor):
    # 1 rank x 2 workers (global batch 8) == 2 ranks x 1 worker (4 each): same reader slots.
    one = _keys_per_step(indoor, world=1, workers=2, local_batch=8)
    two = _keys_per_step(indoor, world=2, workers=1, local_batch=4)
    assert one == two
    flat = [k for step in one for k in step if k]
    assert sorted(flat) == sorted(indoor.split("train").keys)  # exactly once
    # 5 shards of 8 over 2 slots -> 24 and 16 samples -> 6 chunks of 4 each: 8 padding samples
    assert len(one) == 6 and sum(k == "" for step in one for k in step) == 8


def test_epochs_shuffle_deterministically(indoor):
    a0 = _keys_per_step(indoor, 2, 1, 4, epoch=0)
    assert a0 == _keys_per_step(indoor, 2, 1, 4, epoch=0)
    a1 = _keys_per_step(indoor, 2, 1, 4, epoch=1)
    assert a0 != a1 and sorted(sum(a0, [])) == sorted(sum(a1, []))


# which tasks each forgotten instance loses: the first, the middle and the last task, two at once, all of them
MASKS = {
    "seg": ("seg",),
    "depth": ("depth",),
    "normal": ("normal",),
    "seg+normal": ("seg", "normal"),
    "full": ("seg", "depth", "normal"),
}
BLANK = {"seg": lambda x: (x == 255).all(), "depth": lambda x: (x == 0).all(), "normal": lambda x: (x == 0).all()}


@pytest.mark.parametrize("forgotten", sorted(MASKS))
def test_retain_mask_blanks_forget_labels(indoor, forgotten):
    tasks = MASKS[forgotten]
    entries = {k: tasks for k in indoor.split("train").keys[::4]}
    # a mixed request: every other forgotten instance loses only the middle task
    entries |= {k: ("depth",) for k in indoor.split("train").keys[2::8]}
    ld = BatchLoader(
        indoor, "train", rank=0, world=1, local_batch=8, shuffle=False, mask_fn=retain_mask(indoor, entries)
    )
    checked = 0
    for batch in ld.epoch(0):
        for b, key in enumerate(batch["key"]):
            if not key:
                continue
            lost = entries.get(key, ())
            assert batch["mask"][b].tolist() == [t not in lost for t in indoor.tasks]
            for t in indoor.tasks:  # a forgotten label is blanked, a kept one is not
                assert BLANK[t](batch[t][b]) == (t in lost), (key, t)
            checked += key in entries
    assert checked == len(entries) == 15


def test_forget_batches_carry_the_kept_supervision_of_the_same_instances(indoor):
    # a mixed partial request: some instances lose seg and normal, others only depth, one every task
    keys = indoor.split("train").keys
    entries = {k: ("seg", "normal") for k in keys[:6]} | {k: ("depth",) for k in keys[6:9]} | {keys[9]: indoor.tasks}
    assert kept_tasks(entries, indoor.tasks) == indoor.tasks  # each task is kept by some instance
    assert kept_tasks({k: indoor.tasks for k in keys[:4]}, indoor.tasks) == ()  # a full request keeps none
    ids = list(entries)
    forget = load_instances(indoor, "train", ids, forget_mask(indoor, entries))
    kept = load_instances(indoor, "train", ids, kept_mask(indoor, entries))
    samples = [with_kept(f, k, indoor.tasks) for f, k in zip(forget, kept)]
    blank = blank_sample(indoor)
    batches = forget_batches(
        samples, global_batch=4, rank=1, world=2, seed=3, blank=with_kept(blank, blank, indoor.tasks)
    )
    plain = forget_batches(forget, global_batch=4, rank=1, world=2, seed=3, blank=blank)
    seen = 0
    for _ in range(6):  # past one pass of the 10 instances (2 global batches of 4 per pass)
        batch, ref = next(batches), next(plain)
        view = kept_view(batch, indoor.tasks)
        assert batch["key"] == ref["key"] == view["key"]
        for k in ("image", "mask", *indoor.tasks):  # the forget part is what it was
            assert batch[k].equal(ref[k]), k
        for b, key in enumerate(batch["key"]):
            lost = entries[key]
            assert view["mask"][b].tolist() == [t not in lost for t in indoor.tasks]
            for t in indoor.tasks:  # a kept label is there, a forgotten one blanked
                assert BLANK[t](view[t][b]) == (t in lost), (key, t)
                assert BLANK[t](batch[t][b]) == (t not in lost), (key, t)
            seen += 1
    assert seen == 6 * 2


def test_a_pair_forgotten_by_an_earlier_request_is_never_kept(indoor):
    """A lineage step: this request forgets seg of some instances whose depth an earlier one forgot. Their
    kept supervision is normal alone (depth must not come back as a retain pair)."""
    keys = indoor.split("train").keys
    now = {k: ("seg",) for k in keys[:4]}
    forgotten = {k: ("seg", "depth") for k in keys[:2]} | {k: ("seg",) for k in keys[2:4]}  # the lineage so far
    assert indoor.tasks == ("seg", "depth", "normal")
    mask = kept_mask(indoor, now, forgotten)
    assert [mask(k).tolist() for k in keys[:4]] == [[False, False, True]] * 2 + [[False, True, True]] * 2
    assert kept_mask(indoor, now)(keys[0]).tolist() == [False, True, True]  # without the lineage: both kept


@pytest.mark.slow
def test_two_process_launch_sees_each_pair_once(indoor, tmp_path):
    req_path = tmp_path / "r.yaml"
    run_mtu(
        "forget",
        "make",
        "--dataset",
        indoor.root,
        "--fraction",
        0.2,
        "--setting",
        "partial",
        "--tasks",
        "seg",
        "normal",
        "--out",
        req_path,
        check=True,
    )
    req = load_request(req_path, indoor)
    accelerate_launch(
        [__file__.replace("test_stream.py", "scripts/stream_epoch.py"), indoor.root, req_path, tmp_path, 2, 4], nproc=2
    )
    ranks = [read_json(tmp_path / f"rank{r}.json") for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and {r["rank"] for r in ranks} == {0, 1}
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    seen = Counter((k, t) for r in ranks for k, t, _ in r["seen"])
    every_pair = {(k, t) for k in indoor.split("train").keys for t in indoor.tasks}
    assert set(seen) == every_pair and set(seen.values()) == {1}  # exactly once per epoch
    forget = req.pairs()
    for r in ranks:
        for k, t, supervised in r["seen"]:
            assert supervised == ((k, t) not in forget)  # forget pairs never supervise the retain stream
        assert r["blank_leaks"] == 0
        assert r["forget_seen"] and {tuple(p) for p in r["forget_seen"]} <= forget  # forget stream: forget pairs only
    # the two ranks split each global forget batch between them
    assert not {tuple(p) for p in ranks[0]["forget_seen"][:2]} & {tuple(p) for p in ranks[1]["forget_seen"][:2]}

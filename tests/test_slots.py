"""Reader slots (ranks x loader workers) against shards: no slot reads mostly padding, every pair once
per epoch, throughput of valid samples only, the default shard layout, and launches that did not start
the processes they were asked for."""

from __future__ import annotations

import math
import os
import subprocess
from collections import Counter

import pytest
from conftest import BIN, ROOT, accelerate_launch, read_json

from mtu_dist.data.manifest import Manifest, ShardInfo, SplitInfo, load_manifest
from mtu_dist.data.stream import BatchLoader, plan_epoch
from mtu_dist.data.write import shard_bounds


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """tiny synth-indoor whose train split is ONE shard of 40 samples."""
    from mtu_dist.data.synth_cmd import synth

    root = tmp_path_factory.mktemp("one_shard")
    synth(
        ["synth-indoor"],
        root,
        train=40,
        val=16,
        test=0,
        height=16,
        width=24,
        seed=0,
        shard_size=64,
        workers=1,
        overwrite=False,
        progress=lambda *_: None,
    )
    return root


def _manifest(sizes: list[int]) -> Manifest:
    keys = [f"d/train/{i}" for i in range(sum(sizes))]
    shards = [ShardInfo(file=f"train-{i:06d}.tar", num_samples=n, sha256="0" * 64) for i, n in enumerate(sizes)]
    return Manifest(
        dataset="d",
        tasks=("seg",),
        num_classes=2,
        class_names=[],
        resolution=(8, 8),
        splits={"train": SplitInfo(keys=keys, shards=shards)},
        source={},
    )


def _epoch_keys(m, world, workers, local_batch):
    loaders = [
        BatchLoader(m, "train", rank=r, world=world, local_batch=local_batch, workers=workers, seed=1)
        for r in range(world)
    ]
    return [[b["key"] for b in ld.epoch(0)] for ld in loaders]


@pytest.mark.parametrize("world, workers", [(2, 1), (2, 2), (4, 1)])
def test_one_shard_keeps_every_slot_busy(one_shard, world, workers):
    m = load_manifest(one_shard / "synth-indoor")
    assert len(m.split("train").shards) == 1
    per_rank = _epoch_keys(m, world, workers, local_batch=4)
    slots = world * workers
    steps = math.ceil(math.ceil(40 / slots) / (4 // workers))
    assert [len(p) for p in per_rank] == [steps] * world  # shard-level splitting would need 40 / chunk steps
    seen = Counter(k for p in per_rank for batch in p for k in batch if k)
    assert set(seen) == set(m.split("train").keys) and set(seen.values()) == {1}  # exactly once
    for p in per_rank:  # each rank gets its share of real samples, not padding
        assert sum(bool(k) for batch in p for k in batch) in (40 // world, -(-40 // world))


def test_topologies_still_read_the_same_global_batches(one_shard):
    m = load_manifest(one_shard / "synth-indoor")
    one = _epoch_keys(m, 1, 2, 8)[0]
    two = _epoch_keys(m, 2, 1, 4)
    assert one == [a + b for a, b in zip(*two)]


@pytest.mark.parametrize(
    "sizes, slots, by_sample",
    [
        ([40], 2, True),  # more slots than shards
        ([100, 4], 2, True),  # so uneven that one slot would read mostly padding
        ([8, 8, 8, 8, 8], 4, False),  # one slot reads two shards, the others half padding: kept shard-level
        ([64, 64, 64], 2, False),
    ],
)
def test_split_by_sample_only_where_a_slot_would_read_mostly_padding(sizes, slots, by_sample):
    plan = plan_epoch(_manifest(sizes), "train", world=slots, workers=1, local_batch=4, seed=0, epoch=0, shuffle=False)
    assert plan.by_sample is by_sample
    if by_sample:
        assert plan.chunks_per_epoch == math.ceil(math.ceil(sum(sizes) / slots) / 4)


@pytest.mark.parametrize("n", [16, 40, 64, 192, 200, 3072, 100_000])
def test_default_shard_layout_fits_up_to_8_ranks_x_2_workers(n):
    bounds = shard_bounds(n, None)
    sizes = [b - a for a, b in bounds]
    assert bounds[0][0] == 0 and bounds[-1][1] == n and all(a == pb for (a, _), (_, pb) in zip(bounds[1:], bounds))
    assert len(sizes) % 16 == 0 and max(sizes) - min(sizes) <= 1 and max(sizes) <= 1000
    m = _manifest(sizes)
    for slots in (1, 2, 4, 8, 16):  # every slot its own shards, equally full: no sample-level reading
        plan = plan_epoch(m, "train", world=slots, workers=1, local_batch=1, seed=0, epoch=0, shuffle=True)
        assert not plan.by_sample and plan.chunks_per_epoch <= -(-n // slots) + len(sizes) // slots
    assert shard_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]  # an explicit --shard-size is kept


@pytest.mark.slow
def test_two_ranks_two_workers_on_one_shard_train_busy_and_count_valid_samples(one_shard, tmp_path):
    # 2 ranks x 2 workers = 4 slots over 1 shard of 40; global batch 12 -> chunks of 3 -> 4 steps of which
    # 8 slot-samples are padding. Shard-level splitting would run 14 steps, 3 ranks' worth of them blank.
    accelerate_launch(
        [
            "-m",
            "mtu_dist.cli",
            "train",
            "--config",
            ROOT / "configs" / "tiny.yaml",
            "--set",
            f"data.root={one_shard}",
            "--set",
            "data.workers=2",
            "--set",
            "train.epochs=1",
            "--set",
            "train.global_batch=12",
            "--set",
            f"out={tmp_path / 'runs'}",
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--name",
            "busy",
        ],
        nproc=2,
        cwd=tmp_path,
    )
    final = tmp_path / "runs" / "synth-indoor" / "busy" / "final"
    assert read_json(final / "state.json")["step"] == 4
    ledger = read_json(final / "ledger.json")
    retain = ledger["roles"]["retain"]
    assert retain["uses"] == retain["pairs"] == 40 * 3  # every (instance, task) pair once
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("synth-indoor").experiment_id])[0]
    metrics = run.data.metrics
    assert metrics["throughput/samples_per_s"] * metrics["time/train_s"] == pytest.approx(40)  # not 48


@pytest.mark.slow
def test_cpu_launch_of_two_processes_fails_before_any_work(one_shard, tmp_path):
    # accelerate starts ONE process here and would exit 0 after it; mtu must refuse before writing anything
    proc = subprocess.run(
        [
            str(BIN / "accelerate"),
            "launch",
            "--cpu",
            "--num_processes",
            "2",
            "--quiet",
            "-m",
            "mtu_dist.cli",
            "train",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--set",
            f"data.root={one_shard}",
            "--set",
            f"out={tmp_path / 'runs'}",
            "--set",
            "tracking.enabled=false",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0
    assert "started ONE" in proc.stderr and "launch/accelerate/cpu_2proc.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "script, env",
    [
        ("torchrun.sh", {}),
        ("slurm.sbatch", {"SLURM_NNODES": "1"}),
        ("slurm.sbatch", {"SLURM_NNODES": "1", "ACCELERATE": "nope"}),
    ],
)
def test_launchers_name_the_missing_tool(tmp_path, script, env):
    shims = tmp_path / "bin"  # srun and scontrol present, so the third case reaches the accelerate check
    shims.mkdir()
    if env.get("ACCELERATE"):
        for tool in ("srun", "scontrol"):
            (shims / tool).write_text("#!/bin/sh\nexit 0\n")
            (shims / tool).chmod(0o755)
    proc = subprocess.run(
        ["/bin/bash", str(ROOT / "launch" / script), "2", "train"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": f"{shims}:/usr/bin:/bin", **env},
    )
    missing = {"torchrun.sh": "torchrun"}.get(script, env.get("ACCELERATE", "srun"))
    assert proc.returncode == 127 and f"'{missing}' not found on PATH" in proc.stderr

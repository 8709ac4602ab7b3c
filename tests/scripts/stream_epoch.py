"""Run under `accelerate launch`: read one epoch of the retain stream and a few forget batches on
every rank and dump what each rank saw, for tests/test_stream.py to check."""

import json
import sys

from mtu_dist.compliance.request import load_request
from mtu_dist.data.manifest import load_manifest
from mtu_dist.data.stream import BatchLoader, blank_sample, forget_batches, load_instances, retain_mask
from mtu_dist.distributed.runtime import make_accelerator

dataset, request, out, workers, local_batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
acc = make_accelerator()
m = load_manifest(dataset)
req = load_request(request, m)
rank, world = acc.process_index, acc.num_processes
loader = BatchLoader(
    m,
    "train",
    rank=rank,
    world=world,
    local_batch=local_batch,
    workers=workers,
    seed=7,
    mask_fn=retain_mask(m, req.entries),
)
seen, steps, blank_leaks = [], 0, 0
for batch in loader.epoch(0):
    steps += 1
    assert batch["image"].shape[0] == local_batch
    for b, key in enumerate(batch["key"]):
        if not batch["valid"][b]:
            assert not batch["mask"][b].any()
            continue
        for j, t in enumerate(m.tasks):
            seen.append([key, t, bool(batch["mask"][b, j])])
            if not batch["mask"][b, j]:  # masked label must be blanked too
                lab = batch[t][b]
                blank_leaks += int((lab != 255).any()) if t == "seg" else int((lab != 0).any())
forget_samples = load_instances(
    m, "train", list(req.entries), lambda k: __import__("numpy").array([t in req.entries[k] for t in m.tasks])
)
fb = forget_batches(forget_samples, global_batch=4, rank=rank, world=world, seed=0, blank=blank_sample(m))
forget_seen = []
for _ in range(3):
    batch = next(fb)
    for b, key in enumerate(batch["key"]):
        if batch["valid"][b]:
            forget_seen += [[key, t] for j, t in enumerate(m.tasks) if batch["mask"][b, j]]
json.dump(
    {
        "rank": rank,
        "world": world,
        "steps": steps,
        "seen": seen,
        "blank_leaks": blank_leaks,
        "forget_seen": forget_seen,
    },
    open(f"{out}/rank{rank}.json", "w"),
)

"""`mtu demo`: the main job on the embedded default data.

For now: generate the synthetic benchmarks (unless present), verify them and print a summary.
"""
from __future__ import annotations

from pathlib import Path

from .data.manifest import load_manifest
from .data.verify import summarize, verify_dataset
from .errors import UserError

DATASETS = ["synth-indoor", "synth-street"]


def ensure_synthetic(root: str, overwrite: bool = False):
    from .data.synth_cmd import synth
    import os
    missing = [d for d in DATASETS if overwrite or not (Path(root) / d / "manifest.json").is_file()]
    if missing:
        synth(missing, root, train=384, val=128, test=0, height=48, width=64, seed=0, shard_size=64,
              workers=os.cpu_count() or 1, overwrite=True)
    return [load_manifest(Path(root) / d) for d in DATASETS]


def run_demo(args) -> None:
    for m in ensure_synthetic(args.root, args.overwrite):
        problems = verify_dataset(m)
        print(summarize(m))
        if problems:
            raise UserError(f"{m.root}: {len(problems)} problem(s), first: {problems[0]}")
        print("  verified OK")

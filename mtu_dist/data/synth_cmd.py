"""`mtu data synth`: write the embedded synthetic benchmarks (see `synth.py` for the scenes)."""

from __future__ import annotations

import functools

from mtu_dist.data.synth import SPECS, render_sample
from mtu_dist.data.write import DatasetLayout, write_dataset
from mtu_dist.errors import UserError


def _synth_sample(dataset: str, seed: int, height: int, width: int, split: str, index: int) -> dict:
    s = render_sample(dataset, seed, split, index, height, width)
    s["meta"] = {"intrinsics": [float(v) for v in s.pop("intrinsics")]}
    s.pop("ids", None)
    return s


def synth(
    datasets: list[str],
    out_root,
    *,
    train: int,
    val: int,
    test: int,
    height: int,
    width: int,
    seed: int,
    shard_size: int | None,
    workers: int,
    overwrite: bool,
    progress=print,
):
    unknown = [d for d in datasets if d not in SPECS]
    if unknown:
        raise UserError(f"unknown synthetic dataset(s) {unknown} (expected {sorted(SPECS)})")
    if height < 8 or width < 8:
        raise UserError(f"--height/--width must be at least 8 (got {height}x{width})")
    if train < 1:
        raise UserError(f"--train must be >= 1 (got {train})")
    manifests = []
    for name in datasets:
        spec = SPECS[name]
        layout = DatasetLayout(name, spec.tasks, spec.num_classes, list(spec.class_names), (height, width))
        fn = functools.partial(_synth_sample, name, seed, height, width)
        manifests.append(
            write_dataset(
                out_root,
                layout,
                {"train": train, "val": val, "test": test},
                fn,
                shard_size=shard_size,
                workers=workers,
                overwrite=overwrite,
                progress=progress,
                source={"generator": "mtu_dist.data.synth", "seed": seed},
            )
        )
    return manifests


def synth_once(root, dataset: str, spec: dict):
    """The synthetic `dataset` under `root` as `spec` (train, val, height, width, shard_size) describes it,
    written only when absent or made with another spec (kept in `<root>/<dataset>.synth.json`); its manifest.
    For benchmarks that rerun: the data, and every run keyed on its manifest, stay put."""
    import json
    from pathlib import Path

    from mtu_dist.data.manifest import load_manifest
    from mtu_dist.utils.fileio import atomic_write_json

    root = Path(root)
    spec_file = root / f"{dataset}.synth.json"
    if not (
        (root / dataset / "manifest.json").is_file()
        and spec_file.is_file()
        and json.loads(spec_file.read_text()) == spec
    ):
        print(f"data: synthesizing {dataset} {spec}")
        synth([dataset], root, test=0, seed=0, workers=2, overwrite=True, progress=lambda *_: None, **spec)
        atomic_write_json(spec_file, spec)
    return load_manifest(root / dataset)

"""`data_shards/<dataset>/manifest.json`: what a dataset holds, and what readers verify against.

    {"format": 1, "dataset": "synth-indoor", "tasks": ["seg", "depth", "normal"],
     "num_classes": 13, "class_names": [...], "resolution": [H, W], "source": {...},
     "splits": {"train": {"num_samples": N, "keys": ["synth-indoor/train/000000", ...],
                          "shards": [{"file": "train-000000.tar", "num_samples": n, "sha256": "..."}]}}}

Keys are `<dataset>/<split>/<index>`; the keys list is in shard order, so an instance's shard and
offset follow from the shard counts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_write_json

FORMAT = 1
KNOWN_TASKS = ("seg", "depth", "normal")


@dataclass
class ShardInfo:
    file: str
    num_samples: int
    sha256: str


@dataclass
class SplitInfo:
    keys: list[str]
    shards: list[ShardInfo]

    @property
    def num_samples(self) -> int:
        return len(self.keys)


@dataclass
class Manifest:
    dataset: str
    tasks: tuple[str, ...]
    num_classes: int
    class_names: list[str]
    resolution: tuple[int, int]
    splits: dict[str, SplitInfo]
    source: dict = field(default_factory=dict)
    root: Path | None = None  # folder holding manifest.json and the shards

    def shard_path(self, shard: ShardInfo) -> Path:
        return self.root / shard.file

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "dataset": self.dataset, "tasks": list(self.tasks),
            "num_classes": self.num_classes, "class_names": self.class_names,
            "resolution": list(self.resolution), "source": self.source,
            "splits": {name: {"num_samples": s.num_samples, "keys": s.keys,
                              "shards": [vars(sh) for sh in s.shards]}
                       for name, s in self.splits.items()},
        }

    def save(self, folder: Path) -> None:
        atomic_write_json(Path(folder) / "manifest.json", self.to_json())

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise UserError(f"{self.root}/manifest.json: no split '{name}' (has {sorted(self.splits)})")
        return self.splits[name]


def resolve_dataset_dir(path: str | Path, root: str | Path = "data_shards") -> Path:
    """Accept a dataset folder, its manifest.json, or a bare dataset name under `root`."""
    p = Path(path)
    if p.name == "manifest.json":
        p = p.parent
    if not p.exists() and (Path(root) / p).exists():
        p = Path(root) / p
    return p


def load_manifest(path: str | Path, root: str | Path = "data_shards") -> Manifest:
    folder = resolve_dataset_dir(path, root)
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise UserError(f"{mpath}: manifest not found (generate shards with `mtu data synth` "
                        "or `mtu data convert`)")
    try:
        raw = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{mpath}: not valid JSON ({e})") from None
    return _parse(raw, mpath)


def _parse(raw, mpath: Path) -> Manifest:
    def need(obj, key, typ, where):
        if not isinstance(obj, dict) or key not in obj:
            raise UserError(f"{mpath}: missing field '{where}{key}'")
        if not isinstance(obj[key], typ):
            raise UserError(f"{mpath}: field '{where}{key}' must be {typ.__name__}")
        return obj[key]

    if need(raw, "format", int, "") != FORMAT:
        raise UserError(f"{mpath}: format {raw['format']} not supported (expected {FORMAT})")
    tasks = tuple(need(raw, "tasks", list, ""))
    unknown = [t for t in tasks if t not in KNOWN_TASKS]
    if unknown or not tasks:
        raise UserError(f"{mpath}: field 'tasks' has unknown task(s) {unknown} (known: {KNOWN_TASKS})")
    splits = {}
    for name, s in need(raw, "splits", dict, "").items():
        where = f"splits.{name}."
        shards = [ShardInfo(file=need(sh, "file", str, where + "shards[]."),
                            num_samples=need(sh, "num_samples", int, where + "shards[]."),
                            sha256=need(sh, "sha256", str, where + "shards[]."))
                  for sh in need(s, "shards", list, where)]
        keys = need(s, "keys", list, where)
        if sum(sh.num_samples for sh in shards) != len(keys):
            raise UserError(f"{mpath}: split '{name}': shard counts sum to "
                            f"{sum(sh.num_samples for sh in shards)} but {len(keys)} keys are listed")
        splits[name] = SplitInfo(keys=keys, shards=shards)
    res = need(raw, "resolution", list, "")
    return Manifest(dataset=need(raw, "dataset", str, ""), tasks=tasks,
                    num_classes=need(raw, "num_classes", int, ""),
                    class_names=list(raw.get("class_names", [])),
                    resolution=(int(res[0]), int(res[1])), splits=splits,
                    source=raw.get("source", {}), root=mpath.parent)

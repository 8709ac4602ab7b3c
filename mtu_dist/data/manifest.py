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
import re
from dataclasses import dataclass, field
from pathlib import Path

from mtu_dist.errors import UserError
from mtu_dist.utils.fileio import atomic_write_json, sha256_bytes

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
    data_sha256: str | None = None  # which version of the data a model was made from (`data_identity`)

    def shard_path(self, shard: ShardInfo) -> Path:
        return self.root / shard.file

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "dataset": self.dataset,
            "tasks": list(self.tasks),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "resolution": list(self.resolution),
            "source": self.source,
            "splits": {
                name: {"num_samples": s.num_samples, "keys": s.keys, "shards": [vars(sh) for sh in s.shards]}
                for name, s in self.splits.items()
            },
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
        raise UserError(f"{mpath}: manifest not found (generate shards with `mtu data synth` or `mtu data convert`)")
    try:
        raw = json.loads(mpath.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{mpath}: not valid JSON ({e})") from None
    manifest = _parse(raw, mpath)
    manifest.data_sha256 = data_identity(raw)
    return manifest


def data_identity(raw: dict) -> str:
    """sha256 of what the data is (tasks, classes, resolution, every split's keys and shard checksums), not of
    where it came from: re-converting the same files elsewhere keeps it, editing one sample changes it."""
    fields = {k: raw[k] for k in ("dataset", "tasks", "num_classes", "resolution", "splits")}
    return sha256_bytes(json.dumps(fields, sort_keys=True).encode())


def _parse(raw, mpath: Path) -> Manifest:
    def need(obj, key, typ, where):
        if not isinstance(obj, dict) or key not in obj:
            raise UserError(f"{mpath}: missing field '{where}{key}'")
        if not isinstance(obj[key], typ) or (typ is int and isinstance(obj[key], bool)):  # true is no count
            raise UserError(f"{mpath}: field '{where}{key}' must be {typ.__name__}")
        return obj[key]

    if not isinstance(raw, dict):
        raise UserError(f"{mpath}: expected a JSON object with fields format, dataset, tasks, splits")
    if need(raw, "format", int, "") != FORMAT:
        raise UserError(f"{mpath}: format {raw['format']} not supported (expected {FORMAT})")
    tasks = tuple(need(raw, "tasks", list, ""))
    unknown = [t for t in tasks if t not in KNOWN_TASKS]
    if unknown or not tasks:
        raise UserError(f"{mpath}: field 'tasks' has unknown task(s) {unknown} (known: {KNOWN_TASKS})")
    dataset = need(raw, "dataset", str, "")
    if len(set(tasks)) != len(tasks):
        raise UserError(f"{mpath}: field 'tasks' lists a task twice ({list(tasks)})")
    num_classes = need(raw, "num_classes", int, "")
    if not 1 <= num_classes < 255:  # 255 is the ignore label
        raise UserError(f"{mpath}: field 'num_classes' must be in [1, 254] (got {num_classes})")
    class_names = raw.get("class_names", [])
    if not isinstance(class_names, list) or (class_names and len(class_names) != num_classes):
        raise UserError(f"{mpath}: field 'class_names' must list num_classes ({num_classes}) names")
    res = need(raw, "resolution", list, "")
    if len(res) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in res):
        raise UserError(f"{mpath}: field 'resolution' must be [height, width], two positive integers (got {res})")
    splits = {name: _parse_split(need, mpath, dataset, name, s) for name, s in need(raw, "splits", dict, "").items()}
    _check_disjoint(mpath, splits)
    return Manifest(
        dataset=dataset,
        tasks=tasks,
        num_classes=num_classes,
        class_names=list(class_names),
        resolution=(res[0], res[1]),
        splits=splits,
        source=raw.get("source", {}),
        root=mpath.parent,
    )


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _parse_split(need, mpath: Path, dataset: str, name: str, s) -> SplitInfo:
    """One split, every field checked against the others: a shard or key listed twice would be read twice
    (and a renamed copy of an instance could pass for another), so each must appear once."""
    where = f"splits.{name}."
    shards = [
        ShardInfo(
            file=need(sh, "file", str, where + "shards[]."),
            num_samples=need(sh, "num_samples", int, where + "shards[]."),
            sha256=need(sh, "sha256", str, where + "shards[]."),
        )
        for sh in need(s, "shards", list, where)
    ]
    for sh in shards:
        if "/" in sh.file or "\\" in sh.file or sh.file in ("", ".", ".."):
            raise UserError(
                f"{mpath}: split '{name}': shard file {sh.file!r} must be a file name in the dataset folder"
            )
        if sh.num_samples < 0 or not _SHA256.fullmatch(sh.sha256):
            raise UserError(
                f"{mpath}: split '{name}': shard {sh.file}: num_samples must be >= 0 and sha256 64 lowercase hex digits"
            )
    keys = need(s, "keys", list, where)
    if sum(sh.num_samples for sh in shards) != len(keys):
        raise UserError(
            f"{mpath}: split '{name}': shard counts sum to "
            f"{sum(sh.num_samples for sh in shards)} but {len(keys)} keys are listed"
        )
    if "num_samples" in s and s["num_samples"] != len(keys):
        raise UserError(f"{mpath}: split '{name}': num_samples is {s['num_samples']!r} but {len(keys)} keys are listed")
    prefix = f"{dataset}/{name}/"
    for k in keys:  # WebDataset ends a key at the first dot of its last path component
        if not isinstance(k, str) or not k.startswith(prefix) or "." in k.rpartition("/")[2] or k == prefix:
            raise UserError(f"{mpath}: split '{name}': key {k!r} is not of the form {prefix}<index> (no dots)")
    _no_repeats(mpath, name, "shard file", [sh.file for sh in shards])
    _no_repeats(mpath, name, "key", keys)
    return SplitInfo(keys=keys, shards=shards)


def _no_repeats(mpath: Path, split: str, what: str, items: list[str]) -> None:
    seen = set()
    for item in items:
        if item in seen:
            raise UserError(f"{mpath}: split '{split}': {what} {item} is listed twice")
        seen.add(item)


def _check_disjoint(mpath: Path, splits: dict[str, SplitInfo]) -> None:
    """A shard shared by two splits would put the same instances in both (e.g. train and val)."""
    owner: dict[str, str] = {}
    for name, split in splits.items():
        for sh in split.shards:
            if sh.file in owner:
                raise UserError(f"{mpath}: shard file {sh.file} is listed in split '{owner[sh.file]}' and in '{name}'")
            owner[sh.file] = name


def shard_keys(split: SplitInfo) -> list[list[str]]:
    """The ordered keys each shard must hold, shard by shard (the keys list is in shard order)."""
    out, offset = [], 0
    for sh in split.shards:
        out.append(split.keys[offset : offset + sh.num_samples])
        offset += sh.num_samples
    return out

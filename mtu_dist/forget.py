"""Forget requests: which (instance, task) supervision pairs must be removed (DESIGN sections 1-2).

File format (YAML or JSON)::

    setting: partial            # full | partial
    dataset: synth-indoor
    split: train                # optional, default train
    generated: {fraction: 0.05, seed: 0, tasks: [seg]}   # optional provenance from `mtu forget make`
    entries:
      - {id: synth-indoor/train/000012, tasks: [seg]}

In the full setting `tasks` may be omitted (= every task of the dataset); a strict subset is an
error. Unknown ids, unknown tasks, duplicates and empty requests are errors naming the entry. The
request's identity is the sha256 of the file's bytes, logged with every run that uses it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .data.manifest import Manifest
from .errors import UserError
from .fileio import atomic_write_text, sha256_bytes

SETTINGS = ("full", "partial")


@dataclass(frozen=True)
class ForgetRequest:
    setting: str
    dataset: str
    split: str
    entries: dict[str, tuple[str, ...]]  # instance id -> target tasks, in manifest order
    sha256: str
    path: Path | None = None

    def pairs(self) -> set[tuple[str, str]]:
        return {(i, t) for i, ts in self.entries.items() for t in ts}

    def target_tasks(self) -> tuple[str, ...]:
        """Every task that is a target for at least one instance (stable order)."""
        seen = {t for ts in self.entries.values() for t in ts}
        return tuple(t for t in ("seg", "depth", "normal") if t in seen)


def load_request(path: str | Path, manifest: Manifest) -> ForgetRequest:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read forget request ({e.strerror or e})") from None
    try:
        raw = yaml.safe_load(data)  # YAML is a superset of JSON; safe_load never builds objects
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML/JSON ({e})") from None
    return parse_request(raw, manifest, sha256_bytes(data), path)


def parse_request(raw, manifest: Manifest, sha256: str, path: Path | None = None) -> ForgetRequest:
    where = str(path) if path else "forget request"

    def fail(msg):
        raise UserError(f"{where}: {msg}")

    if not isinstance(raw, dict):
        fail("expected a mapping with keys setting, dataset, entries")
    unknown_keys = set(raw) - {"setting", "dataset", "split", "entries", "generated"}
    if unknown_keys:
        fail(f"unknown field(s) {sorted(unknown_keys)} (expected setting, dataset, split, entries, generated)")
    setting = raw.get("setting")
    if setting not in SETTINGS:
        fail(f"field 'setting' must be one of {SETTINGS} (got {setting!r})")
    if raw.get("dataset") != manifest.dataset:
        fail(f"request is for dataset {raw.get('dataset')!r}, but the data is {manifest.dataset!r}")
    split = raw.get("split", "train")
    known_ids = set(manifest.split(split).keys)
    entries_raw = raw.get("entries")
    if not isinstance(entries_raw, list) or not entries_raw:
        fail("field 'entries' is empty or missing: a forget request must name at least one instance")
    entries: dict[str, tuple[str, ...]] = {}
    for n, e in enumerate(entries_raw):
        entries_id, tasks = _parse_entry(e, n, setting, manifest, known_ids, fail)
        if entries_id in entries:
            fail(f"entries[{n}] (id {entries_id!r}): duplicate entry")
        entries[entries_id] = tasks
    order = {k: i for i, k in enumerate(manifest.split(split).keys)}
    entries = dict(sorted(entries.items(), key=lambda kv: order[kv[0]]))
    return ForgetRequest(setting, manifest.dataset, split, entries, sha256, path)


def _parse_entry(e, n, setting, manifest: Manifest, known_ids, fail):
    if isinstance(e, str):
        e = {"id": e}
    if not isinstance(e, dict) or "id" not in e:
        fail(f"entries[{n}]: expected {{id: ..., tasks: [...]}}")
    extra = set(e) - {"id", "tasks"}
    if extra:
        fail(f"entries[{n}] (id {e['id']!r}): unknown field(s) {sorted(extra)}")
    iid = e["id"]
    if iid not in known_ids:
        fail(f"entries[{n}] (id {iid!r}): unknown id (not in {manifest.dataset})")
    tasks = e.get("tasks", list(manifest.tasks) if setting == "full" else None)
    if not isinstance(tasks, list) or not tasks:
        fail(f"entries[{n}] (id {iid!r}): field 'tasks' must be a non-empty list")
    bad = [t for t in tasks if t not in manifest.tasks]
    if bad:
        fail(f"entries[{n}] (id {iid!r}): unknown task(s) {bad} (dataset has {list(manifest.tasks)})")
    if len(set(tasks)) != len(tasks):
        fail(f"entries[{n}] (id {iid!r}): a task is listed twice")
    if setting == "full" and set(tasks) != set(manifest.tasks):
        fail(f"entries[{n}] (id {iid!r}): setting 'full' removes every task, but tasks={tasks}; "
             "use setting 'partial' for a task subset")
    if setting == "partial" and set(tasks) == set(manifest.tasks):
        fail(f"entries[{n}] (id {iid!r}): setting 'partial' needs a strict task subset "
             f"(got all of {list(manifest.tasks)}); use setting 'full'")
    return iid, tuple(t for t in manifest.tasks if t in tasks)


def make_request(manifest: Manifest, *, fraction: float, setting: str, tasks: list[str] | None,
                 seed: int, split: str = "train", exclude: ForgetRequest | None = None) -> dict:
    """Draw `fraction` of the split's instances (never those in `exclude`, e.g. to build a dev request
    disjoint from the evaluation request)."""
    if setting not in SETTINGS:
        raise UserError(f"--setting must be one of {SETTINGS} (got {setting!r})")
    if not 0 < fraction < 1:
        raise UserError(f"--fraction must be in (0, 1) (got {fraction})")
    if setting == "full":
        if tasks and set(tasks) != set(manifest.tasks):
            raise UserError(f"--tasks {tasks}: setting 'full' removes every task; use --setting partial")
        tasks = list(manifest.tasks)
    elif not tasks:
        raise UserError("--tasks is required for --setting partial (e.g. --tasks seg)")
    bad = [t for t in tasks if t not in manifest.tasks]
    if bad:
        raise UserError(f"--tasks: unknown task(s) {bad} (dataset {manifest.dataset} has {list(manifest.tasks)})")
    if setting == "partial" and set(tasks) == set(manifest.tasks):
        raise UserError(f"--tasks {tasks}: a partial request needs a strict subset; use --setting full")
    keys = manifest.split(split).keys
    pool = [k for k in keys if exclude is None or k not in exclude.entries]
    n = max(1, round(fraction * len(keys)))
    if n > len(pool):
        raise UserError(f"--fraction {fraction}: needs {n} instances but only {len(pool)} are available")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(pool), size=n, replace=False).tolist())
    ordered_tasks = [t for t in manifest.tasks if t in tasks]
    return {"setting": setting, "dataset": manifest.dataset, "split": split,
            "generated": {"fraction": fraction, "seed": seed, "tasks": ordered_tasks},
            "entries": [{"id": pool[i], "tasks": ordered_tasks} for i in chosen]}


def write_request(raw: dict, path: str | Path, overwrite: bool = False) -> None:
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists; pass --overwrite to replace it")
    text = json.dumps(raw, indent=1) + "\n" if path.suffix == ".json" else yaml.safe_dump(raw, sort_keys=False)
    atomic_write_text(path, text)

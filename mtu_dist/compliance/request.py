"""Forget requests: which (instance, task) supervision pairs must be removed (docs/design.md §1-2).

File format (YAML or JSON)::

    setting: partial            # full | partial | mixed
    dataset: synth-indoor
    split: train                # optional, default train
    generated: {fraction: 0.05, seed: 0, tasks: [seg]}   # optional provenance from `mtu forget make`
    lineage_root: 3f2a...       # optional: sha256 of the original model whose lineage must honour it
    entries:
      - {id: synth-indoor/train/000012, tasks: [seg]}

In the full setting `tasks` may be omitted (= every task of the dataset); a strict subset is an
error. `mixed` holds full and partial entries side by side (every entry names its tasks): it is what
a lineage's cumulative forget set is (`mtu lineage --write-request`). Unknown ids, unknown tasks,
duplicates and empty requests are errors naming the entry. The request's identity is the sha256 of
the file's bytes, logged with every run that uses it; `pairs_sha256` identifies its set of
(instance, task) pairs whatever the file looks like (a retrain and an unlearning chain that remove
the same pairs are comparable).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from mtu_dist.data.manifest import Manifest
from mtu_dist.errors import UserError
from mtu_dist.utils.fileio import atomic_write_text, sha256_bytes

SETTINGS = ("full", "partial")  # what `mtu forget make` draws
FILE_SETTINGS = SETTINGS + ("mixed",)


@dataclass(frozen=True)
class ForgetRequest:
    setting: str
    dataset: str
    split: str
    entries: dict[str, tuple[str, ...]]  # instance id -> target tasks, in manifest order
    sha256: str
    path: Path | None = None
    lineage_root: str | None = None
    # instances kept out of the evaluation's retain sample besides the entries (a lineage step: the
    # instances earlier requests forgot); part of `eval_key`, so cached evaluations never mix them up
    retain_exclude: tuple[str, ...] = ()

    def pairs(self) -> set[tuple[str, str]]:
        return {(i, t) for i, ts in self.entries.items() for t in ts}

    @property
    def pairs_sha256(self) -> str:
        return pairs_sha256(self.entries)

    @property
    def eval_key(self) -> str:
        """Identity of an evaluation on this request: its sha256, plus the extra retain exclusions."""
        if not self.retain_exclude:
            return self.sha256
        return sha256_bytes(f"{self.sha256}|{','.join(sorted(self.retain_exclude))}".encode())

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
    unknown_keys = set(raw) - {"setting", "dataset", "split", "entries", "generated", "lineage_root"}
    if unknown_keys:
        fail(
            f"unknown field(s) {sorted(unknown_keys)} (expected setting, dataset, split, entries, generated, "
            "lineage_root)"
        )
    setting = raw.get("setting")
    if setting not in FILE_SETTINGS:
        fail(f"field 'setting' must be one of {FILE_SETTINGS} (got {setting!r})")
    root = raw.get("lineage_root")
    if root is not None and not (
        isinstance(root, str) and len(root) == 64 and all(c in "0123456789abcdef" for c in root)
    ):
        fail(f"field 'lineage_root' must be the sha256 (64 hex digits) of the lineage's original model (got {root!r})")
    if raw.get("dataset") != manifest.dataset:
        fail(f"request is for dataset {raw.get('dataset')!r}, but the data is {manifest.dataset!r}")
    split = raw.get("split", "train")
    if split != "train":  # models are trained on `train` only: forgetting another split's instances removes nothing
        fail(f"field 'split' must be 'train', the split models are trained on (got {split!r})")
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
    return ForgetRequest(setting, manifest.dataset, split, entries, sha256, path, lineage_root=root)


def _parse_entry(e, n, setting, manifest: Manifest, known_ids, fail):
    if isinstance(e, str):
        e = {"id": e}
    if not isinstance(e, dict) or "id" not in e:
        fail(f"entries[{n}]: expected {{id: ..., tasks: [...]}}")
    extra = set(e) - {"id", "tasks"}
    if extra:
        fail(f"entries[{n}] (id {e['id']!r}): unknown field(s) {sorted(extra)}")
    iid = e["id"]
    if not isinstance(iid, str):
        fail(f"entries[{n}]: field 'id' must be an instance key string (got {iid!r})")
    if iid not in known_ids:
        fail(f"entries[{n}] (id {iid!r}): unknown id (not in {manifest.dataset})")
    tasks = e.get("tasks", list(manifest.tasks) if setting == "full" else None)
    if not isinstance(tasks, list) or not tasks:
        if setting == "mixed":
            fail(
                f"entries[{n}] (id {iid!r}): field 'tasks' must be a non-empty list (every entry of a mixed "
                "request names its tasks)"
            )
        fail(f"entries[{n}] (id {iid!r}): field 'tasks' must be a non-empty list")
    bad = [t for t in tasks if t not in manifest.tasks]
    if bad:
        fail(f"entries[{n}] (id {iid!r}): unknown task(s) {bad} (dataset has {list(manifest.tasks)})")
    if len(set(tasks)) != len(tasks):
        fail(f"entries[{n}] (id {iid!r}): a task is listed twice")
    if setting == "full" and set(tasks) != set(manifest.tasks):
        fail(
            f"entries[{n}] (id {iid!r}): setting 'full' removes every task, but tasks={tasks}; "
            "use setting 'partial' for a task subset"
        )
    if setting == "partial" and set(tasks) == set(manifest.tasks):
        fail(
            f"entries[{n}] (id {iid!r}): setting 'partial' needs a strict task subset "
            f"(got all of {list(manifest.tasks)}); use setting 'full'"
        )
    return iid, tuple(t for t in manifest.tasks if t in tasks)


def make_request(
    manifest: Manifest,
    *,
    fraction: float,
    setting: str,
    tasks: list[str] | None,
    seed: int,
    split: str = "train",
    exclude: ForgetRequest | None = None,
    exclude_ids=(),
    lineage_root: str | None = None,
) -> dict:
    """Draw `fraction` of the split's instances (never those in `exclude`, e.g. to build a dev request
    disjoint from the evaluation request, nor those in `exclude_ids`, e.g. what a lineage forgot)."""
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
    excluded = set(exclude_ids) | (set(exclude.entries) if exclude is not None else set())
    pool = [k for k in keys if k not in excluded]
    n = max(1, round(fraction * len(keys)))
    if n > len(pool):
        raise UserError(f"--fraction {fraction}: needs {n} instances but only {len(pool)} are available")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(pool), size=n, replace=False).tolist())
    ordered_tasks = [t for t in manifest.tasks if t in tasks]
    raw = {
        "setting": setting,
        "dataset": manifest.dataset,
        "split": split,
        "generated": {"fraction": fraction, "seed": seed, "tasks": ordered_tasks},
    }
    if lineage_root:
        raw["lineage_root"] = lineage_root
    return {**raw, "entries": [{"id": pool[i], "tasks": ordered_tasks} for i in chosen]}


# --------------------------------------------------------------------------
# sets of pairs: what a lineage merges
# --------------------------------------------------------------------------


def pairs_sha256(entries: dict[str, tuple[str, ...]]) -> str:
    """sha256 of the sorted `instance|task` lines: the identity of a set of pairs."""
    return sha256_bytes("\n".join(sorted(f"{i}|{t}" for i, ts in entries.items() for t in ts)).encode())


def merge_entries(manifest: Manifest, *parts: dict, split: str = "train") -> dict[str, tuple[str, ...]]:
    """The union of entry dicts, merged per instance (its tasks in manifest order; instances in split order)."""
    merged: dict[str, set] = {}
    for part in parts:
        for iid, ts in part.items():
            merged.setdefault(iid, set()).update(ts)
    order = {k: i for i, k in enumerate(manifest.split(split).keys)}
    return {iid: tuple(t for t in manifest.tasks if t in merged[iid]) for iid in sorted(merged, key=order.__getitem__)}


def subtract_entries(entries: dict, removed: dict) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """(entries without the pairs in `removed`, the removed pairs as sorted `instance|task` keys)."""
    kept, dropped = {}, []
    for iid, ts in entries.items():
        gone = set(removed.get(iid, ()))
        dropped += [f"{iid}|{t}" for t in ts if t in gone]
        rest = tuple(t for t in ts if t not in gone)
        if rest:
            kept[iid] = rest
    return kept, sorted(dropped)


def setting_of(entries: dict, tasks) -> str:
    """full (every entry removes every task), partial (every entry a strict subset) or mixed."""
    whole = {len(ts) == len(tasks) for ts in entries.values()}
    return "mixed" if len(whole) > 1 else ("full" if whole == {True} else "partial")


def request_bytes(
    entries: dict, *, dataset: str, tasks, split: str = "train", lineage_root: str | None = None
) -> tuple[dict, bytes]:
    """The canonical request file over these pairs (JSON, which YAML readers take too) and its bytes."""
    raw = {"setting": setting_of(entries, tasks), "dataset": dataset, "split": split}
    if lineage_root:
        raw["lineage_root"] = lineage_root
    raw["entries"] = [{"id": i, "tasks": list(ts)} for i, ts in entries.items()]
    return raw, (json.dumps(raw, indent=1) + "\n").encode()


def request_from_entries(
    entries: dict, manifest: Manifest, *, split: str = "train", lineage_root: str | None = None
) -> tuple[ForgetRequest, bytes]:
    """A request over these pairs and its canonical file bytes (the request's sha256 is theirs)."""
    raw, data = request_bytes(
        entries, dataset=manifest.dataset, tasks=manifest.tasks, split=split, lineage_root=lineage_root
    )
    return parse_request(raw, manifest, sha256_bytes(data)), data


def write_request(
    raw: dict, path: str | Path, overwrite: bool = False, manifest: Manifest | None = None
) -> ForgetRequest | None:
    """Write a request file; with `manifest`, the exact bytes are parsed and validated first, so a request
    that would not load is never written (and nothing is left behind)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists; pass --overwrite to replace it")
    text = json.dumps(raw, indent=1) + "\n" if path.suffix == ".json" else yaml.safe_dump(raw, sort_keys=False)
    req = parse_request(yaml.safe_load(text), manifest, sha256_bytes(text.encode()), path) if manifest else None
    atomic_write_text(path, text)
    return req

"""Forget requests: generation, round trip, and every validation error naming its entry."""

from __future__ import annotations

import pytest
import yaml
from conftest import run_mtu

from mtu_dist.compliance.request import load_request, make_request, parse_request
from mtu_dist.data.manifest import load_manifest
from mtu_dist.errors import UserError

K = "synth-indoor/train/{:06d}"


@pytest.fixture(scope="module")
def manifest(tiny_root):
    return load_manifest(tiny_root / "synth-indoor")


def _req(**kw):
    raw = {"setting": "partial", "dataset": "synth-indoor", "entries": [{"id": K.format(1), "tasks": ["seg"]}]}
    raw.update(kw)
    return raw


BAD = {
    "unknown id": (
        _req(entries=[{"id": "synth-indoor/train/999999", "tasks": ["seg"]}]),
        "entries[0] (id 'synth-indoor/train/999999'): unknown id",
    ),
    "unknown task": (_req(entries=[{"id": K.format(1), "tasks": ["edges"]}]), "unknown task(s) ['edges']"),
    "duplicate": (
        _req(entries=[{"id": K.format(1), "tasks": ["seg"]}, {"id": K.format(1), "tasks": ["depth"]}]),
        "entries[1] (id 'synth-indoor/train/000001'): duplicate entry",
    ),
    "empty": (_req(entries=[]), "'entries' is empty"),
    "full with subset": (_req(setting="full"), "setting 'full' removes every task"),
    "partial with all": (
        _req(entries=[{"id": K.format(1), "tasks": ["seg", "depth", "normal"]}]),
        "strict task subset",
    ),
    "other dataset": (_req(dataset="synth-street"), "request is for dataset 'synth-street'"),
    "bad setting": (_req(setting="some"), "field 'setting'"),
    "unknown field": (_req(forget_all=True), "unknown field(s) ['forget_all']"),
    "entry without tasks": (
        _req(entries=[{"id": K.format(2)}]),
        "entries[0] (id 'synth-indoor/train/000002'): field 'tasks'",
    ),
    "mixed entry without tasks": (
        _req(setting="mixed", entries=[{"id": K.format(2)}]),
        "entries[0] (id 'synth-indoor/train/000002'): field 'tasks' must be a non-empty list "
        "(every entry of a mixed request names its tasks)",
    ),
    "bad lineage root": (_req(lineage_root="abc"), "field 'lineage_root' must be the sha256 (64 hex digits)"),
    # a retrain on a val request would forget nothing and still finish: only training instances can be forgotten
    "val split": (
        _req(split="val", entries=[{"id": "synth-indoor/val/000001", "tasks": ["seg"]}]),
        "field 'split' must be 'train', the split models are trained on (got 'val')",
    ),
    "split as a list": (_req(split=["train"]), "field 'split' must be 'train'"),
    "id as a list": (
        _req(entries=[{"id": [K.format(1)], "tasks": ["seg"]}]),
        "entries[0]: field 'id' must be an instance key string",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_request_errors_name_the_entry(manifest, tmp_path, case):
    raw, message = BAD[case]
    with pytest.raises(UserError) as err:
        parse_request(raw, manifest, "0" * 64)
    assert message in str(err.value)
    # and through the CLI: non-zero exit, no traceback, the file named
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    p = run_mtu("forget", "check", path, "--dataset", manifest.root)
    assert p.returncode != 0 and "Traceback" not in p.stderr and str(path) in p.stderr and message in p.stderr


def test_make_round_trip_and_hash(manifest, tmp_path):
    out = tmp_path / "req.yaml"
    run_mtu(
        "forget",
        "make",
        "--dataset",
        manifest.root,
        "--fraction",
        0.1,
        "--setting",
        "partial",
        "--tasks",
        "normal",
        "seg",
        "--seed",
        3,
        "--out",
        out,
        check=True,
    )
    req = load_request(out, manifest)
    assert req.setting == "partial" and len(req.entries) == 4
    assert all(ts == ("seg", "normal") for ts in req.entries.values())  # manifest task order
    assert len(req.pairs()) == 8
    raw = yaml.safe_load(out.read_text())
    assert raw["generated"] == {"fraction": 0.1, "seed": 3, "tasks": ["seg", "normal"]}
    # deterministic per seed, different across seeds; file hash is the identity
    again = make_request(manifest, fraction=0.1, setting="partial", tasks=["seg", "normal"], seed=3)
    assert [e["id"] for e in again["entries"]] == list(req.entries)
    other = make_request(manifest, fraction=0.1, setting="partial", tasks=["seg", "normal"], seed=4)
    assert [e["id"] for e in other["entries"]] != list(req.entries)
    from mtu_dist.utils.fileio import sha256_file

    assert req.sha256 == sha256_file(out)
    # never clobber without --overwrite
    p = run_mtu("forget", "make", "--dataset", manifest.root, "--fraction", 0.2, "--setting", "full", "--out", out)
    assert p.returncode != 0 and "already exists" in p.stderr
    assert load_request(out, manifest).sha256 == req.sha256


def test_dev_request_is_disjoint(manifest, tmp_path):
    out = tmp_path / "eval.json"
    run_mtu(
        "forget", "make", "--dataset", manifest.root, "--fraction", 0.25, "--setting", "full", "--out", out, check=True
    )
    dev = tmp_path / "dev.json"
    run_mtu(
        "forget",
        "make",
        "--dataset",
        manifest.root,
        "--fraction",
        0.25,
        "--setting",
        "full",
        "--exclude",
        out,
        "--out",
        dev,
        check=True,
    )
    a, b = load_request(out, manifest), load_request(dev, manifest)
    assert a.setting == "full" and all(ts == manifest.tasks for ts in a.entries.values())
    assert len(a.entries) == len(b.entries) == 10 and not set(a.entries) & set(b.entries)


def test_make_errors(manifest):
    with pytest.raises(UserError, match="--tasks is required"):
        make_request(manifest, fraction=0.1, setting="partial", tasks=None, seed=0)
    with pytest.raises(UserError, match="fraction"):
        make_request(manifest, fraction=1.5, setting="full", tasks=None, seed=0)
    with pytest.raises(UserError, match="unknown task"):
        make_request(manifest, fraction=0.1, setting="partial", tasks=["edges"], seed=0)


def test_merge_subtract_and_mixed_round_trip(manifest):
    """A lineage's set algebra on pairs: merged per instance in manifest order, repeats split off, and the
    merged set written as a canonical `mixed` request that parses back to the same pairs."""
    from mtu_dist.compliance.request import (
        merge_entries,
        pairs_sha256,
        request_from_entries,
        setting_of,
        subtract_entries,
    )

    full = {K.format(5): ("seg", "depth", "normal"), K.format(3): ("seg", "depth", "normal")}
    partial = {K.format(3): ("seg",), K.format(9): ("normal",), K.format(1): ("depth",)}
    merged = merge_entries(manifest, full, partial)
    assert list(merged) == [K.format(1), K.format(3), K.format(5), K.format(9)]
    assert merged[K.format(3)] == ("seg", "depth", "normal") and merged[K.format(9)] == ("normal",)
    new, repeated = subtract_entries(partial, full)
    assert new == {K.format(9): ("normal",), K.format(1): ("depth",)} and repeated == [f"{K.format(3)}|seg"]
    assert setting_of(full, manifest.tasks) == "full" and setting_of(partial, manifest.tasks) == "partial"
    assert setting_of(merged, manifest.tasks) == "mixed"
    req, data = request_from_entries(merged, manifest, lineage_root="a" * 64)
    again = parse_request(yaml.safe_load(data), manifest, req.sha256)
    assert again.setting == "mixed" and again.pairs() == req.pairs() and again.lineage_root == "a" * 64
    assert len(req.pairs()) == 3 + 3 + 1 + 1
    # the pair set's identity ignores file layout; the eval key changes with extra retain exclusions
    assert pairs_sha256(dict(reversed(list(merged.items())))) == req.pairs_sha256
    from dataclasses import replace

    assert req.eval_key == req.sha256 and replace(req, retain_exclude=(K.format(20),)).eval_key != req.sha256

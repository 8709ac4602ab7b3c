"""Every input file is untrusted and cross-checked, in-process and in seconds: shard members against the
manifest's keys, manifests against themselves, checkpoints for finiteness and checksums, config types,
tracking stores, file modes, and the audit's `target` role.

The command-line side of the same cases (one clear line, non-zero exit, nothing touched) is in
tests/test_runner_errors.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_mtu

from mtu_dist.compliance.request import make_request, write_request
from mtu_dist.config import load_config
from mtu_dist.data.manifest import load_manifest
from mtu_dist.data.stream import BatchLoader, load_instances
from mtu_dist.data.tario import iter_entries
from mtu_dist.data.verify import verify_dataset
from mtu_dist.data.write import write_tar
from mtu_dist.errors import UserError
from mtu_dist.runner.checkpoint import latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from mtu_dist.utils.fileio import atomic_write_text, sha256_file

K = "synth-indoor/train/{:06d}"


# ---------------------------------------------------------------- shard keys against the manifest


def rewrite_shard(ds: Path, shard: str, edit) -> None:
    """Rewrite one shard's (key, members) list with `edit` and keep manifest.json's sha256 consistent,
    so that only the key problem is left to find."""
    entries = list(iter_entries(ds / shard))
    write_tar(ds / shard, edit(entries))
    manifest = json.loads((ds / "manifest.json").read_text())
    for sh in manifest["splits"]["train"]["shards"]:
        if sh["file"] == shard:
            sh["sha256"] = sha256_file(ds / shard)
    (ds / "manifest.json").write_text(json.dumps(manifest))


def _renamed(i, new):
    return lambda entries: [(new if n == i else k, m) for n, (k, m) in enumerate(entries)]


KEY_EDITS = {  # train-000001.tar holds keys 8..15
    "member renamed to an unlisted key": (_renamed(3, K.format(999)), K.format(999)),
    "member renamed to another shard's key": (_renamed(3, K.format(0)), K.format(0)),
    "two members swapped": (lambda e: [e[1], e[0], *e[2:]], K.format(9)),
    "one more sample than listed": (lambda e: [*e, (K.format(998), e[0][1])], K.format(998)),
}


@pytest.mark.parametrize("case", sorted(KEY_EDITS))
def test_every_reader_refuses_a_shard_whose_keys_differ_from_the_manifest(tiny_root, tmp_path, case):
    ds = tmp_path / "synth-indoor"
    shutil.copytree(tiny_root / "synth-indoor", ds)
    edit, culprit = KEY_EDITS[case]
    rewrite_shard(ds, "train-000001.tar", edit)
    m = load_manifest(ds)
    problems = verify_dataset(m, check_samples=False)
    assert any("train-000001.tar" in p and culprit in p for p in problems), problems
    for workers in (0, 2):  # in the process, and inside loader workers
        loader = BatchLoader(m, "train", rank=0, world=1, local_batch=8, workers=workers, shuffle=False)
        with pytest.raises(UserError, match=f"train-000001.tar: {culprit}"):
            for _ in loader.epoch(0):
                pass
    with pytest.raises(UserError, match="train-000001.tar"):  # forget and evaluation instances
        load_instances(m, "train", [K.format(12)], lambda k: torch.ones(3, dtype=torch.bool).numpy())


def test_a_shard_with_fewer_samples_than_listed_is_refused(tiny_root, tmp_path):
    ds = tmp_path / "synth-indoor"
    shutil.copytree(tiny_root / "synth-indoor", ds)
    rewrite_shard(ds, "train-000001.tar", lambda e: e[:-1])
    m = load_manifest(ds)
    with pytest.raises(UserError, match="train-000001.tar: holds 7 samples, manifest.json lists 8"):
        for _ in BatchLoader(m, "train", rank=0, world=1, local_batch=8, shuffle=False).epoch(0):
            pass
    with pytest.raises(UserError, match="train-000001.tar: holds 7 samples"):
        load_instances(m, "train", [K.format(8)], lambda k: torch.ones(3, dtype=torch.bool).numpy())


def test_load_instances_checks_the_shard_sha256(tiny_root, tmp_path):
    ds = tmp_path / "synth-indoor"
    shutil.copytree(tiny_root / "synth-indoor", ds)
    data = bytearray((ds / "train-000000.tar").read_bytes())
    data[700] ^= 0xFF
    (ds / "train-000000.tar").write_bytes(bytes(data))
    with pytest.raises(UserError, match="train-000000.tar: sha256 does not match"):
        load_instances(load_manifest(ds), "train", [K.format(1)], lambda k: torch.ones(3, dtype=torch.bool).numpy())


# ---------------------------------------------------------------- manifests checked against themselves


def _twice(raw):  # the same shard listed twice, keys and counts made consistent
    tr = raw["splits"]["train"]
    tr["shards"].append(dict(tr["shards"][0]))
    tr["keys"] += tr["keys"][:8]
    tr["num_samples"] = len(tr["keys"])


def _key_twice(raw):  # keys 0..7 then 0 again in place of 8: counts consistent
    raw["splits"]["train"]["keys"][8] = raw["splits"]["train"]["keys"][0]


def _shared(raw):  # one shard in train and in val
    val = raw["splits"]["val"]
    val["shards"][0] = dict(raw["splits"]["train"]["shards"][0])
    val["keys"][:8] = [k.replace("/val/", "/train/") for k in val["keys"][:8]]


def _set(path, value):
    def edit(raw):
        node = raw
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value

    return edit


BAD_MANIFESTS = {
    "shard listed twice": (_twice, "shard file train-000000.tar is listed twice"),
    "key listed twice": (_key_twice, f"key {K.format(0)} is listed twice"),
    "shard in two splits": (_shared, "is not of the form synth-indoor/val/"),
    "shard outside the folder": (
        lambda r: r["splits"]["train"]["shards"][0].update(file="../x.tar"),
        "'../x.tar' must be a file name in the dataset folder",
    ),
    "count as a boolean": (
        lambda r: r["splits"]["val"]["shards"][0].update(num_samples=True),
        "'splits.val.shards[].num_samples' must be int",
    ),
    "sha256 not hex": (lambda r: r["splits"]["train"]["shards"][0].update(sha256="abc"), "64 lowercase hex"),
    "key with a dot": (lambda r: r["splits"]["train"]["keys"].__setitem__(0, "synth-indoor/train/0.5"), "no dots"),
    "key of another dataset": (
        lambda r: r["splits"]["train"]["keys"].__setitem__(0, "synth-street/train/000000"),
        "not of the form synth-indoor/train/",
    ),
    "num_samples disagrees": (_set(("splits", "train", "num_samples"), 41), "num_samples is 41 but 40 keys"),
    "resolution as booleans": (_set(("resolution",), [True, 24]), "two positive integers"),
    "255 classes": (_set(("num_classes",), 255), "'num_classes' must be in [1, 254]"),
    "a task twice": (_set(("tasks",), ["seg", "seg"]), "lists a task twice"),
    "not an object": (lambda r: None, "expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifests_are_refused_naming_the_field(tiny_root, tmp_path, case):
    raw = json.loads((tiny_root / "synth-indoor" / "manifest.json").read_text())
    edit, message = BAD_MANIFESTS[case]
    raw = [] if case == "not an object" else raw
    edit(raw)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(UserError) as err:
        load_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(err.value) and message in str(err.value)
    if case == "shard in two splits":  # with val keys left alone, the shared shard itself is named
        raw["splits"]["val"]["keys"] = json.loads((tiny_root / "synth-indoor" / "manifest.json").read_text())["splits"][
            "val"
        ]["keys"]
        (tmp_path / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(UserError, match="train-000000.tar is listed in split 'train' and in 'val'"):
            load_manifest(tmp_path)


def test_a_manifest_listing_a_shard_twice_fails_verify_and_forget_make_writes_nothing(tiny_root, tmp_path):
    ds = tmp_path / "synth-indoor"
    shutil.copytree(tiny_root / "synth-indoor", ds)
    raw = json.loads((ds / "manifest.json").read_text())
    _twice(raw)
    (ds / "manifest.json").write_text(json.dumps(raw))
    out = tmp_path / "req.yaml"
    for args in (
        ["data", "verify", ds],
        ["forget", "make", "--dataset", ds, "--fraction", 0.5, "--setting", "full", "--out", out],
    ):
        p = run_mtu(*args)
        lines = [line for line in p.stderr.splitlines() if line.startswith("mtu: error:")]
        assert p.returncode != 0 and "Traceback" not in p.stderr and len(lines) == 1, p.stderr
        assert "train-000000.tar is listed twice" in lines[0]
    assert not out.exists()


def test_a_request_that_would_not_load_is_never_written(tiny_root, tmp_path):
    m = load_manifest(tiny_root / "synth-indoor")
    raw = make_request(m, fraction=0.1, setting="full", tasks=None, seed=0, exclude=None)
    raw["entries"].append(dict(raw["entries"][0]))  # a duplicate entry
    out = tmp_path / "r.yaml"
    with pytest.raises(UserError, match="duplicate entry"):
        write_request(raw, out, manifest=m)
    assert not out.exists() and not list(tmp_path.iterdir())
    raw["entries"].pop()
    assert write_request(raw, out, manifest=m).entries and out.is_file()


# ---------------------------------------------------------------- checkpoints: checksums and finiteness


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def _save(folder: Path, model, step=1, optimizer=None) -> Path:
    return save_checkpoint(folder, model, step=step, epoch=0, config={"seed": 0}, info={}, optimizer=optimizer)


def test_one_flipped_byte_in_a_saved_checkpoint_is_refused_and_the_previous_one_used(tmp_path):
    model = _tiny_model()
    first = _save(tmp_path / "step-0000001", model)
    second = _save(tmp_path / "step-0000002", model, step=2)
    data = bytearray((second / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte of a weight
    (second / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{second / 'model.safetensors'}: checksum mismatch"):
        load_checkpoint(second, _tiny_model())
    assert latest_checkpoint(tmp_path) == first
    load_checkpoint(first, _tiny_model())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_checkpoint_is_refused_at_load_naming_file_and_tensor(tmp_path, value):
    model = _tiny_model()
    with torch.no_grad():
        model[1].bias[0] = value
    folder = _save(tmp_path / "ckpt", model)  # checksums consistent: only the values are wrong
    with pytest.raises(UserError, match=r"ckpt/model.safetensors: tensor '1.bias' holds NaN or inf"):
        load_checkpoint(folder, _tiny_model())


def test_a_non_finite_optimizer_state_is_refused(tmp_path):
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    opt.state[model[0].weight]["momentum_buffer"][0, 0] = float("inf")
    folder = _save(tmp_path / "ckpt", model, optimizer=opt)
    fresh = _tiny_model()
    with pytest.raises(UserError, match=r"optim.safetensors: tensor 'state.0.momentum_buffer' holds NaN or inf"):
        load_checkpoint(folder, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9))


@pytest.mark.parametrize("state", [[], {"sha256": "abc"}, {"sha256": {"../../etc/passwd": "0" * 64}}])
def test_state_json_of_another_shape_is_refused(tmp_path, state):
    folder = _save(tmp_path / "ckpt", _tiny_model())
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match=f"{folder / 'state.json'}: corrupt checkpoint metadata"):
        read_state(folder)


def test_backbone_weights_must_be_finite(tmp_path):
    from safetensors.torch import save_file

    from mtu_dist.model import _load_local_weights

    save_file({"conv1.weight": torch.tensor([1.0, float("nan")])}, tmp_path / "b.safetensors")
    with pytest.raises(UserError, match="b.safetensors: tensor 'conv1.weight' holds NaN or inf"):
        _load_local_weights(str(tmp_path / "b.safetensors"))


# ---------------------------------------------------------------- config types

STRICT = {  # override -> words of the error
    "train.epochs=true": "expected a number, got the boolean True",
    "train.epochs=2.5": "expected an integer, got 2.5",
    "train.epochs=2.0": "expected an integer, got 2.0",
    "train.lr=true": "expected a number, got the boolean True",
    "train.lr=.inf": "finite number",
    "train.lr=.nan": "finite number",
    "unlearn.diverge_factor=.inf": "finite number",
    "deterministic=1": "expected true or false, got 1",
    "tracking.enabled=no-thanks": "expected true or false",
    "eval.retain_sample=0.5": "expected an integer, got 0.5",
}


@pytest.mark.parametrize("item", sorted(STRICT))
def test_config_refuses_silent_coercion_naming_the_set_item(item):
    with pytest.raises(UserError) as err:
        load_config([], [item])
    msg = str(err.value)
    assert msg.startswith(f"--set {item!r}: invalid config: field '{item.split('=')[0]}'") and STRICT[item] in msg


def test_config_stays_lenient_where_yaml_is_ambiguous_and_names_the_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 1e-3\n  epochs: 3\nunlearn:\n  stop_band: 1e-2\n")  # YAML 1.1: '1e-3' is a string
    loaded = load_config([str(cfg)], ["unlearn.lr=5e-3", "seed=4"])
    assert loaded.train.lr == 1e-3 and loaded.unlearn.lr == 5e-3 and loaded.train.epochs == 3
    assert loaded.unlearn.stop_band == 0.01  # an optional number too
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: true}\n")
    with pytest.raises(UserError) as err:
        load_config([str(cfg), str(bad)], ["train.lrr=1"])
    first, second = str(err.value).split("; ")
    assert first == f"{bad}: invalid config: field 'train.epochs': expected a number, got the boolean True"
    assert second == "--set 'train.lrr=1': invalid config: field 'train.lrr': unknown field"
    assert load_config([str(bad)], ["train.epochs=2"]).train.epochs == 2  # the --set item wins, as in the merge


# ---------------------------------------------------------------- tracking stores, file modes


def test_a_sqlite_tracking_uri_must_name_an_mlflow_store(tmp_path):
    from mtu_dist.reporting.tracking import check_reachable

    (tmp_path / "notes.txt").write_text("not a database\n")
    con = sqlite3.connect(tmp_path / "other.db")
    con.execute("CREATE TABLE customers (name TEXT)")
    con.commit()
    con.close()
    (tmp_path / "folder.db").mkdir()
    for name, words in (
        ("notes.txt", "is not an SQLite database"),
        ("other.db", "of another program (tables: customers)"),
        ("folder.db", "is not a file"),
    ):
        with pytest.raises(UserError) as err:
            check_reachable(f"sqlite:///{tmp_path / name}")
        assert str(err.value).startswith(f"tracking URI sqlite:///{tmp_path / name}: ") and words in str(err.value)
    (tmp_path / "empty.db").write_bytes(b"")
    check_reachable(f"sqlite:///{tmp_path / 'empty.db'}")  # an empty file and a new file are new stores
    check_reachable(f"sqlite:///{tmp_path / 'new.db'}")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "metrics.json", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == mode


# ---------------------------------------------------------------- the audit's roles


def test_the_audit_flags_a_forget_pair_borrowed_as_a_target():
    from mtu_dist.compliance.audit import audit
    from mtu_dist.compliance.ledger import ledger_document, pair_hash

    f, r = K.format(3), K.format(5)
    forget = {pair_hash(f, "depth"): f"{f}|depth"}
    clean = {f"retain|{r}|depth": 2, f"forget|{f}|depth": 3, f"target|{r}|depth": 1}
    assert audit(ledger_document(clean, None), forget, command="unlearn")["passed"]
    # random_label borrowed the forgotten instance's depth map as another instance's target
    leaked = audit(ledger_document({**clean, f"target|{f}|depth": 1}, None), forget, command="unlearn")
    assert not leaked["passed"] and leaked["leak_count"] == 1
    assert leaked["leaks"] == {"target": [{"pair": f"{f}|depth", "sha256": pair_hash(f, "depth"), "uses": 1}]}
    # a retrain may not consume a forget pair under any role, its forget role included
    assert not audit(ledger_document({f"forget|{f}|depth": 1}, None), forget, command="retrain")["passed"]


def test_a_non_finite_final_model_is_never_saved(tmp_path):
    from types import SimpleNamespace

    from mtu_dist.runner.commands import _refuse_non_finite_final

    model, session = _tiny_model(), SimpleNamespace(run_dir=tmp_path / "run", command="unlearn")
    _refuse_non_finite_final(session, model)  # finite: nothing to say
    with torch.no_grad():
        model[0].weight[1, 2] = float("-inf")
    with pytest.raises(UserError, match=r"run: the final model's tensor '0.weight' holds NaN or inf \(unlearn"):
        _refuse_non_finite_final(session, model)


@pytest.mark.parametrize(
    "method, options, words",
    [
        ("iamu", {"energy": True}, "unlearn.options.energy: expected a number, got the boolean True"),
        ("iamu", {"subspace_batches": 2.0}, "unlearn.options.subspace_batches: expected an integer, got 2.0"),
        ("pcgrad", {"heads": 1}, "unlearn.options.heads: expected true or false, got 1"),
        ("scrub", {"temperature": float("inf")}, "unlearn.options.temperature: Input should be a finite number"),
    ],
)
def test_method_options_follow_the_same_type_rules(method, options, words):
    from mtu_dist.methods import build_method

    with pytest.raises(UserError, match=f"method '{method}': invalid options: {words}"):
        build_method(method, options)
    assert build_method("iamu", {"energy": "0.9"}).opts.energy == 0.9  # YAML 1.1's string stays a number


def test_a_member_stored_twice_for_one_sample_is_refused(tiny_root, tmp_path):
    """Two different depth maps for one instance: verify, the forget/eval reader and the stream each refuse."""
    ds = tmp_path / "synth-indoor"
    shutil.copytree(tiny_root / "synth-indoor", ds)
    entries = list(iter_entries(ds / "train-000001.tar"))
    key, other = entries[2][0], entries[3][1]["depth.npy"]
    with tarfile.open(ds / "train-000001.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for k, members in entries:
            for name, data in [*members.items(), *([("depth.npy", other)] if k == key else [])]:
                info = tarfile.TarInfo(f"{k}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = json.loads((ds / "manifest.json").read_text())
    raw["splits"]["train"]["shards"][1]["sha256"] = sha256_file(ds / "train-000001.tar")
    (ds / "manifest.json").write_text(json.dumps(raw))
    m = load_manifest(ds)
    assert any(f"{key}: member depth.npy appears twice" in p for p in verify_dataset(m, check_samples=False))
    with pytest.raises(UserError, match=f"{key}: member depth.npy appears twice"):
        load_instances(m, "train", [key], lambda k: np.ones(3, dtype=bool))
    with pytest.raises(UserError, match="train-000001.tar"):
        for _ in BatchLoader(m, "train", rank=0, world=1, local_batch=8, shuffle=False).epoch(0):
            pass


@pytest.mark.parametrize(
    "roles, words",
    [
        ([], "field 'roles' must be an object"),
        ({"retain": {"keys": {}}}, "role 'retain' must hold the objects 'keys' and 'sha256'"),
        ({"retain": {"keys": {"a|b|c": 1}, "sha256": {}}}, "'a|b|c': 1 is not an 'instance|task' key"),
        ({"retain": {"keys": {"a|seg": True}, "sha256": {}}}, "'a|seg': True is not an 'instance|task' key"),
    ],
)
def test_a_ledger_of_another_shape_is_refused_by_the_audit(tmp_path, roles, words):
    from mtu_dist.compliance.audit import _checked_ledger
    from mtu_dist.compliance.ledger import FORMAT

    (tmp_path / "ledger.json").write_text(json.dumps({"format": FORMAT, "request_sha256": "r", "roles": roles}))
    state = {"ledger_sha256": sha256_file(tmp_path / "ledger.json"), "request_sha256": "r"}  # checksums consistent
    with pytest.raises(UserError) as err:
        _checked_ledger(tmp_path, state)
    assert str(err.value).startswith(f"{tmp_path / 'ledger.json'}: ") and words in str(err.value)


def test_resume_refuses_another_version_of_the_data():
    from mtu_dist.runner.checkpoint import check_resumable

    meta = {"_folder": "ckpt", "dataset": "d", "data_sha256": "a" * 64, "config": {}}
    info = {"dataset": "d", "data_sha256": "b" * 64}
    with pytest.raises(UserError, match="ckpt: written with data_sha256 = 'aaaa"):
        check_resumable(meta, {}, info)
    check_resumable({**meta, "data_sha256": "b" * 64}, {}, info)
    old = {k: v for k, v in meta.items() if k != "data_sha256"}  # written before the data was recorded
    check_resumable(old, {}, info)


def test_the_data_identity_follows_the_data_not_its_provenance(tiny_root, tmp_path):
    m = load_manifest(tiny_root / "synth-indoor")
    raw = json.loads((tiny_root / "synth-indoor" / "manifest.json").read_text())
    raw["source"] = {"converted_from": "/elsewhere"}
    (tmp_path / "manifest.json").write_text(json.dumps(raw, indent=3))
    assert load_manifest(tmp_path).data_sha256 == m.data_sha256
    raw["splits"]["train"]["shards"][0]["sha256"] = "0" * 64  # one shard edited
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert load_manifest(tmp_path).data_sha256 != m.data_sha256

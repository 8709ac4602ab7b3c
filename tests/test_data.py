"""Shards, manifests, converters, verification and the bad-input paths of the data layer."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_mtu

from mtu_dist.data.manifest import load_manifest
from mtu_dist.data.tario import iter_entries
from mtu_dist.data.verify import verify_dataset
from mtu_dist.data.write import write_tar
from mtu_dist.utils.fileio import sha256_file


def test_generator_bytes_deterministic(tmp_path, tiny_root):
    # Same seed -> byte-identical shards (tar metadata is fixed); another seed -> different bytes.
    args = [
        "data",
        "synth",
        "--datasets",
        "synth-street",
        "--train",
        40,
        "--val",
        16,
        "--height",
        16,
        "--width",
        24,
        "--shard-size",
        8,
        "--workers",
        1,
    ]
    run_mtu(*args, "--out", tmp_path / "a", check=True)
    run_mtu(*args, "--out", tmp_path / "b", "--seed", 1, check=True)
    ref = tiny_root / "synth-street"  # written with 2 workers: parallelism must not change bytes
    for shard in sorted(ref.glob("*.tar")):
        assert sha256_file(shard) == sha256_file(tmp_path / "a" / "synth-street" / shard.name)
    assert sha256_file(ref / "train-000000.tar") != sha256_file(tmp_path / "b" / "synth-street" / "train-000000.tar")


def test_manifest_round_trip(tiny_root, tmp_path):
    m = load_manifest(tiny_root / "synth-indoor")
    assert m.tasks == ("seg", "depth", "normal") and m.num_classes == 13 and m.resolution == (16, 24)
    assert m.split("train").num_samples == 40 and len(m.split("train").shards) == 5
    assert m.split("train").keys[3] == "synth-indoor/train/000003"
    m.save(tmp_path)
    again = load_manifest(tmp_path)
    assert again.to_json() == m.to_json()
    # every listed key is really in the shards, in order
    keys = [k for sh in m.split("train").shards for k, _ in iter_entries(m.shard_path(sh))]
    assert keys == m.split("train").keys
    assert verify_dataset(m) == []


def test_street_has_no_normals(tiny_root):
    m = load_manifest(tiny_root / "synth-street")
    assert m.tasks == ("seg", "depth") and m.num_classes == 7
    _, members = next(iter_entries(m.shard_path(m.split("train").shards[0])))
    assert "normal.npy" not in members and {"image.png", "seg.png", "depth.npy", "meta.json"} <= set(members)


# ---------------------------------------------------------------- converters on fixture folders


def _fixture(src: Path, kind: str, n_train=5, n_val=3, bad=None):
    h, w, c = (288, 384, 13) if kind == "nyuv2" else (128, 256, 7)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            arrays = {
                "image": rng.random((3, h, w), dtype=np.float32),
                "label": rng.integers(-1, c, (h, w)).astype(np.float32),
                "depth": rng.random((1, h, w), dtype=np.float32) * 5,
            }
            if kind == "nyuv2":
                nrm = rng.normal(size=(3, h, w)).astype(np.float32)
                arrays["normal"] = nrm / np.linalg.norm(nrm, axis=0, keepdims=True)
            for mod, a in arrays.items():
                (src / split / mod).mkdir(parents=True, exist_ok=True)
                if bad and bad[0] == (split, mod, i):
                    a = bad[1](a)
                np.save(src / split / mod / f"{i}.npy", a)
    return h, w


@pytest.mark.parametrize("kind", ["nyuv2", "cityscapes"])
def test_converter(tmp_path, kind):
    src = tmp_path / "src"
    h, w = _fixture(src, kind)
    run_mtu("data", "convert", kind, src, "--out", tmp_path / "out", "--shard-size", 2, "--workers", 2, check=True)
    m = load_manifest(tmp_path / "out" / kind)
    assert m.resolution == (h, w) and m.split("train").num_samples == 5 and m.split("val").num_samples == 3
    assert verify_dataset(m) == []
    # values survive: label -1 -> 255, image scaled to uint8, depth exact
    from mtu_dist.data.sample import decode_sample

    key, members = next(iter_entries(m.shard_path(m.split("train").shards[0])))
    s = decode_sample(members, m.tasks, m.resolution, m.num_classes, key)
    label = np.load(src / "train" / "label" / "0.npy")
    assert np.array_equal(s["seg"], np.where(label == -1, 255, label).astype(np.uint8))
    assert np.array_equal(s["depth"], np.load(src / "train" / "depth" / "0.npy")[0])
    img = np.load(src / "train" / "image" / "0.npy")
    assert np.abs(s["image"].transpose(2, 0, 1) / 255.0 - img).max() <= 0.5 / 255 + 1e-6
    run_mtu("data", "verify", tmp_path / "out" / kind, check=True)


def test_converter_bad_inputs(tmp_path):
    src = tmp_path / "src"
    _fixture(src, "cityscapes", bad=(("train", "depth", 2), lambda a: np.where(a > 2, np.nan, a)))
    p = run_mtu("data", "convert", "cityscapes", src, "--out", tmp_path / "out")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "train/depth/2.npy" in p.stderr and "NaN" in p.stderr
    assert not (tmp_path / "out" / "cityscapes").exists()  # nothing half-written left behind
    shutil.rmtree(src)
    _fixture(src, "cityscapes", bad=(("val", "label", 1), lambda a: a[:, :100]))
    p = run_mtu("data", "convert", "cityscapes", src, "--out", tmp_path / "out")
    assert p.returncode != 0 and "val/label/1.npy" in p.stderr and "shape" in p.stderr
    (src / "val" / "depth" / "0.npy").unlink()
    p = run_mtu("data", "convert", "cityscapes", src, "--out", tmp_path / "out")
    assert p.returncode != 0 and "val/depth" in p.stderr and "file numbers differ" in p.stderr


# ---------------------------------------------------------------- bad shards, reported by file and key


def _copy(tiny_root, tmp_path, name="synth-indoor") -> Path:
    dst = tmp_path / name
    shutil.copytree(tiny_root / name, dst)
    return dst


def _mutate_sample(ds: Path, shard: str, index: int, mutate, fix_hash=True) -> str:
    entries = list(iter_entries(ds / shard))
    key, members = entries[index]
    mutate(members)
    write_tar(ds / shard, entries)
    if fix_hash:  # keep the manifest consistent so only the sample problem is reported
        manifest = json.loads((ds / "manifest.json").read_text())
        for sh in manifest["splits"]["train"]["shards"]:
            if sh["file"] == shard:
                sh["sha256"] = sha256_file(ds / shard)
        (ds / "manifest.json").write_text(json.dumps(manifest))
    return key


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _set_depth(fn):
    def mutate(members):
        members["depth.npy"] = _npy(fn(np.load(io.BytesIO(members["depth.npy"]))))

    return mutate


BAD_SAMPLES = {
    "missing task member": (lambda m: m.pop("depth.npy"), "missing member(s) depth.npy"),
    "wrong shape": (_set_depth(lambda d: d[:, :5]), "shape"),
    "wrong dtype": (_set_depth(lambda d: d.astype(np.float64)), "dtype float64, expected float32"),
    "nan depth": (_set_depth(lambda d: np.where(d > 0, np.nan, d).astype(np.float32)), "NaN or inf"),
    "inf normal": (lambda m: m.__setitem__("normal.npy", _npy(np.full((3, 16, 24), np.inf, np.float16))), "NaN or inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_verify_reports_bad_sample(tiny_root, tmp_path, case):
    ds = _copy(tiny_root, tmp_path)
    mutate, expected = BAD_SAMPLES[case]
    key = _mutate_sample(ds, "train-000001.tar", 3, mutate)
    p = run_mtu("data", "verify", ds)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    line = next(x for x in p.stderr.splitlines() if key in x)
    assert "train-000001.tar" in line and expected in line, p.stderr
    # the streaming loader refuses the same sample at load, naming it
    from mtu_dist.data.stream import BatchLoader
    from mtu_dist.errors import UserError

    loader = BatchLoader(load_manifest(ds), "train", rank=0, world=1, local_batch=8, shuffle=False)
    with pytest.raises(UserError, match=key):
        for _ in loader.epoch(0):
            pass


def test_verify_corrupt_truncated_missing_and_hash(tiny_root, tmp_path):
    ds = _copy(tiny_root, tmp_path)
    data = (ds / "train-000002.tar").read_bytes()
    (ds / "train-000002.tar").write_bytes(data[: len(data) // 2 + 100])  # truncated
    (ds / "train-000003.tar").write_bytes(data[:1024] + b"\x17" * 700 + data[1724:])  # corrupt header
    (ds / "train-000004.tar").unlink()  # missing
    p = run_mtu("data", "verify", ds)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    err = p.stderr
    assert "train-000004.tar: shard missing from disk" in err
    assert "train-000002.tar: sha256" in err and "train-000002.tar: corrupt or truncated tar" in err
    assert "train-000003.tar: sha256" in err
    # loader: missing shard refused up front, corrupt shard by hash before decoding
    from mtu_dist.data.stream import BatchLoader
    from mtu_dist.errors import UserError

    with pytest.raises(UserError, match="train-000004.tar.*missing"):
        BatchLoader(load_manifest(ds), "train", rank=0, world=1, local_batch=8)


def test_loader_rejects_hash_mismatch_in_worker(tiny_root, tmp_path):
    ds = _copy(tiny_root, tmp_path)
    with open(ds / "train-000001.tar", "r+b") as f:  # flip one byte inside a member's payload
        f.seek(700)
        b = f.read(1)
        f.seek(700)
        f.write(bytes([b[0] ^ 0xFF]))
    from mtu_dist.data.stream import BatchLoader
    from mtu_dist.errors import UserError

    loader = BatchLoader(load_manifest(ds), "train", rank=0, world=1, local_batch=8, workers=2, shuffle=False)
    with pytest.raises(UserError, match="train-000001.tar: sha256 does not match"):
        for _ in loader.epoch(0):
            pass


def test_output_never_clobbered(tiny_root, tmp_path):
    ds = _copy(tiny_root, tmp_path / "root")
    before = sha256_file(ds / "manifest.json")
    p = run_mtu("data", "synth", "--datasets", "synth-indoor", "--out", tmp_path / "root", "--train", 4)
    assert p.returncode != 0 and "already exists" in p.stderr and "--overwrite" in p.stderr
    assert sha256_file(ds / "manifest.json") == before
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    p = run_mtu("data", "synth", "--out", blocker / "sub", "--train", 4)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "not writable" in p.stderr and "a_file" in p.stderr
    # --overwrite replaces atomically and the result verifies
    run_mtu(
        "data",
        "synth",
        "--datasets",
        "synth-indoor",
        "--out",
        tmp_path / "root",
        "--train",
        4,
        "--val",
        2,
        "--height",
        8,
        "--width",
        8,
        "--overwrite",
        check=True,
    )
    assert load_manifest(ds).split("train").num_samples == 4
    assert not [p for p in (tmp_path / "root").iterdir() if p.name.startswith(".")]


def test_manifest_errors(tmp_path):
    p = run_mtu("data", "verify", tmp_path / "nothing")
    assert p.returncode != 0 and "manifest not found" in p.stderr
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.json").write_text('{"format": 1, "tasks": ["seg", "sky"]}')
    p = run_mtu("data", "verify", tmp_path / "d")
    assert p.returncode != 0 and "unknown task" in p.stderr and "Traceback" not in p.stderr

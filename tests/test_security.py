"""Security: nothing from a file is ever executed or unpickled, nothing is extracted from an archive to a
path the archive chose, and the server the project starts listens on 127.0.0.1 unless told otherwise.

A source scan (AST, so comments and method names like `model.eval()` do not count) plus behaviour:
YAML tags that would build Python objects are refused, a pickle posing as a checkpoint is refused
unopened, and a shard whose members are named `../../evil`, `/abs/...` or are symlinks is read in
memory with nothing written anywhere.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT

from mtu_dist.errors import UserError

PACKAGE = ROOT / "mtu_dist"
NEVER_IMPORTED = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}


def violations(source: str, where: str = "<src>") -> list[str]:
    """Unsafe constructs in `source`: eval/exec/compile, torch.load without weights_only=True, non-safe YAML
    loading, pickle-family imports, np.load(allow_pickle=True), archive extraction, shell=True, 0.0.0.0."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{line}: imports {n}" for n in names if n.split(".")[0] in NEVER_IMPORTED]
        elif isinstance(node, ast.Constant) and node.value == "0.0.0.0":
            found.append(f"{line}: binds all interfaces")
        elif isinstance(node, ast.Call):
            f, kw = node.func, {k.arg: k.value for k in node.keywords}

            def true(k, kw=kw):
                return isinstance(kw.get(k), ast.Constant) and kw[k].value is True

            if isinstance(f, ast.Name) and f.id in ("eval", "exec", "compile", "__import__"):
                found.append(f"{line}: {f.id}()")
            elif isinstance(f, ast.Attribute):
                owner = f.value.id if isinstance(f.value, ast.Name) else None
                if owner == "torch" and f.attr == "load" and not true("weights_only"):
                    found.append(f"{line}: torch.load without weights_only=True")
                if owner == "yaml" and f.attr in UNSAFE_YAML:
                    found.append(f"{line}: yaml.{f.attr} (use yaml.safe_load)")
                if owner in ("np", "numpy") and f.attr == "load" and true("allow_pickle"):
                    found.append(f"{line}: np.load(allow_pickle=True)")
                if f.attr in ("extract", "extractall"):
                    found.append(f"{line}: .{f.attr}() writes archive members to disk")
            if true("shell"):
                found.append(f"{line}: shell=True")
    return found


def test_the_scan_catches_each_unsafe_construct():
    bad = """
import pickle
import yaml, torch, numpy as np, subprocess
eval("1"); exec("x = 1")
torch.load("m.pt"); torch.load("m.pt", weights_only=False)
yaml.load(s); yaml.unsafe_load(s); yaml.full_load(s)
np.load(f, allow_pickle=True)
tar.extractall("out"); tar.extract(m)
subprocess.run("ls", shell=True)
host = "0.0.0.0"
"""
    assert len(violations(bad)) == 13, violations(bad)
    ok = """
import yaml, torch, numpy as np
model.eval(); re.compile("x")
torch.load("m.pt", map_location="cpu", weights_only=True)
yaml.safe_load(s); np.load(f, allow_pickle=False)
"""
    assert violations(ok) == []


def test_package_source_has_no_unsafe_constructs():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = [v for f in files for v in violations(f.read_text(), str(f.relative_to(ROOT)))]
    assert found == []


PYTHON_TAG = '!!python/object/apply:os.system ["touch {pwned}"]'


def test_yaml_python_tags_are_refused(tmp_path):
    from mtu_dist.compliance.request import load_request
    from mtu_dist.config import load_config

    pwned = tmp_path / "PWNED"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"train: {PYTHON_TAG.format(pwned=pwned)}\n")
    with pytest.raises(UserError, match=f"{cfg}: not valid YAML"):
        load_config([str(cfg)])
    with pytest.raises(UserError, match="train.lr"):  # an override is a plain string, never constructed
        load_config([], [f"train.lr={PYTHON_TAG.format(pwned=pwned)}"])
    req = tmp_path / "request.yaml"
    req.write_text(f"setting: full\ndataset: synth-indoor\nentries: {PYTHON_TAG.format(pwned=pwned)}\n")
    with pytest.raises(UserError, match=f"{req}: not valid YAML"):
        load_request(req, manifest=None)
    assert not pwned.exists()


class _Payload:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.target}",)


def test_a_pickle_posing_as_a_checkpoint_is_never_unpickled(tmp_path):
    from mtu_dist.model import _load_local_weights
    from mtu_dist.runner.checkpoint import load_checkpoint
    from mtu_dist.utils.fileio import sha256_file

    pwned = tmp_path / "PWNED"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(pickle.dumps(_Payload(pwned)))
    digest = sha256_file(ckpt / "model.safetensors")
    (ckpt / "state.json").write_text(json.dumps({"sha256": {"model.safetensors": digest}}))
    with pytest.raises(UserError, match="not a safetensors file"):
        load_checkpoint(ckpt, model=None)
    shutil.copy(ckpt / "model.safetensors", tmp_path / "backbone.pt")  # torch.load(weights_only=True) path
    with pytest.raises(UserError, match="cannot load backbone weights"):
        _load_local_weights(str(tmp_path / "backbone.pt"))
    assert not pwned.exists()


def _evil_shard(src: Path, dst: Path, outside: Path) -> list[str]:
    """A copy of `src` whose members are named ../../evil*, an absolute path, and a symlink to /etc/passwd."""
    from mtu_dist.data.tario import iter_entries
    from mtu_dist.data.write import write_tar

    entries = list(iter_entries(src))
    keys = ["../../evil", str(outside / "evil")]
    write_tar(dst, [(k, members) for k, (_, members) in zip(keys, entries)] + entries[2:])
    with tarfile.open(dst, "a") as tar:
        link = tarfile.TarInfo("link.image.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return keys


def test_shard_members_are_read_in_memory_never_written_where_they_point(tiny_root, tmp_path, monkeypatch):
    from mtu_dist.data.manifest import load_manifest
    from mtu_dist.data.stream import BatchLoader
    from mtu_dist.data.tario import iter_entries
    from mtu_dist.data.verify import verify_dataset
    from mtu_dist.utils.fileio import sha256_file

    ds = tmp_path / "deep" / "er" / "synth-indoor"
    shutil.copytree(tiny_root / "synth-indoor", ds)
    outside = tmp_path / "outside"
    shard = ds / "train-000000.tar"
    keys = _evil_shard(tiny_root / "synth-indoor" / "train-000000.tar", shard, outside)
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = sha256_file(shard)
    (ds / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(ds)  # a relative ../../ member would land in tmp_path/deep
    before = sorted(str(p) for p in tmp_path.rglob("*"))

    read = [k for k, _ in iter_entries(shard)]
    assert read[:2] == keys and "link" not in read  # in memory, symlinks skipped
    problems = verify_dataset(load_manifest(ds))
    assert any("../../evil: unexpected key" in p for p in problems), problems
    loader = BatchLoader(load_manifest(ds), "train", rank=0, world=1, local_batch=8, shuffle=False)
    with pytest.raises(UserError, match="train-000000.tar: ../../evil: not the key manifest.json lists"):
        for _ in loader.epoch(0):  # the names are plain strings to the loader, and not the listed keys
            pass

    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written anywhere below tmp_path
    assert not outside.exists() and not Path("/etc/passwd.image.png").exists()


def test_server_defaults_to_localhost():
    from mtu_dist.cli import build_parser
    from mtu_dist.reporting.server import server_argv

    args = build_parser().parse_args(["server"])
    assert args.host == "127.0.0.1"
    argv = server_argv(store=args.store, artifacts=args.artifacts, host=args.host, port=args.port, workers=1)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"

"""Run commands given one bad input each: a clear one-line error naming the culprit, never a traceback,
and nothing already on disk touched (the original model, its metrics, the folder the command targeted).

Each case returns (argv, words the error must contain, folders that must not change[, options]); options:
`env`, `fsize_kib` (RLIMIT_FSIZE: every write past it fails with EFBIG, which stands in for a full disk —
no small filesystem can be mounted here), `hold` (a socket kept open during the run), `absent` (paths
that must not exist afterwards). Runs are as root, so an unwritable output location is a path through a
regular file (permission bits would not stop root)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import BIN, ROOT, _free_port
from test_data import _copy, _mutate_sample, _set_depth

from mtu_dist.compliance.request import make_request, write_request
from mtu_dist.data.manifest import load_manifest

pytestmark = pytest.mark.slow

TINY = ROOT / "configs" / "tiny.yaml"


@dataclass
class Ctx:
    base: Path  # module folder: shards root, run outputs, tracking db, requests
    tmp: Path  # this case's own folder (cwd of the command)
    data_root: Path
    out: Path
    run: Path  # the trained original's run folder
    uri: str
    request: Path  # a request on synth-indoor
    street_request: Path

    def train(self, *extra):
        return [
            "train",
            "--config",
            TINY,
            "--set",
            f"data.root={self.data_root}",
            "--set",
            "data.dataset=synth-indoor",
            "--set",
            f"out={self.out}",
            "--tracking-uri",
            self.uri,
            *extra,
        ]

    def unlearn(self, origin, *extra, request=None, method="finetune"):
        return [
            "unlearn",
            "--config",
            TINY,
            "--set",
            f"data.root={self.data_root}",
            "--set",
            f"out={self.out}",
            "--request",
            request or self.request,
            "--from",
            origin,
            "--method",
            method,
            "--tracking-uri",
            self.uri,
            *extra,
        ]

    def eval(self, ckpt, *extra):
        return [
            "eval",
            "--ckpt",
            ckpt,
            "--request",
            self.request,
            "--set",
            f"data.root={self.data_root}",
            "--tracking-uri",
            self.uri,
            *extra,
        ]

    def copy_final(self, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(self.run / "final", dst)
        return dst


def snapshot(folder: Path) -> dict[str, str]:
    """Every file's sha256, except a run folder's `.lock`: it names whichever run last claimed the folder
    (a refused --resume claims it before it reads the checkpoint it refuses), it is no result."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def ctx_base(tiny_root, tiny_original, tmp_path_factory):
    """The shared original (configs/tiny.yaml; every case checks that it is left untouched) and its `out`
    folder, requests and a tracking store of this module's own."""
    base = tmp_path_factory.mktemp("runner-errors")
    out, uri = tiny_original.parents[1], f"sqlite:///{base / 'mlflow.db'}"
    requests = {}
    for ds in ("synth-indoor", "synth-street"):
        m = load_manifest(tiny_root / ds)
        requests[ds] = base / f"forget-{ds}.yaml"
        write_request(make_request(m, fraction=0.1, setting="full", tasks=None, seed=0, exclude=None), requests[ds])
    run = out / "synth-indoor" / "original"
    assert (run / "final" / "model.safetensors").is_file() and (run / "final" / "metrics.json").is_file()
    return dict(
        base=base,
        data_root=tiny_root,
        out=out,
        run=run,
        uri=uri,
        request=requests["synth-indoor"],
        street_request=requests["synth-street"],
    )


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in (-1, -9, -17):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def missing_from(c: Ctx):
    gone = c.tmp / "no-such-run"
    return c.unlearn(gone), [str(gone), "not a checkpoint"], []


def corrupt_checkpoint(c: Ctx):
    ckpt = c.copy_final("corrupt")
    _flip_bytes(ckpt / "model.safetensors")
    return c.unlearn(ckpt), [str(ckpt / "model.safetensors"), "checksum mismatch"], [ckpt]


def corrupt_checkpoint_eval(c: Ctx):
    ckpt = c.copy_final("corrupt")
    _flip_bytes(ckpt / "model.safetensors")
    return c.eval(ckpt), [str(ckpt / "model.safetensors"), "checksum mismatch"], [ckpt]


def state_not_json(c: Ctx):
    ckpt = c.copy_final("badstate")
    (ckpt / "state.json").write_text('{"step": 10, "config": {')
    return c.unlearn(ckpt), [str(ckpt / "state.json"), "not valid JSON"], [ckpt]


def state_not_json_eval(c: Ctx):
    ckpt = c.copy_final("badstate")
    (ckpt / "state.json").write_text("\x00\x01 not json")
    return c.eval(ckpt), [str(ckpt / "state.json"), "not valid JSON"], [ckpt]


def request_other_dataset(c: Ctx):
    return (c.unlearn(c.run, request=c.street_request), [str(c.street_request), "synth-street", "synth-indoor"], [])


def request_missing(c: Ctx):
    gone = c.tmp / "no-such-request.yaml"
    return c.unlearn(c.run, request=gone), [str(gone), "cannot read forget request"], []


def unknown_method(c: Ctx):
    return c.unlearn(c.run, method="nosuch"), ["unknown method 'nosuch'", "finetune", "grad_ascent", "neggrad_plus"], []


def unknown_method_option(c: Ctx):
    return (c.unlearn(c.run, "--set", "unlearn.options.bogus=1"), ["method 'finetune'", "unlearn.options.bogus"], [])


def config_typo(c: Ctx):
    return c.train("--set", "train.lrr=1"), ["train.lrr", "unknown field"], []


def config_wrong_type(c: Ctx):
    return c.train("--set", "train.epochs=abc"), ["train.epochs", "integer"], []


def config_file_missing(c: Ctx):
    gone = c.tmp / "no-such-config.yaml"
    args = c.train()
    args[args.index(TINY)] = gone
    return args, [str(gone), "cannot read config"], []


def tracking_unreachable(c: Ctx):
    uri = "http://127.0.0.1:9"
    args = c.train("--name", "never")
    args[args.index(c.uri)] = uri
    return args, [f"tracking URI {uri}", "unreachable"], []


def tracking_sqlite_no_folder(c: Ctx):
    uri = f"sqlite:///{c.tmp / 'no-such-dir' / 'mlflow.db'}"
    args = c.train("--name", "never")
    args[args.index(c.uri)] = uri
    return args, [uri, str(c.tmp / "no-such-dir"), "does not exist"], []


def train_into_existing_run(c: Ctx):
    return c.train(), [str(c.run), "run folder exists", "--resume", "--overwrite"], [c.run]


def batch_not_divisible_by_workers(c: Ctx):
    return (
        c.train("--name", "odd-batch", "--set", "train.global_batch=7", "--set", "data.workers=2"),
        ["train.global_batch", "7", "data.workers"],
        [],
    )


def shard_tampered(c: Ctx):
    ds = _copy(c.data_root, c.tmp)
    _flip_bytes(ds / "train-000001.tar")
    return (
        c.train("--set", f"data.root={c.tmp}", "--set", f"out={c.tmp / 'runs'}", "--set", "tracking.enabled=false"),
        ["synth-indoor/train-000001.tar", "sha256 does not match manifest.json"],
        [],
    )


def shard_nan_depth(c: Ctx):
    ds = _copy(c.data_root, c.tmp)
    key = _mutate_sample(ds, "train-000002.tar", 1, _set_depth(lambda d: np.where(d > 0, np.nan, d).astype(np.float32)))
    return (
        c.train("--set", f"data.root={c.tmp}", "--set", f"out={c.tmp / 'runs'}", "--set", "tracking.enabled=false"),
        [key, "depth.npy", "NaN or inf"],
        [],
    )


def request_python_tag(c: Ctx):
    req, pwned = c.tmp / "evil.yaml", c.tmp / "PWNED"
    req.write_text(
        f'setting: full\ndataset: synth-indoor\nentries: !!python/object/apply:os.system ["touch {pwned}"]\n'
    )
    return c.unlearn(c.run, request=req), [str(req), "not valid YAML"], [], {"absent": [pwned]}


def config_python_tag(c: Ctx):
    cfg, pwned = c.tmp / "evil.yaml", c.tmp / "PWNED"
    cfg.write_text(f'train: !!python/object/apply:os.system ["touch {pwned}"]\n')
    return c.train("--config", cfg), [str(cfg), "not valid YAML"], [], {"absent": [pwned]}


def _copied_run(c: Ctx) -> tuple[Path, list]:
    """A copy of the original's run folder (checkpoints included) under this case's own `out`."""
    out = c.tmp / "runs"
    shutil.copytree(c.run, out / "synth-indoor" / "original")
    return out / "synth-indoor" / "original", ["--set", f"out={out}", "--set", "tracking.enabled=false"]


def resume_changed_config(c: Ctx):
    run, out = _copied_run(c)
    return c.train(*out, "--resume", "--set", "train.lr=0.1"), ["config changed", "train.lr", "--overwrite"], [run]


def resume_other_world_size(c: Ctx):
    run, out = _copied_run(c)
    for state in run.glob("checkpoints/step-*/state.json"):  # as if written by a 2-rank launch
        state.write_text(json.dumps({**json.loads(state.read_text()), "world_size": 2}))
    return c.train(*out, "--resume"), ["world_size = 2", "this run has 1"], [run]


def checkpoint_file_missing(c: Ctx):
    ckpt = c.copy_final("incomplete")
    (ckpt / "model.safetensors").unlink()
    return c.unlearn(ckpt), [str(ckpt / "model.safetensors"), "checkpoint file missing"], [ckpt]


def tracking_bad_scheme(c: Ctx):
    args = c.train("--name", "never")
    args[args.index(c.uri)] = "ftp://example.org/mlflow"
    return args, ["ftp://example.org/mlflow", "unsupported scheme"], []


def world_size_without_launcher(c: Ctx):
    return (
        c.train("--name", "never"),
        ["WORLD_SIZE=2", "MASTER_ADDR", "accelerate launch"],
        [],
        {"env": {"WORLD_SIZE": "2"}},
    )


def output_not_writable(c: Ctx):
    (c.tmp / "a-file").write_text("")
    out = c.tmp / "a-file" / "runs"
    return c.train("--set", f"out={out}"), [str(out / "synth-indoor"), "not writable"], []


def disk_full_at_checkpoint(c: Ctx):
    out = c.tmp / "runs"
    args = c.train(
        "--set",
        f"out={out}",
        "--set",
        "tracking.enabled=false",
        "--set",
        "data.workers=0",
        "--set",
        "train.checkpoint_every=1",
    )
    ckpt = out / "synth-indoor/original/checkpoints/step-0000001"
    return (
        args,
        [str(ckpt), "could not write checkpoint", "File too large"],
        [],
        {"fsize_kib": 16, "absent": [out / "synth-indoor/original/final"]},
    )


def server_port_in_use(c: Ctx):
    port = _free_port()
    held = socket.socket()
    held.bind(("127.0.0.1", port))
    held.listen()
    return (
        ["server", "--port", port, "--store", f"sqlite:///{c.tmp / 'srv.db'}"],
        [f"port {port} on 127.0.0.1", "cannot listen"],
        [],
        {"hold": held},
    )


def audit_not_a_run(c: Ctx):
    return ["audit", c.tmp, "--tracking-uri", c.uri], [str(c.tmp), "not a run folder"], []


def audit_ledger_edited(c: Ctx):
    final = c.copy_final("edited")
    ledger = json.loads((final / "ledger.json").read_text())
    ledger["roles"]["retain"]["uses"] -= 1
    (final / "ledger.json").write_text(json.dumps(ledger))
    return ["audit", final, "--tracking-uri", c.uri], [str(final / "ledger.json"), "ledger edited after the run"], []


def _sha8(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def _non_finite(folder: Path, value: float) -> str:
    """Put `value` into the first floating tensor of folder/model.safetensors and update state.json's
    checksum, so only the values are wrong. Returns the tensor's name."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    name = next(k for k, t in tensors.items() if t.is_floating_point())
    tensors[name].view(-1)[0] = value
    save_file(tensors, folder / "model.safetensors")
    state = json.loads((folder / "state.json").read_text())
    state["sha256"]["model.safetensors"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "state.json").write_text(json.dumps(state))
    return name


def nan_checkpoint_iamu(c: Ctx):
    ckpt = c.copy_final("nan")
    name = _non_finite(ckpt, float("nan"))
    return (
        c.unlearn(ckpt, method="iamu"),
        [str(ckpt / "model.safetensors"), f"tensor '{name}'", "NaN or inf"],
        [ckpt],
        {"absent": [c.out / "synth-indoor" / f"unlearn-iamu-full-{_sha8(c.request)}"]},
    )


def inf_checkpoint_eval(c: Ctx):
    ckpt = c.copy_final("inf")
    name = _non_finite(ckpt, float("inf"))
    return c.eval(ckpt), [str(ckpt / "model.safetensors"), f"tensor '{name}'", "NaN or inf"], [ckpt]


def nan_checkpoint_resume(c: Ctx):
    run, out = _copied_run(c)
    last = sorted(run.glob("checkpoints/step-*"))[-1]
    name = _non_finite(last, float("nan"))
    return c.train(*out, "--resume"), [str(last / "model.safetensors"), f"tensor '{name}'"], [run / "checkpoints"]


def renamed_member_retrain(c: Ctx):
    """A forgotten instance renamed inside its shard (sha256 updated): a retrain must not train on the copy."""
    from test_integrity import rewrite_shard

    ds = _copy(c.data_root, c.tmp)
    victim = yaml.safe_load(c.request.read_text())["entries"][0]["id"]
    m = load_manifest(ds)
    index = m.split("train").keys.index(victim)
    shard, pos = m.split("train").shards[index // 8].file, index % 8
    copy = "synth-indoor/train/777777"
    rewrite_shard(ds, shard, lambda e: [(copy if n == pos else k, v) for n, (k, v) in enumerate(e)])
    return (
        [
            "retrain",
            "--config",
            TINY,
            "--set",
            f"data.root={c.tmp}",
            "--set",
            f"out={c.tmp / 'runs'}",
            "--set",
            "tracking.enabled=false",
            "--request",
            c.request,
        ],
        [f"{shard}: {copy}", "not the key manifest.json lists"],
        [],
        {"absent": [c.tmp / "runs" / "synth-indoor" / f"retrain-full-{_sha8(c.request)}" / "final"]},
    )


def unlearn_on_other_data(c: Ctx):
    """The original was trained on the shards as they were; one sample edited since (valid, hash updated)."""
    ds = _copy(c.data_root, c.tmp / "data")
    _mutate_sample(ds, "train-000002.tar", 1, _set_depth(lambda d: (d * 1.5).astype(np.float32)))
    args = c.unlearn(c.run, "--set", f"data.root={c.tmp / 'data'}")
    return (
        args,
        [str(c.run / "final"), "another version of synth-indoor", str(ds / "manifest.json")],
        [],
        {"absent": [c.out / "synth-indoor" / f"unlearn-finetune-full-{_sha8(c.request)}"]},
    )


def config_bool_for_a_number(c: Ctx):
    return c.train("--set", "train.epochs=true"), ["--set 'train.epochs=true'", "train.epochs", "boolean"], []


def config_fraction_for_an_integer(c: Ctx):
    cfg = c.tmp / "frac.yaml"
    cfg.write_text("train: {epochs: 1.5}\n")
    return c.train("--config", cfg), [f"{cfg}: invalid config", "train.epochs", "expected an integer"], []


def tracking_uri_not_a_database(c: Ctx):
    notes = c.tmp / "notes.txt"
    notes.write_text("meeting notes, not a database\n")
    args = c.train("--name", "never")
    args[args.index(c.uri)] = f"sqlite:///{notes}"
    return args, [f"sqlite:///{notes}", "not an SQLite database"], [], {"absent": [c.out / "synth-indoor" / "never"]}


CASES = {
    "missing --from folder": missing_from,
    "corrupt checkpoint (unlearn)": corrupt_checkpoint,
    "corrupt checkpoint (eval)": corrupt_checkpoint_eval,
    "state.json not JSON (unlearn)": state_not_json,
    "state.json not JSON (eval)": state_not_json_eval,
    "request for another dataset": request_other_dataset,
    "request file missing": request_missing,
    "unknown method": unknown_method,
    "unknown method option": unknown_method_option,
    "config typo": config_typo,
    "config wrong type": config_wrong_type,
    "config file missing": config_file_missing,
    "tracking server unreachable": tracking_unreachable,
    "sqlite tracking folder missing": tracking_sqlite_no_folder,
    "train into existing run folder": train_into_existing_run,
    "batch not divisible by loader workers": batch_not_divisible_by_workers,
    "shard tampered (sha256)": shard_tampered,
    "NaN depth in a shard": shard_nan_depth,
    "request with a !!python tag": request_python_tag,
    "config with a !!python tag": config_python_tag,
    "resume under a changed config": resume_changed_config,
    "resume under another world size": resume_other_world_size,
    "checkpoint file missing": checkpoint_file_missing,
    "tracking URI with an unknown scheme": tracking_bad_scheme,
    "WORLD_SIZE set without a launcher": world_size_without_launcher,
    "output location not writable": output_not_writable,
    "disk full while checkpointing": disk_full_at_checkpoint,
    "server port in use": server_port_in_use,
    "audit of a folder that is no run": audit_not_a_run,
    "audit of an edited ledger": audit_ledger_edited,
    "NaN in a checkpoint (unlearn iamu)": nan_checkpoint_iamu,
    "inf in a checkpoint (eval)": inf_checkpoint_eval,
    "NaN in a resume checkpoint (train --resume)": nan_checkpoint_resume,
    "forgotten instance renamed in its shard (retrain)": renamed_member_retrain,
    "unlearn on another version of the data": unlearn_on_other_data,
    "config: a boolean for a number (--set)": config_bool_for_a_number,
    "config: a fraction for an integer (file)": config_fraction_for_an_integer,
    "tracking URI at a file that is no database": tracking_uri_not_a_database,
}


def _run(args, cwd, env=None, fsize_kib=None):
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_kib * 1024,) * 2)) if fsize_kib else None
    return subprocess.run(
        [str(BIN / "mtu"), *map(str, args)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=90,
        preexec_fn=limit,
    )


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_cleanly(ctx_base, tmp_path, case):
    c = Ctx(tmp=tmp_path, **ctx_base)
    args, needles, watched, *opts = CASES[case](c)
    opts = opts[0] if opts else {}
    original = snapshot(c.run)
    assert "final/model.safetensors" in original and "final/metrics.json" in original
    before = {Path(w): snapshot(Path(w)) for w in watched}

    try:  # a hang (e.g. on an unreachable server) fails at the timeout
        proc = _run(args, tmp_path, env=opts.get("env"), fsize_kib=opts.get("fsize_kib"))
    finally:
        if opts.get("hold"):
            opts["hold"].close()

    assert proc.returncode != 0, f"expected failure, got success:\n{proc.stdout[-2000:]}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mtu: error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    assert snapshot(c.run) == original, "the original run folder changed"
    for folder, files in before.items():
        assert snapshot(folder) == files, f"{folder} changed"
    for path in opts.get("absent", []):
        assert not Path(path).exists(), f"{path} exists"
    assert not running_runs(c.base / "mlflow.db"), "a failed command left its MLflow run RUNNING"


def running_runs(db: Path) -> list[str]:
    """Names of the store's runs still RUNNING (read from its sqlite file: no MLflow start-up)."""
    import sqlite3

    if not db.is_file():
        return []
    with sqlite3.connect(db) as con:
        return [name for (name,) in con.execute("SELECT name FROM runs WHERE status = 'RUNNING'")]

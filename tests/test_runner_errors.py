"""Run commands given one bad input each: a clear one-line error naming the culprit, never a traceback,
and nothing already on disk touched (the original model, its metrics, the folder the command targeted)."""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from mtu_dist.data.manifest import load_manifest
from mtu_dist.forget import make_request, write_request

from conftest import ROOT, run_mtu

pytestmark = pytest.mark.slow

TINY = ROOT / "configs" / "tiny.yaml"


@dataclass
class Ctx:
    base: Path        # module folder: shards root, run outputs, tracking db, requests
    tmp: Path         # this case's own folder (cwd of the command)
    data_root: Path
    out: Path
    run: Path         # the trained original's run folder
    uri: str
    request: Path     # a request on synth-indoor
    street_request: Path

    def train(self, *extra):
        return ["train", "--config", TINY, "--set", f"data.root={self.data_root}", "--set", "data.dataset=synth-indoor",
                "--set", f"out={self.out}", "--tracking-uri", self.uri, *extra]

    def unlearn(self, origin, *extra, request=None, method="finetune"):
        return ["unlearn", "--config", TINY, "--set", f"data.root={self.data_root}", "--set", f"out={self.out}",
                "--request", request or self.request, "--from", origin, "--method", method,
                "--tracking-uri", self.uri, *extra]

    def eval(self, ckpt, *extra):
        return ["eval", "--ckpt", ckpt, "--request", self.request, "--set", f"data.root={self.data_root}",
                "--tracking-uri", self.uri, *extra]

    def copy_final(self, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(self.run / "final", dst)
        return dst


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ctx_base(tiny_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("runner-errors")
    out, uri = base / "runs", f"sqlite:///{base / 'mlflow.db'}"
    run_mtu("train", "--config", TINY, "--set", f"data.root={tiny_root}", "--set", "data.dataset=synth-indoor",
            "--set", f"out={out}", "--tracking-uri", uri, cwd=base, check=True)
    requests = {}
    for ds in ("synth-indoor", "synth-street"):
        m = load_manifest(tiny_root / ds)
        requests[ds] = base / f"forget-{ds}.yaml"
        write_request(make_request(m, fraction=0.1, setting="full", tasks=None, seed=0, exclude=None), requests[ds])
    run = out / "synth-indoor" / "original"
    assert (run / "final" / "model.safetensors").is_file() and (run / "final" / "metrics.json").is_file()
    return dict(base=base, data_root=tiny_root, out=out, run=run, uri=uri,
                request=requests["synth-indoor"], street_request=requests["synth-street"])


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
    return (c.unlearn(c.run, request=c.street_request),
            [str(c.street_request), "synth-street", "synth-indoor"], [])


def request_missing(c: Ctx):
    gone = c.tmp / "no-such-request.yaml"
    return c.unlearn(c.run, request=gone), [str(gone), "cannot read forget request"], []


def unknown_method(c: Ctx):
    return c.unlearn(c.run, method="nosuch"), ["unknown method 'nosuch'", "finetune", "grad_ascent", "neggrad_plus"], []


def unknown_method_option(c: Ctx):
    return (c.unlearn(c.run, "--set", "unlearn.options.bogus=1"),
            ["method 'finetune'", "unlearn.options.bogus"], [])


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
    return (c.train("--name", "odd-batch", "--set", "train.global_batch=7", "--set", "data.workers=2"),
            ["train.global_batch", "7", "data.workers"], [])


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
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_cleanly(ctx_base, tmp_path, case):
    c = Ctx(tmp=tmp_path, **ctx_base)
    args, needles, watched = CASES[case](c)
    original = snapshot(c.run)
    assert "final/model.safetensors" in original and "final/metrics.json" in original
    before = {Path(w): snapshot(Path(w)) for w in watched}

    proc = run_mtu(*args, cwd=tmp_path, timeout=90)  # a hang (e.g. on an unreachable server) fails here

    assert proc.returncode != 0, f"expected failure, got success:\n{proc.stdout[-2000:]}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mtu: error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    assert snapshot(c.run) == original, "the original run folder changed"
    for folder, files in before.items():
        assert snapshot(folder) == files, f"{folder} changed"

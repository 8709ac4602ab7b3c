"""Shared fixtures: tiny synthetic datasets and a real multi-process launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_mtu(*args, cwd=None, env=None, check=False, timeout=600):
    """Run the real `mtu` console script; returns the CompletedProcess."""
    proc = subprocess.run(
        [str(BIN / "mtu"), *map(str, args)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"mtu {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def accelerate_launch(script_args: list, nproc: int, cwd=None, timeout=600, env=None, check=True, config=None):
    """Start `nproc` real gloo ranks with `accelerate launch` (see launch/accelerate/cpu_2proc.yaml, or
    `config`, a file in launch/accelerate/). A launch that outlives `timeout` (a hang) raises
    subprocess.TimeoutExpired."""
    config = ROOT / "launch" / "accelerate" / (config or ("cpu_2proc.yaml" if nproc > 1 else "cpu_1proc.yaml"))
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--num_processes", str(nproc)]
    if nproc > 1:
        cmd += ["--main_process_port", str(_free_port())]
    proc = subprocess.run(
        cmd + [str(a) for a in script_args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """Both synthetic benchmarks, tiny: 40 train samples in 5 shards of 8 (uneven over 4 reader slots)."""
    root = tmp_path_factory.mktemp("shards")
    run_mtu(
        "data",
        "synth",
        "--out",
        root,
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
        2,
        check=True,
    )
    return root


@pytest.fixture(scope="session")
def tiny_original(tiny_root, tmp_path_factory) -> Path:
    """The original model of configs/tiny.yaml on tiny synth-indoor, trained once for every module that
    needs a trained checkpoint as it comes (its run folder `runs/synth-indoor/original`). Tests may add
    evaluation caches beside it (metrics-<sha12>.json) but never change it."""
    tmp = tmp_path_factory.mktemp("original")
    run_mtu(
        "train",
        "--config",
        ROOT / "configs" / "tiny.yaml",
        "--set",
        f"data.root={tiny_root}",
        "--set",
        "data.dataset=synth-indoor",
        "--set",
        f"out={tmp / 'runs'}",
        "--tracking-uri",
        f"sqlite:///{tmp / 'mlflow.db'}",
        cwd=tmp,
        check=True,
    )
    return tmp / "runs" / "synth-indoor" / "original"


MANY = ROOT / "tests" / "scripts" / "unlearn_many.py"


def run_many(runs: list[list], tmp: Path, nproc: int = 1, tag: str = "many", env=None, check=True, timeout=600) -> dict:
    """Several `mtu` commands (argument lists, each with --name) in ONE process per rank, so start-up is paid
    once (tests/scripts/unlearn_many.py): plain python for 1 rank, `accelerate launch` for more. Returns
    name -> {"rc", "error"?} and the launch's CompletedProcess under "_proc"."""
    spec, status = tmp / f"{tag}.json", tmp / f"{tag}-status.json"
    spec.write_text(json.dumps([[str(a) for a in argv] for argv in runs]))
    if nproc == 1:
        proc = subprocess.run(
            [sys.executable, str(MANY), str(spec), str(status)],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )
    else:
        proc = accelerate_launch([MANY, spec, status], nproc=nproc, cwd=tmp, env=env, check=check, timeout=timeout)
    assert status.is_file(), proc.stderr[-4000:]
    result = {**json.loads(status.read_text()), "_proc": proc}
    if check:
        failed = {k: v.get("error", v["rc"]) for k, v in result.items() if k != "_proc" and v["rc"]}
        assert not failed, failed
    return result


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())

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
    proc = subprocess.run([str(BIN / "mtu"), *map(str, args)], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mtu {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def accelerate_launch(script_args: list, nproc: int, cwd=None, timeout=600, env=None, check=True, config=None):
    """Start `nproc` real gloo ranks with `accelerate launch` (see launch/accelerate/cpu_2proc.yaml, or
    `config`, a file in launch/accelerate/). A launch that outlives `timeout` (a hang) raises
    subprocess.TimeoutExpired."""
    config = ROOT / "launch" / "accelerate" / (config or ("cpu_2proc.yaml" if nproc > 1 else "cpu_1proc.yaml"))
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--num_processes", str(nproc)]
    if nproc > 1:
        cmd += ["--main_process_port", str(_free_port())]
    proc = subprocess.run(cmd + [str(a) for a in script_args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
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
    run_mtu("data", "synth", "--out", root, "--train", 40, "--val", 16, "--height", 16, "--width", 24,
            "--shard-size", 8, "--workers", 2, check=True)
    return root


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())

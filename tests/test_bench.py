"""The benchmark suite (bench/suite.py) end to end in its quick mode, and bench/gpu.sh / --device cuda
refusing cleanly where no GPU is visible. No timing assertions: what is checked is that every figure is
produced, finite, with its goal, in one JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT

# every figure the issue asks for, spelled out here (not read from the suite) so a dropped one fails
GOALS = {
    "loader_over_step": (">=", 5.0),
    "iamu_step_overhead": ("<=", 0.15),
    "iamu_step_overhead_pieces": ("<=", 0.15),
    "step_time_2rank_over_1rank": ("<=", 0.6),
    "mlflow_overhead": ("<=", 0.02),
    "mlflow_tracker_share": ("<=", 0.02),
    "unlearn_over_retrain_iamu": ("<=", 0.05),
    "unlearn_over_retrain_neggrad_plus": ("<=", 0.05),
}
NO_GOAL = [
    "signals_sequential_over_batched_k2",
    "signals_sequential_over_batched_k4",
    "signals_sequential_over_batched_k6",
    "signals_sequential_over_batched_k8",
    "sharded_over_replicated_memory",
    "sharded_over_replicated_bytes",
    "sharded_over_replicated_time",
    "iamu_setup_over_epoch",
]
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}


@pytest.mark.slow
def test_quick_suite_writes_every_figure(tmp_path):
    out = tmp_path / "results" / "suite.json"
    proc = subprocess.run(
        [
            sys.executable,
            ROOT / "bench" / "suite.py",
            "--quick",
            "--methods",
            "iamu,neggrad_plus",
            "--out",
            out,
            "--workdir",
            tmp_path,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    figs = res["figures"]
    assert sorted(figs) == sorted([*GOALS, *NO_GOAL])
    for key, f in figs.items():
        assert isinstance(f["value"], float) and math.isfinite(f["value"]), (key, f)
        assert f["label"] in proc.stdout  # one table row per figure
    for key, (op, value) in GOALS.items():
        assert figs[key]["goal"] == {"op": op, "value": value}, key
        assert figs[key]["met"] == (figs[key]["value"] >= value if op == ">=" else figs[key]["value"] <= value)
    # the memory ratio of the sharded reduction is exact: half the reduced signals per rank at 2 ranks
    assert figs["sharded_over_replicated_memory"]["value"] == pytest.approx(0.5, abs=0.01)
    assert res["quick"] and res["device"] == "cpu"
    assert set(res["sections"]) == {"data", "signals", "iamu", "reduction", "ranks", "mlflow", "unlearn"}
    assert not list(tmp_path.glob("mtu-suite-*"))  # the work folder is removed


@pytest.mark.parametrize(
    "cmd",
    [["bash", ROOT / "bench" / "gpu.sh"], [sys.executable, ROOT / "bench" / "suite.py", "--device", "cuda", "--quick"]],
    ids=["gpu.sh", "suite --device cuda"],
)
def test_cuda_refused_without_a_gpu(tmp_path, cmd):
    proc = subprocess.run([str(c) for c in cmd], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=NO_GPU)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr


def test_suite_skip_names_a_section(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "suite.py"), "--quick", "--skip", "iamuu"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=NO_GPU,
    )
    assert proc.returncode == 2 and "--skip iamuu: not a section" in proc.stderr and "Traceback" not in proc.stderr

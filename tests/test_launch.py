"""The launchers in launch/: accelerate configs as Accelerate's own launcher reads them, torchrun really
starting N gloo ranks that mtu accepts, and the SLURM script's per-node arithmetic.

(That `launch/accelerate/cpu_2proc.yaml` really starts 2 gloo ranks is tested end to end in
test_stream.py::test_two_process_launch_sees_each_pair_once and test_runner.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import BIN, ROOT, read_json

CONFIGS = ROOT / "launch" / "accelerate"


def _launch_args(config: str, *extra: str):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / config), *extra, "script.py"])
    _validate_launch_command(args)  # merges the file into the arguments, as `accelerate launch` does
    return args


@pytest.mark.parametrize(
    "config, kind, stage",
    [
        ("cpu_1proc.yaml", "NO", None),
        ("cpu_2proc.yaml", "MULTI_GPU", None),
        ("gpu_1proc.yaml", "NO", None),
        ("gpu_1node.yaml", "MULTI_GPU", None),
        ("multinode.yaml", "MULTI_GPU", None),
        ("deepspeed_zero1.yaml", "DEEPSPEED", 1),
        ("deepspeed_zero2.yaml", "DEEPSPEED", 2),
    ],
)
def test_accelerate_configs_parse(config, kind, stage):
    raw = yaml.safe_load((CONFIGS / config).read_text())
    assert raw["distributed_type"] == kind and raw.get("mixed_precision") == "no"
    args = _launch_args(config, "--num_processes", "4")
    assert args.num_processes == 4  # the command line overrides the file (how `mtu sweep` sets the world size)
    assert bool(args.use_deepspeed) == (kind == "DEEPSPEED") and bool(args.multi_gpu) == (kind == "MULTI_GPU")
    if stage is not None:
        assert args.zero_stage == stage and raw["deepspeed_config"]["zero_stage"] == stage
        assert raw["deepspeed_config"]["offload_optimizer_device"] == "none"
    assert bool(args.use_cpu) == config.startswith("cpu_")
    if config == "multinode.yaml":
        assert args.num_machines == 2 and args.main_process_ip and args.main_process_port


@pytest.mark.slow
def test_torchrun_starts_n_gloo_ranks(tmp_path):
    proc = subprocess.run(
        [str(ROOT / "launch" / "torchrun.sh"), "2", str(ROOT / "tests" / "scripts" / "world_size.py"), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TORCHRUN": str(BIN / "torchrun"), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [read_json(tmp_path / f"rank{r}.json") for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert {r["sum"] for r in ranks} == {3.0} and {r["backend"] for r in ranks} == {"gloo"}


def test_slurm_script_gives_each_node_its_rank(tmp_path):
    # No SLURM here: `srun` runs the job step once per node with that node's SLURM_NODEID, as SLURM would,
    # and ACCELERATE=echo prints the launch line each node would run.
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text(
        '#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\n'
        'for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n "$@" || exit; done\n'
    )
    (shims / "scontrol").write_text("#!/bin/sh\necho node-a; echo node-b\n")
    (shims / "show-args").write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    for f in shims.iterdir():
        f.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{shims}:{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "GPUS_PER_NODE": "4",
        "ACCELERATE": "show-args",
    }
    proc = subprocess.run(
        [str(ROOT / "launch" / "slurm.sbatch"), "unlearn", "--method", "iamu", "--name", "a b"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert len(lines) == 2 and all(argv[0] == "launch" for argv in lines)
    for node, argv in enumerate(lines):
        opt = dict(zip(argv[1::2], argv[2::2]))
        assert opt["--config_file"] == "launch/accelerate/multinode.yaml" and opt["--num_machines"] == "2"
        assert opt["--num_processes"] == "8" and opt["--machine_rank"] == str(node)
        assert opt["--main_process_ip"] == "node-a" and opt["--main_process_port"] == "29500"
        assert argv[-7:] == ["-m", "mtu_dist.cli", "unlearn", "--method", "iamu", "--name", "a b"]

"""The command line that starts one `mtu` sub-command on W ranks of this machine.

Named launchers map to the files in `launch/accelerate/` of the source tree; any other value is taken
as the path of an accelerate config file. One rank runs `python -m mtu_dist.cli` directly (what
`cpu_1proc.yaml` does, without paying for a launcher process), except under DeepSpeed, whose engine
is set up by the launcher even for one rank. `--main_process_port 0` lets Accelerate pick a free
port, so cells never collide on a port.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from mtu_dist.errors import UserError

LAUNCH_DIR = Path(__file__).resolve().parents[3] / "launch" / "accelerate"
NAMED = {
    "cpu": "cpu_2proc.yaml",
    "gpu": "gpu_1node.yaml",
    "deepspeed_zero1": "deepspeed_zero1.yaml",
    "deepspeed_zero2": "deepspeed_zero2.yaml",
}
CLI = ["-m", "mtu_dist.cli"]


def accelerate_config(launcher: str, base: Path) -> Path | None:
    """The accelerate config file a launcher name stands for (None for torchrun)."""
    if launcher == "torchrun":
        return None
    path = LAUNCH_DIR / NAMED[launcher] if launcher in NAMED else (base / launcher).resolve()
    if not path.is_file():
        raise UserError(
            f"field 'launcher': {launcher!r} is neither one of {sorted([*NAMED, 'torchrun'])} "
            f"nor an accelerate config file ({path} not found)"
        )
    return path


def _is_deepspeed(config: Path) -> bool:
    return (yaml.safe_load(config.read_text()) or {}).get("distributed_type") == "DEEPSPEED"


def command(launcher: str, base: Path, world: int, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) for `mtu ARGS` on `world` ranks."""
    py = sys.executable
    config = accelerate_config(launcher, base)
    if world == 1 and (config is None or not _is_deepspeed(config)):
        # what `use_cpu: true` in an accelerate config does: stay on the CPU even where a GPU is visible
        return [py, *CLI, *args], {"ACCELERATE_USE_CPU": "true"} if launcher == "cpu" else {}
    if config is None:
        return [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), *CLI, *args], {}
    return [
        py,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_machines",
        "1",
        "--num_processes",
        str(world),
        "--main_process_port",
        "0",
        *CLI,
        *args,
    ], {}

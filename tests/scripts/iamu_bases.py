"""Launched on 1 or N ranks by a test: iamu's task bases of the tiny float64 model, in both reduction modes.

argv: OUT OPTIONS_JSON. The same global retain batches on any world size (rank r takes its contiguous
share of each). Writes OUT/<reduction>-rank<r>.safetensors (every kept basis, key "<task>/<layer>") and
OUT/<reduction>-rank<r>.json (basis bytes, setup logs, the layers this rank owns rows of).
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mtu_dist.config import RunConfig
from mtu_dist.distributed.runtime import make_accelerator
from mtu_dist.methods.base import StepContext
from mtu_dist.methods.iamu import Iamu
from mtu_dist.model import build_model

TASKS = ("seg", "depth", "normal")


def global_batch(n: int, seed: int, h: int = 16, w: int = 24) -> dict:
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, 5, (n, h, w), generator=g)
    depth = torch.rand(n, 1, h, w, generator=g) + 0.5
    normal = F.normalize(torch.randn(n, 3, h, w, generator=g), dim=1)
    mask = torch.rand(n, len(TASKS), generator=g) < 0.85
    mask[0] = True
    return {
        "image": torch.rand(n, 3, h, w, generator=g),
        "seg": seg,
        "depth": depth,
        "normal": normal,
        "mask": mask,
        "valid": torch.ones(n, dtype=torch.bool),
    }


def shares(world: int, rank: int, n_batches: int) -> list[dict]:
    """This rank's contiguous share of each global retain batch."""
    return [{k: v.tensor_split(world)[rank] for k, v in global_batch(8, 100 + b).items()} for b in range(n_batches)]


def setup_bases(world: int, rank: int, reduction: str, options: dict) -> tuple[Iamu, dict]:
    """Iamu.setup on the tiny float64 model (seed 0); returns the method and its setup logs."""
    torch.manual_seed(0)
    cfg = RunConfig().model.model_copy(update={"width": 8, "head_width": 8, "dtype": "float64"})
    model = build_model(cfg, TASKS, 5).train()
    config = RunConfig().unlearn.model_copy(update={"signal_engine": "sequential", "reduction": reduction})
    ctx = StepContext(
        model=model, tasks=TASKS, world=world, alpha=0.5, step=0, rank=rank, targets=TASKS, config=config, seed=0
    )
    method = Iamu(options)
    logs = method.setup(ctx, iter(shares(world, rank, method.opts.subspace_batches)), None)
    return method, logs


def main(out: Path, options: dict) -> None:
    acc = make_accelerator()
    rank, world = acc.process_index, acc.num_processes
    for reduction in ("replicated", "sharded"):
        method, logs = setup_bases(world, rank, reduction, options)
        owned = sorted({pc.index for pc in method.my_pieces(method.projected_idx)})
        save_file(
            {f"{t}/{i}": b.contiguous() for t, per_i in method.bases.items() for i, b in per_i.items()},
            out / f"{reduction}-rank{rank}.safetensors",
        )
        (out / f"{reduction}-rank{rank}.json").write_text(
            json.dumps(
                {
                    "basis_bytes": method.basis_bytes(),
                    "logs": {k: float(v) for k, v in logs.items()},
                    "owned": owned,
                    "sketched": [i for i in method.projected_idx if method.sketched(i)],
                }
            )
        )
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))

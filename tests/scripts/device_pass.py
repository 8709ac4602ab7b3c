"""The device pass (tests/device_audit.py) on every rank of an `accelerate launch`: each named method
from an original checkpoint, then an evaluation, each under the audit; every rank writes what its
audit found to OUT/rank<r>.json.

usage: device_pass.py DATA_ROOT OUT CHECKPOINT REQUEST METHOD[,METHOD...] [--set section.field=value ...]
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the audit module

from device_audit import eval_pass, unlearn_pass  # noqa: E402

root, out, ckpt, request, methods = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5].split(",")
sets = sys.argv[7::2]
audits = {m: unlearn_pass(root, out, ckpt, request, m, sets) for m in methods}
audits["eval"] = eval_pass(root, out, ckpt, request)
rank = int(os.environ.get("RANK", "0"))
(out / f"rank{rank}.json").write_text(
    json.dumps({k: {"violations": a.violations, "collectives": dict(a.collectives)} for k, a in audits.items()})
)

import torch.distributed as dist  # noqa: E402

if dist.is_initialized():
    # a clean end: both ranks done, then the group torn down before the interpreter exits (left to exit,
    # gloo's threads once aborted one rank with "terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()

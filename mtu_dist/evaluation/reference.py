"""A checkpoint's evaluation on a forget request, cached beside the checkpoint.

`mtu eval --ckpt C --request R` and `mtu unlearn` (which needs the original model's numbers on its
request for UIS and Delta_m) write `metrics-<sha12>.json` and `losses-<sha12>.json` into the
checkpoint folder (sha12: the first 12 hex digits of the request's `eval_key`, its sha256 unless a
lineage step keeps earlier requests' instances out of the retain sample too); for the checkpoint's own
request, or none, the names are `metrics.json` / `losses.json`, as `finish` writes them. A cached
evaluation is reused only while its `eval` fingerprint (model sha256, request sha256, retain sample
size) matches; anything else is evaluated again, so a retrained or replaced checkpoint never
serves stale numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

from mtu_dist.runner.runinfo import git_commit
from mtu_dist.utils.fileio import atomic_write_json


def eval_paths(folder: Path, meta: dict, request_sha: str | None) -> tuple[Path, Path]:
    """Where the evaluation of the checkpoint in `folder` on the request `request_sha` is kept."""
    if request_sha is None or request_sha == meta.get("request_eval_key", meta.get("request_sha256")):
        return folder / "metrics.json", folder / "losses.json"
    return folder / f"metrics-{request_sha[:12]}.json", folder / f"losses-{request_sha[:12]}.json"


def fingerprint(meta: dict, request_sha: str | None, retain_sample: int) -> dict:
    """What an evaluation depends on: the weights, the request (forget/retain splits), the sample size."""
    return {
        "model_sha256": meta["sha256"]["model.safetensors"],
        "request_sha256": request_sha,
        "retain_sample": retain_sample,
    }


def load_cached(folder: Path, meta: dict, request_sha: str | None, retain_sample: int) -> tuple[dict, dict] | None:
    """(report, losses) of a valid cached evaluation, or None (absent, unreadable or stale)."""
    metrics_path, losses_path = eval_paths(folder, meta, request_sha)
    try:
        report = json.loads(metrics_path.read_text())
        losses = json.loads(losses_path.read_text())
    except (OSError, ValueError):
        return None
    if report.get("eval") != fingerprint(meta, request_sha, retain_sample):
        return None
    return report, losses


def write_eval(s, folder: Path, meta: dict, splits: dict, losses: dict, request=None) -> tuple[Path, dict]:
    """Write an evaluation (on `request`, default the session's) beside the checkpoint (rank 0). Over the
    checkpoint's own metrics.json, the run's other records (time, stop reason, unlearning scores) are kept."""
    request = request or s.request
    sha = request.eval_key if request else None
    metrics_path, losses_path = eval_paths(folder, meta, sha)
    m = s.manifest
    report = {
        "run": {
            "command": "eval",
            "checkpoint": str(folder),
            "dataset": m.dataset,
            "tasks": list(m.tasks),
            "num_classes": m.num_classes,
            "world_size": s.world,
            "git_commit": git_commit(),
            "request_sha256": sha,
        },
        "eval": fingerprint(meta, sha, s.cfg.eval.retain_sample),
        "splits": splits,
    }
    if metrics_path.name == "metrics.json" and metrics_path.is_file():
        try:
            previous = json.loads(metrics_path.read_text())
        except ValueError:
            previous = {}
        if previous.get("eval") != report["eval"]:
            previous.pop("unlearning", None)  # scored on other numbers: `mtu score` recomputes it
        report = {**previous, "eval": report["eval"], "splits": splits}
    atomic_write_json(metrics_path, report)
    atomic_write_json(losses_path, losses)
    return metrics_path, report


def reference_eval(s, ckpt: str, request=None) -> tuple[dict, dict] | None:
    """The checkpoint `ckpt` evaluated on `request` (default the session's): the valid cache if there is one,
    else a fresh (collective) evaluation that is then cached. Rank 0 gets (report, losses); the
    other ranks take part in the evaluation and get None."""
    from mtu_dist.evaluation.evaluate import evaluate
    from mtu_dist.runner.checkpoint import read_state
    from mtu_dist.runner.unlearn import load_original

    meta = read_state(ckpt)
    folder = Path(meta["_folder"])
    request = request or s.request
    cached = load_cached(folder, meta, request.eval_key, s.cfg.eval.retain_sample) if s.is_main else None
    if _broadcast_flag(s, cached is not None):
        return cached
    model, _ = load_original(s, ckpt)
    results = evaluate(model, s, request)
    if not s.is_main:
        return None
    path, report = write_eval(s, folder, meta, results["splits"], results["losses"], request)
    print(f"evaluated {folder} on request {request.eval_key[:12]}: cached in {path}")
    return report, results["losses"]


def _broadcast_flag(s, flag: bool) -> bool:
    """Rank 0's answer on every rank (an evaluation is collective: all ranks must agree to run it)."""
    if s.world == 1:
        return flag
    import torch.distributed as dist

    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])

"""What every command sets up: accelerator, resolved config, data, request, run folder, tracker."""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mtu_dist.compliance.request import ForgetRequest
from mtu_dist.config import RunConfig, dump
from mtu_dist.data.manifest import Manifest, load_manifest
from mtu_dist.distributed.runtime import make_accelerator, zero_stage
from mtu_dist.errors import UserError
from mtu_dist.reporting.tracking import Tracker, check_reachable, flatten, resolve_uri
from mtu_dist.runner.runclaim import claim_run_dir, record_mlflow_run
from mtu_dist.runner.runinfo import git_commit
from mtu_dist.utils.fileio import atomic_write_text

if TYPE_CHECKING:
    from accelerate import Accelerator

    from mtu_dist.compliance.lineage import Lineage


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # = use_deterministic_algorithms(True, warn_only=True) for eager ops; that one also imports
        # torch._inductor (~1.2 s per process) to set a compiler flag, and nothing here is compiled
        torch.set_deterministic_debug_mode("warn")


@dataclass
class Session:
    cfg: RunConfig
    command: str
    run_dir: Path
    manifest: Manifest
    request: ForgetRequest | None
    acc: Accelerator
    tracker: Tracker
    extra_params: dict = field(default_factory=dict)
    ledger: dict | None = None  # consumed supervision pairs, set by the training/unlearning loop
    lineage: Lineage | None = None  # an unlearning run's step of its lineage
    trajectory: dict | None = None  # an unlearning run's trajectory (trajectory.py), when recorded

    @property
    def forget_entries(self) -> dict:
        """What this run forgets: the lineage step's new pairs (repeats skipped), else the request's."""
        return self.lineage.new if self.lineage else self.request.entries

    @property
    def forgotten_entries(self) -> dict:
        """What no retain step may see: everything forgotten along the lineage, this request included."""
        return self.lineage.cumulative if self.lineage else self.request.entries

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def local_batch(self, global_batch: int, what: str) -> int:
        if global_batch % self.world:
            raise UserError(f"config field '{what}' = {global_batch} must be divisible by the world size {self.world}")
        local, workers = global_batch // self.world, max(self.cfg.data.workers, 1)
        if local % workers:
            raise UserError(
                f"config field '{what}' = {global_batch}: the per-rank batch {local} must be divisible "
                f"by data.workers = {workers}"
            )
        return local

    def barrier(self) -> None:
        self.acc.wait_for_everyone()


def open_session(
    cfg: RunConfig,
    command: str,
    run_name: str,
    *,
    manifest: Manifest | None = None,
    request: ForgetRequest | None = None,
    resume: bool = False,
    overwrite: bool = False,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    extra_params: dict | None = None,
    run_dir: Path | None = None,
    lineage: Lineage | None = None,
) -> Session:
    """Validate everything the command needs before anything is written. `manifest` and `request` come
    parsed (the manifest is loaded from the config when not given). `run_dir` given = write beside an
    existing checkpoint (eval) instead of creating a run folder. With `lineage` (an unlearning step) the
    request is evaluated with earlier-forgotten instances out of the retain sample, and the MLflow run
    nests under the parent step's unless MTU_PARENT_RUN_ID groups it elsewhere."""
    if tracking_uri:
        cfg.tracking.uri = tracking_uri
    acc = make_accelerator()
    seed_everything(cfg.seed, cfg.deterministic)
    if manifest is None:
        manifest = load_manifest(cfg.data.dataset, cfg.data.root)
    if lineage is not None:
        request = lineage.evaluation_request(request)
    if cfg.tracking.enabled:
        check_reachable(resolve_uri(cfg.tracking.uri))  # on every rank, before any rank waits on another
    fresh = run_dir is None
    run_dir = Path(run_dir or Path(cfg.out) / manifest.dataset / run_name)
    if fresh and run_dir.exists() and not (resume or overwrite):  # checked on every rank: no rank waits alone
        raise UserError(f"{run_dir}: run folder exists; pass --resume to continue it or --overwrite to redo it")
    acc.wait_for_everyone()  # every rank has checked before rank 0 creates anything
    # held until the process ends: a concurrent run into this folder fails here, before it touches anything
    created = fresh and claim_run_dir(acc, run_dir, may_exist=resume or overwrite)
    try:
        return _open(
            cfg,
            command,
            run_name,
            acc,
            manifest,
            request,
            run_dir,
            fresh=fresh,
            resume=resume,
            overwrite=overwrite,
            parent_run_id=parent_run_id,
            extra_params=extra_params,
            lineage=lineage,
        )
    except BaseException:
        if created and acc.is_main_process:  # a run that never started leaves no folder behind (a later
            shutil.rmtree(run_dir, ignore_errors=True)  # run would otherwise need --overwrite)
        raise


def _open(
    cfg: RunConfig,
    command: str,
    run_name: str,
    acc: Accelerator,
    manifest: Manifest,
    request: ForgetRequest | None,
    run_dir: Path,
    *,
    fresh: bool,
    resume: bool,
    overwrite: bool,
    parent_run_id: str | None,
    extra_params: dict | None,
    lineage: Lineage | None,
) -> Session:
    if fresh and acc.is_main_process:
        if overwrite and not resume:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # final/ is replaced atomically at the end
        if not (resume and (run_dir / "config.yaml").is_file()):  # a resumed run keeps the config it began with
            atomic_write_text(run_dir / "config.yaml", dump(cfg))  # (its checkpoint refuses a changed one)
    acc.wait_for_everyone()
    tags = {"mtu.command": command}
    parent_run_id = parent_run_id or os.environ.get("MTU_PARENT_RUN_ID")
    if lineage is not None:
        lineage.steps[-1]["run"] = str(run_dir.resolve())
        tags |= {"mtu.lineage.depth": lineage.depth, "mtu.lineage.root_sha256": lineage.root["model_sha256"]}
        if lineage.parent_run_id:
            tags["mtu.lineage.parent_run_id"] = lineage.parent_run_id
        if lineage.depth > 1 and not parent_run_id:
            parent_run_id = lineage.parent_run_id  # the chain as nested runs
    tracker = Tracker(
        enabled=acc.is_main_process and cfg.tracking.enabled,
        uri=cfg.tracking.uri,
        experiment=cfg.tracking.experiment or manifest.dataset,
        run_name=run_name,
        parent_run_id=parent_run_id,
        tags=tags,
    )
    if fresh and acc.is_main_process:
        record_mlflow_run(run_dir, tracker)
    s = Session(cfg, command, run_dir, manifest, request, acc, tracker, extra_params or {}, lineage=lineage)
    params = {
        **flatten(cfg.model_dump(mode="json")),
        "git_commit": git_commit(),
        "world_size": acc.num_processes,
        "deepspeed_stage": "none" if zero_stage(acc) is None else zero_stage(acc),
        "command": command,
        "request_sha256": request.sha256 if request else "none",
        "request_setting": request.setting if request else "none",
        **s.extra_params,
    }
    tracker.log_params(params)
    if (run_dir / "config.yaml").is_file():
        tracker.log_artifact(run_dir / "config.yaml")
    if request and request.path:
        tracker.log_artifact(request.path)
    return s


def run_info(s: Session) -> dict:
    """Recorded in every checkpoint's state.json: enough to rebuild the model and trace its data."""
    m = s.manifest
    return {
        "dataset": m.dataset,
        "data_sha256": m.data_sha256,
        "tasks": list(m.tasks),
        "num_classes": m.num_classes,
        "world_size": s.world,
        "deepspeed_stage": zero_stage(s.acc),
        "git_commit": git_commit(),
        "command": s.command,
        "request_sha256": s.request.sha256 if s.request else None,
        "request_path": str(Path(s.request.path).resolve()) if s.request and s.request.path else None,
        "request_pairs_sha256": s.request.pairs_sha256 if s.request else None,
        "request_eval_key": s.request.eval_key if s.request else None,
        **s.extra_params,
        **({"lineage": s.lineage.record(m)} if s.lineage else {}),
    }

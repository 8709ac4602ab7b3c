"""`mtu sweep GRID.yaml`: run every cell of a scaling study as a child run of one MLflow parent.

The sweep folder (default `sweeps/<name>`) holds everything the sweep makes, so a sweep is resumable
and removable as a unit:

    sweep.json               the parent run (id, tracking URI, experiment), reused on every re-run
    data/n<N>/<dataset>/     synthetic shards of train size N (`mtu data synth --train N`), made once
    requests/n<N>-f<F>.yaml  the forget request of data size N and fraction F (`mtu forget make`)
    runs/<dataset>/<cell>/   the run folders (`mtu train` / `mtu unlearn` outputs)
    cells/<cell>.json        per cell: status, spec sha256, MLflow run id
    logs/<cell>.log          the cell's stdout and stderr

Each cell is a subprocess started by the grid's launcher (see `launchers.py`) with
`MTU_PARENT_RUN_ID` set, so its run nests under the parent; the driver then tags the run with the
cell's coordinates (`mtu.sweep.*`), which is what `mtu compare` reads. A cell is *finished* when its
`final/metrics.json` exists and its record matches the spec it would run now — the sha256 of the
resolved config, world size, launcher, dataset manifest, forget request and, for unlearning, the
models it starts from and is scored against — under the same parent run. Finished cells are skipped; a
changed spec reruns the
cell (and, through the original model's sha256, the unlearning cells that start from it). A failed
cell is reported and the sweep goes on; the sweep exits non-zero at the end, listing them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mtu_dist.config import load_config
from mtu_dist.errors import UserError
from mtu_dist.reporting.tracking import Tracker, check_reachable, flatten, mlflow_client, resolve_uri
from mtu_dist.studies.sweep import launchers
from mtu_dist.studies.sweep.grid import Cell, Grid, load_grid, original_world_size, plan
from mtu_dist.utils.fileio import atomic_write_json, ensure_writable_dir, sha256_file
from mtu_dist.utils.lifecycle import run_child


@dataclass
class Sweep:
    grid: Grid
    base: Path  # the grid file's folder: relative paths in the grid resolve against it
    folder: Path
    uri: str
    launcher: str

    def config_args(self) -> list[str]:
        return [a for f in self.grid.config for a in ("--config", str((self.base / f).resolve()))]

    def data_root(self, n: int) -> Path:
        if n in self.grid.data_roots:
            return (self.base / self.grid.data_roots[n]).resolve()
        return self.folder / "data" / f"n{n}"

    def request(self, n: int, fraction: float) -> Path:
        return self.folder / "requests" / f"n{n}-f{fraction:g}.yaml"

    def run_dir(self, cell: Cell, dataset: str) -> Path:
        return self.folder / "runs" / dataset / cell.name

    def sets(self, cell: Cell) -> list[str]:
        extra = [
            f"data.root={self.data_root(cell.train_size)}",
            f"data.dataset={self.grid.dataset}",
            f"out={self.folder / 'runs'}",
        ]
        return [*self.grid.set, *extra, *([f"unlearn.method={cell.method}"] if cell.kind == "unlearn" else [])]


def run_sweep(grid_path: str, *, out: str | None, tracking_uri: str | None, dry_run: bool = False) -> None:
    grid, base = load_grid(grid_path)
    cfg = load_config([str((base / f).resolve()) for f in grid.config], grid.set)  # bad base config: fail now
    if not cfg.tracking.enabled:
        raise UserError(
            f"{grid_path}: tracking.enabled is false, but a sweep's cells are recorded and compared through MLflow"
        )
    sw = Sweep(
        grid,
        base,
        Path(out or Path("sweeps") / grid.name).resolve(),
        resolve_uri(tracking_uri or grid.tracking_uri or cfg.tracking.uri),
        grid.launcher,
    )
    launchers.accelerate_config(grid.launcher, base)  # unknown launcher: fail before any work
    cells = plan(grid)
    if dry_run:
        return _print_plan(sw, cells)
    check_reachable(sw.uri)
    ensure_writable_dir(sw.folder)
    manifests = {n: _ensure_data(sw, n) for n in grid.axes.train_size}
    for n, m in manifests.items():
        for f in grid.axes.forget_fraction:
            _ensure_request(sw, m, n, f)
    experiment = cfg.tracking.experiment or next(iter(manifests.values())).dataset
    client, parent = _parent_run(sw, grid_path, experiment)
    print(f"sweep {grid.name}: {len(cells)} cells in {sw.folder}; MLflow parent run {parent} ({sw.uri})")
    failed, status = [], "KILLED"  # what the parent says if the driver itself is interrupted
    try:
        for i, cell in enumerate(cells, 1):
            why = _run_or_skip(sw, cell, manifests[cell.train_size], client, parent, f"[{i}/{len(cells)}]")
            if why:
                failed.append(f"{cell.name} ({why})")
        status = "FAILED" if failed else "FINISHED"
        _log_summary(client, sw.uri, parent)
    finally:
        client.set_terminated(parent, status)
    print(f"compare: mtu compare --sweep {sw.folder}")
    if failed:
        raise UserError(
            f"sweep {grid.name}: {len(failed)} of {len(cells)} cells failed (logs in {sw.folder / 'logs'}): "
            + "; ".join(failed)
        )


def _ensure_data(sw: Sweep, n: int):
    """The dataset of train size n: a given root (checked) or synthetic shards made once per spec."""
    from mtu_dist.data.manifest import load_manifest

    root = sw.data_root(n)
    if n in sw.grid.data_roots:
        m = load_manifest(sw.grid.dataset, root)
        if m.split("train").num_samples != n:
            raise UserError(
                f"field 'data_roots.{n}': {root} holds {m.split('train').num_samples} train samples, not {n}"
            )
        return m
    from mtu_dist.data.synth import SPECS

    if sw.grid.dataset not in SPECS:
        raise UserError(
            f"field 'data_roots': {sw.grid.dataset!r} is not a synthetic dataset ({', '.join(sorted(SPECS))}), "
            f"so train size {n} needs an existing dataset root under data_roots"
        )
    spec = {"dataset": sw.grid.dataset, "train": n, **sw.grid.synth.model_dump()}
    spec_file = root / "synth.json"
    if (
        (root / sw.grid.dataset / "manifest.json").is_file()
        and spec_file.is_file()
        and json.loads(spec_file.read_text()) == spec
    ):
        return load_manifest(sw.grid.dataset, root)
    from mtu_dist.data.synth_cmd import synth

    s = sw.grid.synth
    print(f"data: synthesizing {sw.grid.dataset} with {n} train samples into {root}")
    synth(
        [sw.grid.dataset],
        root,
        train=n,
        val=s.val,
        test=0,
        height=s.height,
        width=s.width,
        seed=s.seed,
        shard_size=s.shard_size,
        workers=s.workers or os.cpu_count() or 1,
        overwrite=True,
        progress=lambda *_: None,
    )
    atomic_write_json(spec_file, spec)
    return load_manifest(sw.grid.dataset, root)


def _ensure_request(sw: Sweep, manifest, n: int, fraction: float) -> None:
    """`mtu forget make` for (n, fraction); kept as is when the file already holds exactly that draw."""
    from mtu_dist.compliance.request import load_request, make_request, write_request

    g, path = sw.grid, sw.request(n, fraction)
    raw = make_request(manifest, fraction=fraction, setting=g.setting, tasks=g.tasks, seed=g.request_seed)
    if not (path.is_file() and yaml.safe_load(path.read_text()) == raw):
        write_request(raw, path, overwrite=True)
    load_request(path, manifest)


def _parent_run(sw: Sweep, grid_path: str, experiment: str):
    """The sweep's parent run: the one recorded in sweep.json if it is still in this store, else a new one."""
    from mlflow.exceptions import MlflowException

    record_path = sw.folder / "sweep.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    client = mlflow_client(sw.uri)
    if record.get("tracking_uri") == sw.uri:
        try:
            run = client.get_run(record["parent_run_id"])
            if run.info.lifecycle_stage == "active":
                client.update_run(run.info.run_id, status="RUNNING")
                _log_grid(client, run.info.run_id, grid_path)
                return client, run.info.run_id
        except MlflowException:
            pass
        print(
            f"note: parent run {record['parent_run_id']} is gone from {sw.uri}; starting a new one (every cell reruns)"
        )
    parent = Tracker(
        enabled=True,
        uri=sw.uri,
        experiment=experiment,
        run_name=sw.grid.name,
        tags={"mtu.command": "sweep", "mtu.sweep.folder": str(sw.folder)},
    )
    parent.log_params({f"sweep.{k}": v for k, v in flatten(sw.grid.model_dump(mode="json")).items()})
    _log_grid(client, parent.run_id, grid_path)
    atomic_write_json(
        record_path,
        {"parent_run_id": parent.run_id, "tracking_uri": sw.uri, "experiment": experiment, "name": sw.grid.name},
    )
    return client, parent.run_id


SUMMARY = (
    "uis",
    "mia_auc",
    "gap_retrain",
    "cost_ratio",
    "time/unlearn_s",
    "time/train_s",
    "time/step_s",
    "throughput/samples_per_s",
)  # the cell metrics the parent summarises per method


def summary_metrics(runs) -> dict[str, float]:
    """`mean/<method>/<metric>` over the cells (finished runs) of each method (`train` for the training cells):
    the parent's own charts in MLflow, one bar each. `mtu compare` gives the per-cell tables and plots."""
    groups: dict[str, list] = {}
    for r in runs:
        if "mtu.sweep.kind" in r.data.tags:
            groups.setdefault(r.data.tags.get("mtu.sweep.method", r.data.tags["mtu.sweep.kind"]), []).append(r)
    out = {}
    for method, cells in groups.items():
        out[f"mean/{method}/cells"] = float(len(cells))
        for key in SUMMARY:
            values = [r.data.metrics[key] for r in cells if key in r.data.metrics]
            if values:
                out[f"mean/{method}/{key.replace('/', '_')}"] = sum(values) / len(values)
    return out


def _log_summary(client, uri: str, parent: str) -> None:
    """The latest run of each cell, summarised on the parent (a cell rerun after a spec change counts once)."""
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent}'",
        order_by=["attributes.start_time ASC"],
        max_results=50000,
    )
    latest = {
        r.data.tags["mtu.sweep.cell"]: r
        for r in runs
        if r.info.status == "FINISHED" and "mtu.sweep.cell" in r.data.tags
    }
    tracker = Tracker(enabled=True, uri=uri, experiment="", run_name="", run_id=parent)
    tracker.log_scores(summary_metrics(latest.values()))
    tracker.flush()


def _log_grid(client, run_id: str, grid_path: str) -> None:
    text = Path(grid_path).read_bytes()
    client.set_tag(run_id, "mtu.sweep.grid_sha256", hashlib.sha256(text).hexdigest())
    client.log_artifact(run_id, str(grid_path))


def _origin(sw: Sweep, cell: Cell, dataset: str) -> Path:
    return sw.run_dir(Cell("train", original_world_size(sw.grid), cell.train_size), dataset)


def _retrain(sw: Sweep, cell: Cell, dataset: str) -> Path:
    return sw.run_dir(
        Cell("retrain", original_world_size(sw.grid), cell.train_size, cell.forget_fraction, "retrain"), dataset
    )


def _needs(sw: Sweep, cell: Cell, dataset: str) -> list[Path]:
    """The run folders an unlearning cell starts from or is scored against."""
    if cell.kind != "unlearn":
        return []
    return [_origin(sw, cell, dataset), *([_retrain(sw, cell, dataset)] if sw.grid.retrain else [])]


def _model_sha(run_dir: Path) -> str:
    return json.loads((run_dir / "final" / "state.json").read_text())["sha256"]["model.safetensors"]


def _spec(sw: Sweep, cell: Cell, manifest) -> dict:
    """Everything that decides a cell's result; its sha256 says whether a finished cell is still valid."""
    cfg = load_config([str((sw.base / f).resolve()) for f in sw.grid.config], sw.sets(cell)).model_dump(mode="json")
    # where results are logged does not change them; a training run does not read the unlearn section
    drop = {"tracking"} | ({"unlearn"} if cell.kind != "unlearn" else set())
    spec = {
        "kind": cell.kind,
        "config": {k: v for k, v in cfg.items() if k not in drop},
        "world_size": cell.world_size,
        "launcher": sw.launcher,
        "manifest_sha256": sha256_file(manifest.root / "manifest.json"),
    }
    if cell.kind != "train":
        spec["request_sha256"] = sha256_file(sw.request(cell.train_size, cell.forget_fraction))
    spec["needs_model_sha256"] = [_model_sha(d) for d in _needs(sw, cell, manifest.dataset)]
    return spec


def _args(sw: Sweep, cell: Cell, dataset: str, resume: bool) -> list[str]:
    """The cell's `mtu` arguments. Only an interrupted (re)training resumes; anything else starts over."""
    common = [
        *sw.config_args(),
        *[a for s in sw.sets(cell) for a in ("--set", s)],
        "--tracking-uri",
        sw.uri,
        "--name",
        cell.name,
    ]
    if cell.kind == "train":
        return ["train", *common, "--resume" if resume else "--overwrite"]
    request = ["--request", str(sw.request(cell.train_size, cell.forget_fraction))]
    if cell.kind == "retrain":
        return ["retrain", *common, *request, "--resume" if resume else "--overwrite"]
    scored = ["--retrain", str(_retrain(sw, cell, dataset))] if sw.grid.retrain else []
    return ["unlearn", *common, *request, "--from", str(_origin(sw, cell, dataset)), *scored, "--overwrite"]


def _run_or_skip(sw: Sweep, cell: Cell, manifest, client, parent: str, tag: str) -> str | None:
    """Run one cell unless it is finished; returns why it failed, or None."""
    dataset = manifest.dataset
    record_path = sw.folder / "cells" / f"{cell.name}.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    missing = [d.name for d in _needs(sw, cell, dataset) if not (d / "final" / "state.json").is_file()]
    if missing:
        print(f"{tag} {cell.name}: not run: {', '.join(missing)} did not finish")
        return f"needs {', '.join(missing)}"
    spec = _spec(sw, cell, manifest)
    sha = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    final = sw.run_dir(cell, dataset) / "final" / "metrics.json"
    same = record.get("spec_sha256") == sha
    if same and record.get("status") == "done" and record.get("parent_run_id") == parent and final.is_file():
        print(f"{tag} {cell.name}: skipped (finished: run {record['mlflow_run_id'][:8]})")
        return None
    if record.get("status") == "done" and not same:
        print(f"{tag} {cell.name}: spec changed since it finished; running it again")
    resume = same and record.get("status") in ("running", "failed")
    argv, env = launchers.command(sw.launcher, sw.base, cell.world_size, _args(sw, cell, dataset, resume))
    atomic_write_json(
        record_path, {"status": "running", "spec_sha256": sha, "parent_run_id": parent, "command": argv, "spec": spec}
    )
    print(f"{tag} {cell.name}: running on {cell.world_size} rank(s) ...", flush=True)
    t0 = time.perf_counter()
    log = sw.folder / "logs" / f"{cell.name}.log"
    ensure_writable_dir(log.parent)
    with open(log, "w") as fh:
        env = {**os.environ, **env, "MTU_PARENT_RUN_ID": parent}  # the cell's run nests under the parent
        rc = run_child(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)  # an interrupt reaches the cell too
    wall = time.perf_counter() - t0
    if rc != 0 or not final.is_file():
        atomic_write_json(record_path, {**json.loads(record_path.read_text()), "status": "failed", "exit_code": rc})
        print(f"{tag} {cell.name}: FAILED (exit {rc}) after {wall:.1f} s: {_last_line(log)}  [log: {log}]")
        return f"exit {rc}"
    run_id = json.loads(final.read_text())["run"]["mlflow_run_id"]
    for k, v in {**cell.tags, "mtu.sweep.spec_sha256": sha}.items():
        client.set_tag(run_id, k, v)
    atomic_write_json(
        record_path, {**json.loads(record_path.read_text()), "status": "done", "mlflow_run_id": run_id, "wall_s": wall}
    )
    print(f"{tag} {cell.name}: done in {wall:.1f} s (run {run_id[:8]})")
    return None


def _last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][-300:] if lines else "(no output)"


def _print_plan(sw: Sweep, cells: list[Cell]) -> None:
    print(f"sweep {sw.grid.name}: {len(cells)} cells in {sw.folder}; tracking {sw.uri}")
    for cell in cells:
        record = sw.folder / "cells" / f"{cell.name}.json"
        status = json.loads(record.read_text()).get("status", "?") if record.is_file() else "pending"
        argv, env = launchers.command(
            sw.launcher, sw.base, cell.world_size, _args(sw, cell, sw.grid.dataset, resume=False)
        )
        print(f"{cell.name} [{status}]: {' '.join([*(f'{k}={v}' for k, v in env.items()), *argv])}")

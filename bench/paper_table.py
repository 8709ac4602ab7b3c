"""The paper-style benchmark: every method, tuned without peeking, on both synthetic benchmarks.

For each benchmark (synth-indoor: seg/depth/normal; synth-street: seg/depth) x setting (full; partial,
target seg) x seed, every registered method plus the original and the retrain, all child runs of one
MLflow parent run; `mtu report` then prints the table (mean +- std over seeds) and draws the plots.

    .venv/bin/python bench/paper_table.py                 # default size (see SIZES and bench/README.md, "Default size")
    .venv/bin/python bench/paper_table.py --quick         # tiny data, 1 seed, 2 trials (tests, CI)
    .venv/bin/mtu report --bench bench/results/paper_table

What a seed changes: the evaluation request (which instances are forgotten) and the unlearning RNG
(batch order, random labels). One original model per benchmark, trained once (seed 0), so the
spread over seeds is the spread over requests; each retrain starts from the same seed as the
original, so it differs from it only in the supervision it never saw.

Tuning (`mtu tune`, criterion in mtu_dist/studies/tune.py): one *dev* request per (benchmark, setting),
drawn first and with its own seed, so it is the same for every evaluation seed; each evaluation
request is drawn with `--exclude` of the dev request (disjoint instances, same setting and size).
Every method gets the same number of trials over its space in configs/tune_space.yaml, and the
chosen knobs are used unchanged on every evaluation request.

Resumable: the folder (`--out`, default bench/results/paper_table) keeps the parent run
(`paper_table.json`), the data, requests, tuning trials and run folders; a run whose record
(`cells/<name>.json`) holds the sha256 of the spec it would run now, under the same parent, is
skipped. Only in-process calls of the `mtu` commands: no per-run interpreter start-up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtu_dist.config import load_config  # noqa: E402
from mtu_dist.errors import UserError  # noqa: E402
from mtu_dist.utils.fileio import atomic_write_json, sha256_file  # noqa: E402

DATASETS = ("synth-indoor", "synth-street")
SETTINGS = {"full": None, "partial": ["seg"]}
DEV_SEED = 1000  # the dev request's seed: not an evaluation seed
TRAIN_SEED = 0  # the original's (and every retrain's) training seed
EXPERIMENT = "paper_table"
SUMMARY = ("uis", "mia_auc", "gap_retrain", "paper/cost_s")  # a row's scores the parent averages over seeds

# Sizes: data (synth flags), model and training (`benchmarks`: per benchmark, long enough and large
# enough to memorise the training scenes), eval, request fraction, seeds, trials per method (None: the
# space file's), the seeds that also get equal-forgetting runs, and their trajectories. `default` was
# sized from measured per-run costs (bench/README.md, "Paper table"): requests of 100 scenes (25% of
# 400), 200 val scenes for the attack and the val terms, 5 evaluation seeds.
SIZES = {
    "default": {
        "train": 400,
        "val": 200,
        "height": 24,
        "width": 32,
        "shard_size": 50,
        "config": {
            "model": {"width": 16, "head_width": 16},
            "train": {"global_batch": 16},
            "unlearn": {"forget_batch": 16, "retain_batch": 32},
            "eval": {"batch": 50, "retain_sample": 200},
        },
        # per benchmark, over `config`: what makes its original memorise its training scenes (bench/README.md)
        "benchmarks": {
            "synth-indoor": {"train": {"epochs": 120}},
            "synth-street": {
                "model": {"width": 32, "head_width": 32},
                "train": {"epochs": 200, "lr": 0.01, "weight_decay": 0.0},
            },
        },
        "fraction": 0.25,
        "seeds": [0, 1, 2, 3, 4],
        "trials": None,
        "steps": None,
        "datasets": list(DATASETS),
        "curve_seeds": 2,
        "trajectory_every": 1,  # runs reach their level in a few to tens of steps: a point per step
        "trajectory_sample": 48,
    },
    "quick": {
        "train": 32,
        "val": 16,
        "height": 16,
        "width": 24,
        "shard_size": 8,
        "config": {
            "model": {"width": 8, "head_width": 8},
            "train": {"epochs": 2, "global_batch": 8},
            "unlearn": {"forget_batch": 4, "retain_batch": 8},
            "eval": {"batch": 8, "retain_sample": 8},
        },
        "benchmarks": {},
        "fraction": 0.1,
        "seeds": [0],
        "trials": 2,
        "steps": 3,
        "datasets": ["synth-indoor"],
        "curve_seeds": 1,
        "trajectory_every": 1,
        "trajectory_sample": 8,
    },
}


class Bench:
    def __init__(self, a, size: dict):
        self.a, self.size = a, size
        self.out = Path(a.out).resolve()
        self.uri = a.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.out / 'mlflow.db'}"
        self.parent = None
        self.client = None
        self.counts = {"ran": 0, "skipped": 0}
        self.method_sets = list(getattr(a, "method_set", None) or [])
        if self.method_sets and not getattr(a, "methods", None):
            raise UserError("--method-set needs --methods: it makes a variant of the methods it names")

    # ---------------- configs and records ----------------

    def base(self, dataset: str) -> dict:
        conf = json.loads(json.dumps(self.size["config"]))
        for section, fields in self.size["benchmarks"].get(dataset, {}).items():
            conf.setdefault(section, {}).update(fields)
        # workers 0: the loader runs in the main process (no worker start per run; the data is small)
        conf.update(
            {
                "data": {"dataset": dataset, "root": str(self.out / "data"), "workers": 0},
                "out": str(self.out / "runs"),
                "tracking": {"experiment": EXPERIMENT},
            }
        )
        conf["unlearn"]["checkpoint_every"] = 0  # no resume points: a run is short, a killed one is redone
        return conf

    def train_cost(self, dataset: str) -> float:
        """A benchmark's relative training cost (epochs x conv width^2): what orders the units."""
        c = self.cfg(dataset)
        return c.train.epochs * c.model.width**2

    def cfg(self, dataset: str, sets=()):
        return load_config(overrides=list(sets), base=self.base(dataset))

    def done(self, name: str, spec: dict, final: Path) -> tuple[bool, str]:
        """(finished with this spec under this parent, spec sha256)."""
        sha = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
        path = self.out / "cells" / f"{name}.json"
        rec = json.loads(path.read_text()) if path.is_file() else {}
        ok = (
            rec.get("spec_sha256") == sha
            and rec.get("parent_run_id") == self.parent
            and (final / "metrics.json").is_file()
        )
        self.counts["skipped" if ok else "ran"] += 1
        if ok:
            print(f"  {name}: skipped (finished)")
        return ok, sha

    def record(self, name: str, sha: str, run_id: str | None, tags: dict, cost_s: float | None) -> None:
        from mtu_dist.reporting.tracking import Tracker

        if run_id:
            t = Tracker(enabled=True, uri=self.uri, experiment="", run_name="", run_id=run_id)
            t.set_name(name)  # unique in the experiment: run folders repeat across benchmarks (`original`)
            t.set_tags({f"mtu.paper.{k}": v for k, v in tags.items()})
            if cost_s is not None:
                t.log_scores({"paper/cost_s": cost_s})
            t.flush()
        atomic_write_json(
            self.out / "cells" / f"{name}.json",
            {"spec_sha256": sha, "parent_run_id": self.parent, "mlflow_run_id": run_id, "tags": tags},
        )

    def log_summary(self) -> None:
        """Per (benchmark, setting, method) the mean over seeds of each row's scores, on the parent as
        `mean/<benchmark>/<setting>/<method>/<score>` (its own charts in MLflow; `mtu report` makes the table)."""
        from mtu_dist.reporting.tracking import Tracker

        groups: dict[str, dict[str, list[float]]] = {}
        for path in sorted((self.out / "cells").glob("*.json")):
            rec = json.loads(path.read_text())
            tags = rec["tags"]
            if (
                rec["parent_run_id"] != self.parent
                or not rec["mlflow_run_id"]
                or tags.get("role") == "curve"
                or "setting" not in tags
            ):
                continue  # the originals' training runs and the equal-forgetting runs are no table rows
            metrics = self.client.get_run(rec["mlflow_run_id"]).data.metrics
            group = groups.setdefault(f"mean/{tags['benchmark']}/{tags['setting']}/{tags['method']}", {})
            for key in SUMMARY:
                if key in metrics:
                    group.setdefault(key.replace("paper/", ""), []).append(metrics[key])
        summary = {f"{g}/{k}": sum(v) / len(v) for g, scores in groups.items() for k, v in scores.items()}
        t = Tracker(enabled=True, uri=self.uri, experiment="", run_name="", run_id=self.parent)
        t.log_scores(summary)
        t.flush()

    # ---------------- the pipeline ----------------

    def run(self) -> None:
        """Data and the parent run here; then the originals, then every (benchmark, setting), as units
        run by `--jobs` worker processes (or in this process with --jobs 1); then the report."""
        self.open_parent()
        for ds in self.datasets:
            self.data(ds)
        t0 = time.perf_counter()
        status, walls = "FAILED", {}
        try:
            failed = self.units([f"{ds}:original" for ds in self.datasets], walls)
            if not failed:
                # the costliest benchmark's units first (longest-first keeps both workers busy to the end:
                # a unit's cost is mostly its 5 retrains)
                order = sorted(self.datasets, key=self.train_cost, reverse=True)
                failed = self.units([f"{ds}:{st}" for ds in order for st in self.a.settings], walls)
            status = "FAILED" if failed else "FINISHED"
            self.log_summary()
        finally:
            self.client.set_terminated(self.parent, status)
        wall = time.perf_counter() - t0
        print(f"\nbenchmark: {wall:.0f} s wall ({', '.join(f'{u} {w:.0f} s' for u, w in walls.items())})")
        atomic_write_json(self.out / "timing.json", {"wall_s": wall, "jobs": self.a.jobs, "units_s": walls})
        if failed:
            raise UserError(f"{len(failed)} unit(s) failed (logs in {self.out / 'logs'}): {', '.join(failed)}")
        from mtu_dist.reporting.report import report_command

        report_command(
            parent=self.parent, experiment=None, bench=None, tracking_uri=self.uri, out=str(self.out / "report")
        )

    def units(self, units: list[str], walls: dict) -> list[str]:
        """Run units (`DATASET:original` or `DATASET:SETTING`), `--jobs` at a time; the failed ones."""
        from concurrent.futures import ThreadPoolExecutor

        if self.a.jobs <= 1:
            for u in units:
                t = time.perf_counter()
                self.unit(u)
                walls[u] = time.perf_counter() - t
            return []
        with ThreadPoolExecutor(self.a.jobs) as pool:
            results = list(pool.map(self.spawn, units))
        walls.update({u: w for u, (_, w) in zip(units, results)})
        return [u for u, (rc, _) in zip(units, results) if rc != 0]

    def spawn(self, unit: str) -> tuple[int, float]:
        """One unit in a worker process (this script with --unit), its output in logs/<unit>.log."""
        import subprocess

        argv = [sys.executable, str(Path(__file__).resolve()), *self.argv, "--unit", unit, "--jobs", "1"]
        log = self.out / "logs" / f"{unit.replace(':', '-')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"{unit}: started (log: {log})", flush=True)
        t = time.perf_counter()
        with open(log, "w") as fh:
            rc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - t
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        print(
            f"{unit}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {wall:.0f} s: "
            f"{lines[-1][-200:] if lines else ''}",
            flush=True,
        )
        return rc, wall

    def unit(self, unit: str) -> None:
        from mtu_dist.methods import METHODS

        ds, _, what = unit.partition(":")
        manifest = self.data(ds)
        os.environ["MTU_PARENT_RUN_ID"] = self.parent
        try:
            origin = self.original(ds, manifest)
            if what == "original":
                return
            methods = self.a.methods or list(METHODS)
            dev = self.request(manifest, what, DEV_SEED, None)
            # the references first (they need no tuning): the memorisation figures are there early
            reqs = {seed: self.request(manifest, what, seed, dev) for seed in self.seeds}
            retrains = {seed: self.references(ds, what, seed, req, origin) for seed, req in reqs.items()}
            tuned = self.tune(ds, what, dev, origin, methods)
            for seed, req in reqs.items():
                self.cell(ds, what, seed, req, origin, retrains[seed], tuned, methods)
        finally:
            os.environ.pop("MTU_PARENT_RUN_ID", None)
        print(f"{unit}: {self.counts['ran']} runs made, {self.counts['skipped']} skipped")

    def attach(self) -> None:
        """Worker mode: the parent run the main process opened (paper_table.json)."""
        from mlflow import MlflowClient

        rec = json.loads((self.out / "paper_table.json").read_text())
        self.parent, self.uri = rec["parent_run_id"], rec["tracking_uri"]
        self.client = MlflowClient(self.uri)

    @property
    def datasets(self) -> list[str]:
        return self.a.datasets or self.size["datasets"]

    @property
    def seeds(self) -> list[int]:
        return self.a.seeds if self.a.seeds is not None else self.size["seeds"]

    @property
    def curve_seeds(self) -> list[int]:
        """The seeds whose requests also get every method's equal-forgetting run."""
        n = self.size["curve_seeds"] if self.a.curve_seeds is None else self.a.curve_seeds
        return self.seeds[:n]

    def open_parent(self) -> None:
        """The parent run recorded in paper_table.json if it is still in this store, else a new one."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        from mtu_dist.reporting.tracking import Tracker, check_reachable

        self.out.mkdir(parents=True, exist_ok=True)
        check_reachable(self.uri)
        path = self.out / "paper_table.json"
        rec = json.loads(path.read_text()) if path.is_file() else {}
        self.client = MlflowClient(self.uri)
        if rec.get("tracking_uri") == self.uri:
            try:
                run = self.client.get_run(rec["parent_run_id"])
                if run.info.lifecycle_stage == "active":
                    self.client.update_run(run.info.run_id, status="RUNNING")
                    self.parent = run.info.run_id
                    return
            except MlflowException:
                pass
        t = Tracker(
            enabled=True,
            uri=self.uri,
            experiment=EXPERIMENT,
            run_name=self.out.name,
            tags={"mtu.command": "paper_table", "mtu.paper.size": "quick" if self.a.quick else "default"},
        )
        t.log_params({"size": json.dumps(self.size), "datasets": " ".join(self.datasets)})
        self.parent = t.run_id
        atomic_write_json(path, {"parent_run_id": self.parent, "tracking_uri": self.uri, "experiment": EXPERIMENT})

    def data(self, dataset: str):
        from mtu_dist.data.synth_cmd import synth_once

        return synth_once(
            self.out / "data", dataset, {k: self.size[k] for k in ("train", "val", "height", "width", "shard_size")}
        )

    def original(self, dataset: str, manifest) -> Path:
        from mtu_dist.runner.commands import train_command

        folder = self.out / "runs" / dataset / "original"
        cfg = self.cfg(dataset, [f"seed={TRAIN_SEED}"])
        spec = {"config": _spec_config(cfg, training=True), "manifest": sha256_file(manifest.root / "manifest.json")}
        ok, sha = self.done(f"{dataset}-original", spec, folder / "final")
        if not ok:
            print(f"{dataset}: training the original")
            rep = train_command(cfg, name="original", resume=False, overwrite=True, tracking_uri=self.uri)
            self.record(
                f"{dataset}-original",
                sha,
                rep["run"]["mlflow_run_id"],
                {"role": "train", "benchmark": dataset},
                rep["time_s"],
            )
        return folder

    def request(self, manifest, setting: str, seed: int, dev: Path | None) -> Path:
        """The dev request (dev None) or an evaluation request disjoint from the dev request."""
        import yaml

        from mtu_dist.compliance.request import load_request, make_request, write_request

        name = f"{manifest.dataset}-{setting}-{'dev' if dev is None else f's{seed}'}.yaml"
        path = self.out / "requests" / name
        raw = make_request(
            manifest,
            fraction=self.size["fraction"],
            setting=setting,
            tasks=SETTINGS[setting],
            seed=seed,
            exclude=load_request(dev, manifest) if dev else None,
        )
        if not (path.is_file() and yaml.safe_load(path.read_text()) == raw):
            write_request(raw, path, overwrite=True)
        return path

    def tune(self, dataset: str, setting: str, dev: Path, origin: Path, methods: list[str]) -> Path:
        from mtu_dist.studies.tune import TuneJob, load_space, tune

        space = load_space(self.a.space, self.a.trials or self.size["trials"])
        if self.size["steps"]:  # quick mode: a tiny step budget, the same for every method
            space.fixed["unlearn.steps"] = self.size["steps"]
        out = self.out / "tune" / f"{dataset}-{setting}"
        print(f"{dataset} {setting}: tuning {len(methods)} methods x {space.trials} trials on {dev.name}")
        job = TuneJob(
            str(dev),
            str(origin),
            out,
            self.base(dataset),
            [],
            self.method_sets,
            self.uri,
            space,
            f"{dataset}-{setting}",
        )
        tune(job, methods, log=lambda msg: print("  " + msg))
        return out / "tuned.yaml"

    def references(self, dataset, setting, seed, req: Path, origin: Path) -> Path:
        """One evaluation request's references: its retrain (which scores itself: `mtu retrain --original`)
        and the original's row (`mtu eval --retrain`). Returns the retrain's run folder."""
        from mtu_dist.runner.commands import retrain_command

        print(f"{dataset} {setting} seed {seed}: {req.name}")
        req_sha = sha256_file(req)
        tags = {"benchmark": dataset, "setting": setting, "seed": seed}
        retrain = self.out / "runs" / dataset / f"retrain-{setting}-s{seed}"
        cfg = self.cfg(dataset, [f"seed={TRAIN_SEED}"])
        spec = {"config": _spec_config(cfg, training=True), "request": req_sha, "origin": _model_sha(origin)}
        ok, sha = self.done(f"{dataset}-{retrain.name}", spec, retrain / "final")
        if not ok:
            rep = retrain_command(
                cfg,
                request=str(req),
                name=retrain.name,
                resume=False,
                overwrite=True,
                tracking_uri=self.uri,
                original=str(origin),
            )
            self.record(
                f"{dataset}-{retrain.name}",
                sha,
                rep["run"]["mlflow_run_id"],
                {**tags, "role": "retrain", "method": "retrain"},
                rep["time_s"],
            )
        self.original_row(dataset, setting, seed, req, req_sha, origin, retrain, tags)
        return retrain

    def cell(self, dataset, setting, seed, req: Path, origin: Path, retrain: Path, tuned: Path, methods) -> None:
        """Per method its run with the tuned knobs and, on the curve seeds, its equal-forgetting run (the
        same knobs, stopped at the retrain's forget level, recording its trajectory)."""
        req_sha = sha256_file(req)
        tags = {"benchmark": dataset, "setting": setting, "seed": seed}
        level = _forget_level(retrain)
        for m in methods:
            self.method_run(dataset, setting, seed, req, req_sha, origin, retrain, tuned, m, tags)
            if seed in self.curve_seeds:
                self.method_run(dataset, setting, seed, req, req_sha, origin, retrain, tuned, m, tags, level)

    def method_run(self, dataset, setting, seed, req, req_sha, origin, retrain, tuned, m, tags, level=None) -> None:
        """A method's evaluation run (tuned knobs, the tuned stop rule), or with `level` its equal-forgetting
        run: the same knobs, stopped when every target task's forget pairs reach the retrain's `level`,
        a trajectory point every `trajectory_every` steps."""
        from mtu_dist.runner.commands import unlearn_command
        from mtu_dist.studies.tune import chosen_overrides

        sets = [*self.method_sets, *chosen_overrides(tuned, m), f"unlearn.method={m}", f"seed={seed}"]
        if level is not None:
            sets += self.curve_sets(level)
        cfg = self.cfg(dataset, sets)
        name = f"{m}-{setting}-s{seed}" + ("-curve" if level is not None else "")
        spec = {
            "config": _spec_config(cfg),
            "request": req_sha,
            "origin": _model_sha(origin),
            "retrain": _model_sha(retrain),
        }
        ok, sha = self.done(f"{dataset}-{name}", spec, self.out / "runs" / dataset / name / "final")
        if ok:
            return
        rep = unlearn_command(
            cfg,
            request=str(req),
            origin=str(origin),
            name=name,
            overwrite=True,
            tracking_uri=self.uri,
            retrain=str(retrain),
        )
        role = "method" if level is None else "curve"
        self.record(
            f"{dataset}-{name}", sha, rep["run"]["mlflow_run_id"], {**tags, "role": role, "method": m}, rep["time_s"]
        )
        u = rep["unlearning"]
        eq = u.get("equal_forgetting") or {}
        extra = (
            f", equal forgetting {'reached' if eq.get('reached') else 'NOT reached'} "
            f"(progress {eq.get('max_progress') or 0:.2f})"
            if level is not None
            else ""
        )
        print(
            f"  {name}: UIS {u['uis']['mean']:.4f}, MIA AUC {u['mia_auc']:.3f}, "
            f"{rep['time_s']:.1f} s ({rep['stop_reason'][:40]}){extra}"
        )

    def curve_sets(self, level: dict) -> list[str]:
        """The `--set` items that make a run its equal-forgetting run: stop at the retrain's forget `level`,
        a trajectory point every `--trajectory-every` (or the size's) steps on the size's sample."""
        return [
            "unlearn.stop_at=" + json.dumps(level),
            f"unlearn.trajectory_every={self.a.trajectory_every or self.size['trajectory_every']}",
            f"unlearn.trajectory_sample={self.size['trajectory_sample']}",
        ]

    def original_row(self, dataset, setting, seed, req: Path, req_sha: str, origin: Path, retrain: Path, tags) -> None:
        """The original model as a row of the table: `mtu eval --request R --retrain RETRAIN` scores it like
        a method that did nothing (cost 0), as a child run of its own; no unlearning run is made."""
        from mtu_dist.runner.commands import eval_command

        name = f"original-{setting}-s{seed}"
        spec = {"request": req_sha, "origin": _model_sha(origin), "retrain": _model_sha(retrain)}
        final = self.out / "runs" / dataset / "original" / "final"
        ok, sha = self.done(f"{dataset}-{name}", spec, final)
        if ok:
            return
        rep = eval_command(
            self.cfg(dataset), ckpt=str(origin), request=str(req), tracking_uri=self.uri, retrain=str(retrain)
        )
        self.record(
            f"{dataset}-{name}", sha, rep["mlflow_run_id"], {**tags, "role": "original", "method": "original"}, 0.0
        )


def _spec_config(cfg, training: bool = False) -> dict:
    """What decides a run's result: the config without tracking (and, for training, without unlearn), the
    method's options resolved (its defaults are part of the run)."""
    from mtu_dist.methods import resolved_options

    drop = {"tracking", "out"} | ({"unlearn"} if training else set())
    conf = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in drop}
    if not training:
        conf["unlearn"]["options"] = resolved_options(cfg.unlearn.method, cfg.unlearn.options)
    return conf


def _forget_level(run_dir: Path) -> dict[str, float]:
    """A finished run's primary metric per task on the request's forget pairs (the retrain's forget level)."""
    from mtu_dist.tasks import TASKS

    forget = json.loads((Path(run_dir) / "final" / "metrics.json").read_text())["splits"]["forget"]
    return {t: round(float(v[TASKS[t].primary]), 6) for t, v in forget.items()}


def _model_sha(run_dir: Path) -> str:
    return json.loads((Path(run_dir) / "final" / "state.json").read_text())["sha256"]["model.safetensors"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="tiny data, 1 seed, 2 trials per method (tests, CI)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "paper_table"), help="benchmark folder")
    ap.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///<out>/mlflow.db)"
    )
    ap.add_argument(
        "--datasets",
        nargs="+",
        choices=DATASETS,
        help="benchmarks (default: both; --quick: synth-indoor, whose three tasks give both settings kept tasks)",
    )
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--seeds", nargs="+", type=int, help="evaluation seeds (default: the size's)")
    ap.add_argument("--methods", nargs="+", help="registered methods (default: all)")
    ap.add_argument(
        "--method-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a variant of the methods given with --methods: this --set item in their tuning and runs (repeatable). "
        "Their rows in the folder are replaced (every run records its resolved config); running again "
        "without it brings the default back",
    )
    ap.add_argument("--trials", type=int, help="trials per method (default: the size's)")
    ap.add_argument("--space", help="search-space YAML (default: configs/tune_space.yaml)")
    ap.add_argument(
        "--curve-seeds",
        type=int,
        help="how many of the first evaluation seeds also get every method's equal-forgetting run "
        "(default: the size's)",
    )
    ap.add_argument(
        "--trajectory-every",
        type=int,
        help="steps between trajectory points of the equal-forgetting runs (default: the size's, 1; "
        "configs/tune_space_constant.yaml's runs take hundreds of steps)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the models are small, and on a shared machine more threads "
        "mostly wait on each other; also makes the numbers independent of the core count)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="worker processes, one unit (benchmark x setting) each (default 2: one per core)",
    )
    ap.add_argument("--unit", help=argparse.SUPPRESS)  # worker mode: DATASET:original or DATASET:SETTING
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    import torch

    from mtu_dist.reporting.tracking import end_open_runs
    from mtu_dist.utils.lifecycle import Terminated, raise_on_termination

    torch.set_num_threads(a.threads)
    raise_on_termination()  # SIGTERM unwinds like Ctrl-C: the parent run's `finally` runs
    status = "FAILED"
    try:
        bench = Bench(a, SIZES["quick" if a.quick else "default"])
        bench.argv = [x for x in (argv if argv is not None else sys.argv[1:])]
        if a.unit:
            bench.attach()
            bench.unit(a.unit)
        else:
            bench.run()
        status = "FINISHED"
    except UserError as e:
        print(f"paper_table: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        print("paper_table: interrupted", file=sys.stderr)
        return 130
    finally:
        end_open_runs(status)  # runs a unit opened and did not finish: never left RUNNING
    return 0


if __name__ == "__main__":
    sys.exit(main())

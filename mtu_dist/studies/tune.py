"""`mtu tune`: choose each method's knobs on a *dev* forget request (docs/design.md §6, "tuning
without peeking").

Every method gets the same number of trials (`trials` in the space file, `configs/tune_space.yaml`),
drawn by a seeded Latin-hypercube sampler over its documented knobs: step size, the retain weight
alpha where the method has one, and at most one method-specific knob. The step budget is not a knob:
it is fixed (generous) in the space's `fixed` section for every method, and the stop rule decides
when a run has forgotten, so no trial wins by an arbitrary budget. Each trial is an
`mtu unlearn` on the dev request (other instances than the evaluation request, same setting and
size: `mtu forget make ... --exclude EVAL_REQUEST`), from the original model, under the common stop
rule of the space file's `fixed` section, and an MLflow child run.

**Selection criterion.** A real user has neither a retrain nor the evaluation request when tuning,
so the criterion uses only the original model and the unlearned model on the dev request:

* *forget gap* = the largest over the target tasks t of max(0, U_forget,t - O_val,t) / O_val,t: how
  far the dev forget pairs' primary metric still is *above* the original model's val level (the level
  the stop rule aims at: forgotten pairs should look like unseen ones). The largest, not the mean: a
  trial that forgot one task and left another untouched has not forgotten;
* *damage* = mean over the groups that must not move of the mean |O - U| / O of the primary
  metrics: val (every task), retain (every task) and, in the partial setting, the kept tasks of the
  dev request's instances (`forget_kept`); and one more group, the *overshoot*: the mean over target
  tasks of how far the forget pairs fell below the val level beyond the tolerance,
  max(0, (O_val,t - U_forget,t) / O_val,t - tolerance). Forgotten pairs worse than unseen ones are
  a mark an attacker can read, so over-forgetting costs like collateral.

A trial is *feasible* (it *reached* the forget target) when its forget gap is at most
`criterion.forget_tolerance`, so on every target task. Reaching is one-sided on purpose: whether a
run overshot is a matter of quality (damage), not of having forgotten, so a method whose every
step size reaches the target is not left with nothing to choose from. tuned.yaml records, per
method, how many of its trials reached the target. The chosen trial is the feasible one with the
least damage; when no trial is feasible, the one with the least forget gap (damage breaks ties).
Nothing here reads a retrain, an MIA score or the evaluation request.

Outputs, in `--out` (default `tune/<dataset>-<setting>`): `runs/` (the trial run folders),
`trials/<method>-tNN.json` (per trial: knobs, scores, MLflow run id, spec sha256) and `tuned.yaml`
(per method: the chosen knobs as `--set` items, which `bench/paper_table.py` and `mtu unlearn --tuned`
consume). Several `mtu tune` processes (e.g. one per method) may share one `--out`: tuned.yaml is
rewritten under a file lock, merged with what the others wrote. Resumable: a
trial whose record holds the sha256 of the spec it would run now (resolved config, dev request,
original model) is not run again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from mtu_dist.config import load_config
from mtu_dist.errors import UserError
from mtu_dist.tasks import TASKS
from mtu_dist.utils.fileio import atomic_write_json, atomic_write_text, ensure_writable_dir
from mtu_dist.utils.lifecycle import Terminated

GENERAL_KNOBS = ("unlearn.lr", "unlearn.alpha")  # anything else is method-specific
FIXED_ONLY = ("unlearn.steps",)  # the budget is the same for every trial: the stop rule decides
DISTRIBUTIONS = ("uniform", "log_uniform", "choice")
DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "configs" / "tune_space.yaml"


@dataclass
class Space:
    path: str
    trials: int
    seed: int
    tolerance: float
    fixed: dict
    common: dict
    methods: dict[str, dict]

    def knobs(self, method: str) -> dict:
        if method not in self.methods:
            raise UserError(f"{self.path}: no search space for method '{method}' under 'methods'")
        return {**self.common, **self.methods[method]}


# --------------------------------------------------------------------------
# the search space
# --------------------------------------------------------------------------


def load_space(path: str | Path | None = None, trials: int | None = None) -> Space:
    """Read and check a space file; `trials` overrides its trial count (for every method alike)."""
    path = Path(path or DEFAULT_SPACE)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise UserError(f"{path}: cannot read the search space ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    unknown = set(raw) - {"trials", "seed", "criterion", "fixed", "common", "methods"}
    if unknown:
        raise UserError(f"{path}: unknown field(s) {sorted(unknown)}")
    n = trials if trials is not None else raw.get("trials")
    if not isinstance(n, int) or n < 1:
        raise UserError(f"{path}: field 'trials' must be a positive integer (got {n!r})")
    tol = (raw.get("criterion") or {}).get("forget_tolerance")
    if not isinstance(tol, (int, float)) or tol <= 0:
        raise UserError(f"{path}: field 'criterion.forget_tolerance' must be a positive number (got {tol!r})")
    methods = raw.get("methods") or {}
    if not isinstance(methods, dict):
        raise UserError(f"{path}: field 'methods' must map method names to knob spaces")
    common = raw.get("common") or {}
    for where, knobs in [("common", common), *((f"methods.{m}", k or {}) for m, k in methods.items())]:
        _check_knobs(path, where, knobs)
    for where, knobs in [("common", common), *((f"methods.{m}", k or {}) for m, k in methods.items())]:
        for key in FIXED_ONLY:
            if key in knobs:
                raise UserError(
                    f"{path}: field '{where}.{key}': the step budget is not tuned; set it under 'fixed' "
                    "(the same generous budget for every method, the stop rule deciding)"
                )
    for m, knobs in methods.items():
        specific = [k for k in {**common, **(knobs or {})} if k not in GENERAL_KNOBS]
        if len(specific) > 1:
            raise UserError(f"{path}: field 'methods.{m}': at most one method-specific knob (got {specific})")
    return Space(
        str(path),
        n,
        int(raw.get("seed", 0)),
        float(tol),
        dict(raw.get("fixed") or {}),
        common,
        {m: dict(k or {}) for m, k in methods.items()},
    )


def _check_knobs(path: Path, where: str, knobs) -> None:
    if not isinstance(knobs, dict):
        raise UserError(f"{path}: field '{where}' must map config fields to distributions")
    for key, dist in knobs.items():
        if not (isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS):
            raise UserError(
                f"{path}: field '{where}.{key}': expected one of {{uniform: [lo, hi]}}, "
                f"{{log_uniform: [lo, hi]}}, {{choice: [v1, v2, ...]}}"
            )
        kind, values = next(iter(dist.items()))
        if not isinstance(values, list) or not values or (kind != "choice" and len(values) != 2):
            raise UserError(
                f"{path}: field '{where}.{key}.{kind}': expected a list "
                f"{'of values' if kind == 'choice' else '[lo, hi]'}"
            )
        if kind == "log_uniform" and min(values) <= 0:
            raise UserError(f"{path}: field '{where}.{key}.log_uniform': bounds must be positive")


def sample(space: Space, method: str) -> list[dict]:
    """`space.trials` knob settings for `method`: a Latin hypercube (each knob's range cut into
    `trials` equal strata, one draw per stratum, strata shuffled per knob), seeded by the space's seed
    and the method's name only. Floats are rounded to 3 significant digits."""
    knobs = space.knobs(method)
    n = space.trials
    rng = np.random.default_rng([space.seed, zlib.crc32(method.encode())])
    trials = [{} for _ in range(n)]
    for key in sorted(knobs):
        kind, values = next(iter(knobs[key].items()))
        u = (rng.permutation(n) + rng.random(n)) / n  # one point per stratum of [0, 1)
        for trial, ui in zip(trials, u):
            if kind == "choice":
                trial[key] = values[min(int(ui * len(values)), len(values) - 1)]
            elif kind == "uniform":
                trial[key] = _round(values[0] + ui * (values[1] - values[0]))
            else:
                lo, hi = math.log(values[0]), math.log(values[1])
                trial[key] = _round(math.exp(lo + ui * (hi - lo)))
    return trials


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def overrides(knobs: dict) -> list[str]:
    """Knobs as `--set` items."""
    return [f"{k}={v}" for k, v in knobs.items()]


# --------------------------------------------------------------------------
# the selection criterion (pure functions of the original's and the trial's dev-request metrics)
# --------------------------------------------------------------------------


def _p(splits: dict, split: str, task: str) -> float | None:
    v = splits.get(split, {}).get(task, {}).get(TASKS[task].primary)
    return float(v) if v is not None and math.isfinite(v) else None


def _rel(o: float | None, u: float | None) -> float | None:
    return None if o is None or u is None or o == 0 else abs(o - u) / abs(o)


def _above(o: float | None, u: float | None) -> float | None:
    """(u - o) / o: how far `u` is above `o`, relative (negative: below)."""
    return None if o is None or u is None or o == 0 else (u - o) / abs(o)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _forget_above(original: dict, trial: dict) -> list[float | None]:
    """Per target task: how far the forget pairs still are above the original's val level (relative)."""
    targets = [t for t in TASKS if t in trial.get("forget", {})]
    return [_above(_p(original, "val", t), _p(trial, "forget", t)) for t in targets]


def damage_groups(original: dict, trial: dict, tolerance: float) -> dict[str, float | None]:
    """The groups `damage` averages: the mean relative move of val, retain and (partial) forget_kept, and
    the overshoot (None where undefined)."""
    groups = {
        sp: _mean(_rel(_p(original, sp, t), _p(trial, sp, t)) for t in original.get(sp, {}))
        for sp in ("val", "retain", "forget_kept")
        if original.get(sp)
    }
    above = _forget_above(original, trial)
    if above and None not in above:
        groups["overshoot"] = _mean(max(0.0, -a - tolerance) for a in above)
    return groups


def criterion(original: dict, trial: dict, tolerance: float) -> dict:
    """Forget gap, damage and feasibility of one trial (see the module docstring); `original` and
    `trial` are the two models' metrics.json `splits` on the dev request. An undefined term counts as
    the worst case (inf), so a trial that broke a metric is never chosen over one that did not."""
    above = _forget_above(original, trial)
    gap = None if not above or None in above else max(0.0, *above)  # per task: every target must have forgotten
    damage = _mean(damage_groups(original, trial, tolerance).values())
    gap = math.inf if gap is None else gap
    damage = math.inf if damage is None else damage
    return {"forget_gap": gap, "damage": damage, "feasible": gap <= tolerance}


def select(records: list[dict]) -> dict:
    """The chosen trial: least damage among the feasible ones, else least forget gap (then damage);
    the lower trial index breaks exact ties. Records hold `trial`, `forget_gap`, `damage`, `feasible`."""
    if not records:
        raise ValueError("no trials to select from")

    def key(r):
        rank = (0, r["damage"], r["forget_gap"]) if r["feasible"] else (1, r["forget_gap"], r["damage"])
        return rank, r["trial"]

    return min(records, key=key)


# --------------------------------------------------------------------------
# running the trials
# --------------------------------------------------------------------------


@dataclass
class TuneJob:
    """What every trial shares: the dev request, the original model, the base config, where to write."""

    request: str
    origin: str
    out: Path
    base: dict  # config tree the trials start from (the original's model/data sections)
    files: list[str]  # --config files
    sets: list[str]  # --set items (applied before the fixed and tuned knobs)
    tracking_uri: str | None
    space: Space
    label: str = ""  # what the dev request is for (`<dataset>-<setting>`): trial run names stay unique across them

    def config(self, knobs: dict):
        cfg = load_config(self.files, [*self.sets, *overrides(self.space.fixed), *overrides(knobs)], base=self.base)
        cfg.out = str(self.out / "runs")
        return cfg


def _spec_sha(job: TuneJob, cfg, request_sha: str, origin_sha: str) -> str:
    from mtu_dist.methods import resolved_options

    conf = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ("tracking", "out")}
    conf["unlearn"]["options"] = resolved_options(cfg.unlearn.method, cfg.unlearn.options)
    spec = {"config": conf, "request_sha256": request_sha, "origin_sha256": origin_sha}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def run_trial(
    job: TuneJob,
    method: str,
    index: int,
    knobs: dict,
    original_splits: Callable[[], dict],
    request_sha: str,
    origin_sha: str,
) -> tuple[dict, bool]:
    """One trial (or its record, when it already finished with this spec): (record, ran). The original's
    dev-request metrics are asked for only when the trial runs: a record of another spec (the space
    changed) is a trial to run and score like any other."""
    from mtu_dist.reporting.tracking import Tracker
    from mtu_dist.runner.commands import unlearn_command

    cfg = job.config({**knobs, "unlearn.method": method})
    name = "-".join(x for x in ("tune", job.label, method, f"t{index:02d}") if x)
    record_path = job.out / "trials" / f"{method}-t{index:02d}.json"
    sha = _spec_sha(job, cfg, request_sha, origin_sha)
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("spec_sha256") == sha:
            return record, False
    report = unlearn_command(
        cfg, request=job.request, origin=job.origin, name=name, overwrite=True, tracking_uri=job.tracking_uri
    )
    scores = criterion(original_splits(), report["splits"], job.space.tolerance)
    record = {
        "method": method,
        "trial": index,
        "knobs": knobs,
        **scores,
        "stop_reason": report.get("stop_reason"),
        "time_s": report.get("time_s"),
        "request_sha256": request_sha,
        "spec_sha256": sha,
        "mlflow_run_id": report["run"].get("mlflow_run_id"),
        "run_dir": report["run"].get("run_dir"),
    }
    if record["mlflow_run_id"]:
        t = Tracker(enabled=True, uri=cfg.tracking.uri, experiment="", run_name="", run_id=record["mlflow_run_id"])
        t.log_metrics(
            {
                f"tune/{k}": float(scores[k])
                for k in ("forget_gap", "damage", "feasible")
                if math.isfinite(float(scores[k]))
            },
            0,
        )
        t.set_tags({"mtu.tune.method": method, "mtu.tune.trial": index, "mtu.tune.request_sha256": request_sha})
        t.flush()
    atomic_write_json(record_path, record)
    return record, True


def tune(job: TuneJob, methods: list[str], log=print) -> dict:
    """Run (or resume) every method's trials; write and return tuned.yaml's content."""
    from mtu_dist.compliance.request import load_request
    from mtu_dist.data.manifest import load_manifest
    from mtu_dist.methods import METHODS, build_method
    from mtu_dist.runner.checkpoint import read_state

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {unknown} (available: {', '.join(sorted(METHODS))})")
    plans = {m: sample(job.space, m) for m in methods}  # every space is checked before any work
    for m, trials in plans.items():
        for knobs in trials:  # bad knob names or values: fail now, naming the method
            cfg = job.config({**knobs, "unlearn.method": m})
            build_method(m, cfg.unlearn.options)
    probe = job.config({})
    req = load_request(job.request, load_manifest(probe.data.dataset, probe.data.root))
    origin_sha = read_state(job.origin)["sha256"]["model.safetensors"]
    ensure_writable_dir(job.out)
    tuned_path = job.out / "tuned.yaml"
    tuned = _load_tuned(tuned_path, req.sha256, origin_sha)
    cache: dict = {}

    def original_splits() -> dict:  # evaluated once, and only if some trial runs (a resumed tuning may run none)
        if not cache:
            cache.update(_original_on(job, req.sha256, probe.eval.retain_sample))
        return cache

    for m in methods:
        records = []
        for i, knobs in enumerate(plans[m]):
            rec, ran = run_trial(job, m, i, knobs, original_splits, req.sha256, origin_sha)
            records.append(rec)
            log(
                f"tune {m} trial {i + 1}/{len(plans[m])}: {'ran' if ran else 'skipped (finished)'}; "
                f"forget gap {rec['forget_gap']:.3f}, damage {rec['damage']:.4f}"
                f"{'' if rec['feasible'] else ' (not forgotten)'}"
            )
        best = select(records)
        entry = {
            "set": overrides({**job.space.fixed, **best["knobs"]}),
            "trial": best["trial"],
            "forget_gap": best["forget_gap"],
            "damage": best["damage"],
            "feasible": best["feasible"],
            "feasible_trials": sum(bool(r["feasible"]) for r in records),
            "trials": len(records),
            "mlflow_run_id": best["mlflow_run_id"],
        }
        tuned = _merge_tuned(tuned_path, req.sha256, origin_sha, m, entry)
    return tuned


def _merge_tuned(path: Path, request_sha: str, origin_sha: str, method: str, entry: dict) -> dict:
    """Add one method's entry to tuned.yaml under an exclusive lock, keeping what other `mtu tune`
    processes sharing the folder wrote meanwhile (read, merge, write atomically, unlock)."""
    import fcntl

    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            tuned = _load_tuned(path, request_sha, origin_sha)
            tuned["methods"][method] = entry
            atomic_write_text(path, yaml.safe_dump(tuned, sort_keys=False))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return tuned


def _original_on(job: TuneJob, request_sha: str, retain_sample: int) -> dict:
    """The original model's metrics on the dev request (evaluated once, cached beside it)."""
    from mtu_dist.evaluation.scoring import original_reference
    from mtu_dist.runner.commands import eval_command

    try:
        return original_reference(job.origin, request_sha, retain_sample).report["splits"]
    except UserError:
        cfg = job.config({})
        cfg.tracking.enabled = False  # a cache fill, not a result
        eval_command(cfg, ckpt=job.origin, request=job.request, tracking_uri=None)
        return original_reference(job.origin, request_sha, retain_sample).report["splits"]


def _load_tuned(path: Path, request_sha: str, origin_sha: str) -> dict:
    """tuned.yaml's content for this dev request and original (a stale file's entries are dropped)."""
    head = {"request_sha256": request_sha, "origin_sha256": origin_sha}
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        if all(old.get(k) == v for k, v in head.items()):
            return {**old, "methods": dict(old.get("methods") or {})}
    return {
        **head,
        "criterion": "least damage (val, retain, kept tasks) among trials whose dev forget pairs "
        "reached the original's val level within forget_tolerance; else least forget gap",
        "methods": {},
    }


def chosen_overrides(path: str | Path, method: str, request_sha: str | None = None) -> list[str]:
    """The `--set` items `mtu tune` chose for `method` (checked against the dev request, if given)."""
    path = Path(path)
    try:
        tuned = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read the tuned configs ({e})") from None
    if request_sha and tuned.get("request_sha256") != request_sha:
        raise UserError(f"{path}: tuned on request {str(tuned.get('request_sha256'))[:12]}, not {request_sha[:12]}")
    entry = (tuned.get("methods") or {}).get(method)
    if not entry:
        raise UserError(f"{path}: no tuned config for method '{method}' (run `mtu tune --methods {method}`)")
    return list(entry["set"])


def tune_command(a) -> None:
    from mtu_dist.compliance.request import load_request
    from mtu_dist.data.manifest import load_manifest
    from mtu_dist.methods import METHODS
    from mtu_dist.reporting.tracking import Tracker
    from mtu_dist.runner.checkpoint import read_state
    from mtu_dist.runner.commands import config_from_checkpoint

    space = load_space(a.space, a.trials)
    base = config_from_checkpoint(getattr(a, "from"))
    probe = load_config(a.config, a.set, base=base)
    req = load_request(a.request, load_manifest(probe.data.dataset, probe.data.root))
    read_state(getattr(a, "from"))
    out = Path(a.out or Path("tune") / f"{req.dataset}-{req.setting}")
    job = TuneJob(
        a.request, getattr(a, "from"), out, base, a.config, a.set, a.tracking_uri, space, f"{req.dataset}-{req.setting}"
    )
    methods = a.methods or list(METHODS)
    parent = None
    if not os.environ.get("MTU_PARENT_RUN_ID") and probe.tracking.enabled:  # trials nest under one parent run
        parent = Tracker(
            enabled=True,
            uri=a.tracking_uri or probe.tracking.uri,
            experiment=probe.tracking.experiment or req.dataset,
            run_name=f"tune-{req.dataset}-{req.setting}",
            tags={"mtu.command": "tune"},
        )
        parent.log_params({"space": space.path, "trials": space.trials, "request_sha256": req.sha256})
        os.environ["MTU_PARENT_RUN_ID"] = parent.run_id
    status = "FAILED"
    try:
        tuned = tune(job, methods)
        status = "FINISHED"
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    finally:
        if parent is not None:
            os.environ.pop("MTU_PARENT_RUN_ID", None)
            if status == "FINISHED":
                parent.log_artifact(out / "tuned.yaml")
            parent.finish(status)
    print("\n| method | trial | feasible trials | forget gap | damage | chosen knobs |\n|---|---|---|---|---|---|")
    for m in methods:
        e = tuned["methods"][m]
        print(
            f"| {m} | {e['trial']} | {e.get('feasible_trials', '?')}/{e.get('trials', '?')} | "
            f"{e['forget_gap']:.3f}{'' if e['feasible'] else ' (not reached)'} | "
            f"{e['damage']:.4f} | {' '.join(e['set'])} |"
        )
    print(f"wrote {out / 'tuned.yaml'}")

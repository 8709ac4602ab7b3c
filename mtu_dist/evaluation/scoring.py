"""The `unlearning` block of a run's metrics.json: MIA AUC, UIS, gap to retrain, Delta_m, cost.

`mtu unlearn` and `mtu retrain` write it at the end of a run (their own losses give the MIA AUC; the
original model's evaluation on the same request, cached beside it, gives UIS and Delta_m; a retrain
run given with `--retrain` gives the gap and the cost ratio). `mtu score RUN` recomputes it from the
files a finished run left, without running a model, so a benchmark can score every method once the
retrain has finished. The numbers themselves are pure functions (`unlearning_metrics`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mtu_dist.errors import UserError
from mtu_dist.evaluation.unlearning_metrics import cost_ratio, delta_m, gap_to_retrain, mia_auc, uis
from mtu_dist.tasks import TASKS


@dataclass
class Results:
    """One model's evaluation on a request: metrics.json, losses.json, and where they came from."""

    report: dict
    losses: dict
    path: str


def request_tasks(splits: dict) -> tuple[str, list[str]]:
    """(setting, target tasks) of the request a report was evaluated on, read off its splits: only a
    partial request has `forget_kept`, and `forget` holds exactly the target tasks."""
    setting = "partial" if "forget_kept" in splits else "full"
    return setting, [t for t in TASKS if t in splits.get("forget", {})]


def unlearning_block(
    report: dict, losses: dict, original: Results | None = None, retrain: Results | None = None
) -> dict:
    """Every unlearning score of one run; a score whose reference is missing is None."""
    splits = report["splits"]
    tasks = report["run"].get("tasks") or [t for t in TASKS if t in splits.get("val", {})]
    setting, targets = request_tasks(splits)
    block = {
        "setting": setting,
        "target_tasks": targets,
        **mia_auc(losses, tasks, targets if setting == "partial" else None),
        "mia_auc_retrain": None,
        "mia_auc_gap": None,
        "uis": None,
        "delta_m": None,
        "delta_m_per_split": None,
        "gap_retrain": None,
        "gap_retrain_per_split": None,
        "cost_s": report.get("time_s"),
        "cost_ratio": None,
        "uis_retrain": None,
        "uis_excess": None,
        "below_floor": None,
        "equal_forgetting": None,
        "references": {"original": original and original.path, "retrain": retrain and retrain.path},
    }
    if original is not None:
        _check_same_instances(losses, original, "original")
        block["uis"] = uis(original.report["splits"], splits, setting, targets)
        dm = delta_m(original.report["splits"], splits)
        block["delta_m"], block["delta_m_per_split"] = dm.pop("mean"), dm
    if retrain is not None:
        _check_same_instances(losses, retrain, "retrain")
        ref = mia_auc(retrain.losses, tasks, targets if setting == "partial" else None)["mia_auc"]
        block["mia_auc_retrain"] = ref
        if ref is not None and block["mia_auc"] is not None:
            block["mia_auc_gap"] = abs(block["mia_auc"] - ref)
        gap = gap_to_retrain(splits, retrain.report["splits"])
        block["gap_retrain"], block["gap_retrain_per_split"] = gap["mean"], gap["per_split"]
        block["cost_ratio"] = cost_ratio(report.get("time_s"), retrain.report.get("time_s"))
        if report.get("trajectory"):
            block["equal_forgetting"] = equal_forgetting(report["trajectory"], retrain.report["splits"])
    if original is not None and retrain is not None:
        # the floor: a retrain is not scored 0 by UIS; a run below its UIS has not unlearned better than it
        floor = uis(original.report["splits"], retrain.report["splits"], setting, targets)["mean"]
        block["uis_retrain"] = floor
        if floor is not None and block["uis"] and block["uis"]["mean"] is not None:
            block["uis_excess"] = block["uis"]["mean"] - floor
            block["below_floor"] = block["uis_excess"] < 0
    return block


def equal_forgetting(trajectory: dict, retrain_splits: dict) -> dict:
    """The run's collateral when its forget pairs first reach the retrain's forget level (interpolated
    between trajectory points), its largest forget progress, and the whole curve."""
    from mtu_dist.evaluation.statistics import at_level
    from mtu_dist.evaluation.trajectory import curve

    level = {
        t: retrain_splits["forget"][t][TASKS[t].primary]
        for t in trajectory["targets"]
        if t in retrain_splits.get("forget", {})
    }
    points = curve(trajectory, level)
    reached = at_level(points, 1.0)
    progress = [p["progress"] for p in points if p["progress"] is not None]
    return {
        "reached": reached is not None,
        "step": reached and reached["step"],
        "task_interference": reached and reached["task_interference"],
        "instance_interference": reached and reached["instance_interference"],
        "max_progress": max(progress) if progress else None,
        "curve": points,
    }


def curve_metrics(block: dict | None) -> list[tuple[int, dict[str, float]]]:
    """The equal-forgetting curve as stepped MLflow metrics (`traj/...`, step = the unlearning step)."""
    eq = (block or {}).get("equal_forgetting")
    if not eq:
        return []
    return [
        (
            p["step"],
            {
                f"traj/{k}": float(p[k])
                for k in ("progress", "task_interference", "instance_interference")
                if p.get(k) is not None
            },
        )
        for p in eq["curve"]
    ]


def mlflow_metrics(block: dict | None) -> dict[str, float]:
    """The block as MLflow metrics (docs/design.md §7 names); undefined scores are left out."""
    if not block:
        return {}
    out = {
        k: block.get(k)
        for k in (
            "mia_auc",
            "mia_auc_target",
            "mia_auc_gap",
            "gap_retrain",
            "delta_m",
            "cost_ratio",
            "uis_retrain",
            "uis_excess",
            "below_floor",
        )
    }
    eq = block.get("equal_forgetting") or {}
    out.update(
        {f"eqf/{k}": eq.get(k) for k in ("reached", "task_interference", "instance_interference", "max_progress")}
    )
    if block["uis"]:
        out["uis"] = block["uis"]["mean"]
        out.update({f"uis/{t}": v for t, v in block["uis"]["per_task"].items()})
    out.update({f"delta_m/{sp}": v for sp, v in (block["delta_m_per_split"] or {}).items()})
    return {k: float(v) for k, v in out.items() if v is not None}


def _check_same_instances(losses: dict, ref: Results, what: str) -> None:
    """A reference scored on other instances would compare different things: refuse it."""
    for sp in ("forget", "retain", "val"):
        mine, theirs = ({r[0] for r in x.get(sp, [])} for x in (losses, ref.losses))
        if mine != theirs:
            raise UserError(
                f"{ref.path}: the {what} reference was evaluated on other {sp} instances "
                f"({len(theirs)} vs {len(mine)}); evaluate it with the same request and eval.retain_sample"
            )


# --------------------------------------------------------------------------
# run folders
# --------------------------------------------------------------------------


def _final(path: str | Path) -> Path:
    path = Path(path)
    return path / "final" if (path / "final").is_dir() else path


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no {what} (is this a finished run?)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read {what} ({e})") from None


def run_results(path: str | Path) -> Results:
    """A finished run's own final/metrics.json and final/losses.json."""
    folder = _final(path)
    return Results(
        _read_json(folder / "metrics.json", "metrics.json"),
        _read_json(folder / "losses.json", "losses.json"),
        str(Path(path)),
    )


def retain_sample_of(path: str | Path) -> int:
    """The `eval.retain_sample` a run was evaluated with (its recorded config; the model is not needed)."""
    return _read_json(_final(path) / "state.json", "state.json")["config"]["eval"]["retain_sample"]


def retrain_reference(
    path: str | Path, pairs_sha: str, retain_sample: int, *, request_sha: str | None = None, what: str = "request"
) -> Results:
    """The retrain run on the same pairs (the same request, or a lineage's cumulative forget set), checked
    before it is compared with anything."""
    ref = retrain_if_same(path, pairs_sha, retain_sample, request_sha=request_sha)
    if ref is None:
        run = run_results(path).report.get("run", {})
        raise UserError(
            f"{path}: the retrain run removed other pairs (request {str(run.get('request_sha256'))[:12]}) "
            f"than this run's {what} (pairs sha256 {pairs_sha[:12]})"
        )
    return ref


def retrain_if_same(
    path: str | Path, pairs_sha: str, retain_sample: int, *, request_sha: str | None = None
) -> Results | None:
    """The retrain run if it removed exactly these pairs (else None); a mismatched eval sample is an error."""
    ref = run_results(path)
    run = ref.report.get("run", {})
    if run.get("command") not in (None, "retrain"):
        raise UserError(f"{path}: a '{run.get('command')}' run, not a retrain run")
    theirs = run.get("request_pairs_sha256")
    same = theirs == pairs_sha if theirs else (request_sha is not None and run.get("request_sha256") == request_sha)
    if not same:
        return None
    if retain_sample_of(path) != retain_sample:
        raise UserError(
            f"{path}: the retrain run was evaluated with eval.retain_sample = {retain_sample_of(path)}, "
            f"this run with {retain_sample}"
        )
    return ref


def original_reference(path: str | Path, request_sha: str, retain_sample: int) -> Results:
    """The original model's cached evaluation on the request (`mtu eval` or `mtu unlearn` wrote it)."""
    from mtu_dist.evaluation.reference import eval_paths, load_cached
    from mtu_dist.runner.checkpoint import read_state

    meta = read_state(path)
    cached = load_cached(Path(meta["_folder"]), meta, request_sha, retain_sample)
    if cached is None:
        expected = eval_paths(Path(meta["_folder"]), meta, request_sha)[0]
        raise UserError(
            f"{expected}: no valid evaluation of the original on request {request_sha[:12]} with "
            f"eval.retain_sample = {retain_sample}; run `mtu eval --ckpt {path} --request REQUEST "
            f"--set eval.retain_sample={retain_sample}` first"
        )
    return Results(*cached, meta["_folder"])


def score_command(run: str, *, original: str | None, retrain: str | None, tracking_uri: str | None) -> dict:
    """Recompute a finished run's unlearning block(s) from its files; rewrite metrics.json, log to its MLflow
    run. `retrain` serves the block whose pairs it removed: the request's, the lineage's cumulative set's
    (an unlearning chain), or both where they are the same pairs."""
    from mtu_dist.reporting.tracking import Tracker
    from mtu_dist.utils.fileio import atomic_write_json

    mine = run_results(run)
    report = mine.report
    if "forget" not in report.get("splits", {}):
        raise UserError(f"{_final(run) / 'metrics.json'}: no forget split; the run was not made on a forget request")
    key = (report.get("eval") or {}).get("request_sha256") or report["run"]["request_sha256"]
    n = retain_sample_of(run)
    origin = original or report["run"].get("origin")
    pairs = report["run"].get("request_pairs_sha256")
    ret = retrain and retrain_if_same(retrain, pairs, n, request_sha=report["run"]["request_sha256"])
    block = unlearning_block(
        report, mine.losses, original=original_reference(origin, key, n) if origin else None, retrain=ret or None
    )
    report["unlearning"] = block
    metrics = mlflow_metrics(block)
    cum = report.get("cumulative")
    cum_ret = None
    if cum is not None:
        cum_ret = retrain and retrain_if_same(retrain, cum["pairs_sha256"], n)
        # one request on the original: the same evaluation against the same references
        cum["unlearning"] = (
            block if cum["same_as_request"] else cumulative_block(report, cum, mine, retrain=cum_ret or None)
        )
        if cum["depth"] > 1:  # as the run logged them (runner/commands.py): a first step's are its request's
            metrics |= {f"cumulative/{k}": v for k, v in mlflow_metrics(cum["unlearning"]).items()}
    if retrain and not ret and not cum_ret:
        retrain_reference(retrain, pairs, n, request_sha=report["run"]["request_sha256"])  # raises, naming both
    atomic_write_json(_final(run) / "metrics.json", report)
    run_id = report["run"].get("mlflow_run_id")
    if run_id:
        tracker = Tracker(enabled=True, uri=tracking_uri, experiment="", run_name="", run_id=run_id)
        tracker.log_scores(metrics)
        for step, values in curve_metrics(block):
            tracker.log_metrics(values, step)
        tracker.log_artifact(_final(run) / "metrics.json")
        tracker.flush()
    else:
        print(f"{run}: the run was not tracked (no MLflow run id); metrics.json updated only")
    return report


def cumulative_block(report: dict, cum: dict, mine: Results, *, retrain: Results | None) -> dict:
    """A lineage step's block on its cumulative forget set, against the lineage's root model."""
    creport = {"run": report["run"], "splits": cum["splits"], "time_s": cum["cost_s"]}
    losses = _read_json(_final(mine.path) / "losses-cumulative.json", "losses-cumulative.json")
    ref = original_reference(cum["root"], cum["eval"]["request_sha256"], cum["eval"]["retain_sample"])
    return unlearning_block(creport, losses, original=ref, retrain=retrain)


def block_table(block: dict) -> str:
    """The block as a two-column Markdown table."""
    rows = [
        ("MIA AUC", block["mia_auc"]),
        ("MIA AUC, target tasks", block["mia_auc_target"]),
        ("MIA AUC gap to retrain", block["mia_auc_gap"]),
        ("UIS (mean)", (block["uis"] or {}).get("mean")),
        *[(f"UIS {t}", v) for t, v in ((block["uis"] or {}).get("per_task") or {}).items()],
        ("UIS of the retrain (floor)", block.get("uis_retrain")),
        ("UIS excess over the floor", block.get("uis_excess")),
        *[
            (f"at equal forgetting: {k.replace('_', ' ')}", block["equal_forgetting"].get(k))
            for k in ("task_interference", "instance_interference", "max_progress")
            if block.get("equal_forgetting")
        ],
        ("gap to retrain (pp)", block["gap_retrain"]),
        ("delta_m (%)", block["delta_m"]),
        ("cost s", block["cost_s"]),
        ("cost ratio to retrain", block["cost_ratio"]),
    ]
    return "\n".join(
        ["| score | value |", "|---|---|"] + [f"| {k} | {'' if v is None else f'{v:.4f}'} |" for k, v in rows]
    )

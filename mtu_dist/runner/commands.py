"""The run commands, flat and in order: set up, do the work, save, evaluate, record."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mtu_dist.compliance.ledger import ledger_bytes
from mtu_dist.config import RunConfig
from mtu_dist.errors import UserError
from mtu_dist.evaluation.evaluate import evaluate, flat_metrics
from mtu_dist.runner.checkpoint import check_model_file, read_state, save_checkpoint
from mtu_dist.runner.runclaim import release_run_dir
from mtu_dist.runner.session import Session, open_session, run_info
from mtu_dist.utils.fileio import atomic_write_bytes, atomic_write_json, sha256_bytes

if TYPE_CHECKING:
    import torch

    from mtu_dist.compliance.request import ForgetRequest
    from mtu_dist.data.manifest import Manifest
    from mtu_dist.evaluation.scoring import Results


def finish(
    s: Session,
    model: torch.nn.Module,
    *,
    elapsed: float,
    step: int,
    extra: dict | None = None,
    original: Results | None = None,
    retrain: Results | str | None = None,
    cumulative: dict | None = None,
) -> dict:
    """Save the final model (atomically), evaluate it, write metrics.json beside it, log everything.
    A run on a forget request also gets its unlearning scores (scoring.py) against the references given;
    a lineage step (`cumulative`: request, root and retrain references) also its scores on the cumulative
    forget set (`metrics.json` "cumulative", MLflow `cumulative/...`)."""
    from mtu_dist.evaluation.reference import fingerprint
    from mtu_dist.evaluation.scoring import curve_metrics, mlflow_metrics, unlearning_block

    final = s.run_dir / "final"
    if s.lineage is not None:
        s.lineage.steps[-1]["cost_s"] = elapsed
    # the ledger's sha256 goes into state.json, so `mtu audit` can tell whether ledger.json was edited
    ledger = ledger_bytes(s.ledger, s.request and s.request.sha256) if s.ledger is not None else None
    _refuse_non_finite_final(s, model)  # on every rank (they hold the same parameters): no rank waits alone
    if s.is_main:
        info = {**run_info(s), "ledger_sha256": sha256_bytes(ledger) if ledger else None}
        save_checkpoint(final, model, step=step, epoch=0, config=s.cfg.model_dump(mode="json"), info=info)
    s.barrier()
    t0 = time.perf_counter()
    results = evaluate(model, s, s.request)
    cum_results = None
    if cumulative is not None and not cumulative["same_as_request"]:
        cum_results = evaluate(model, s, cumulative["request"])  # collective: every rank
    run = {k: v for k, v in run_info(s).items() if k != "lineage"}  # state.json keeps the whole record
    report = {
        "run": {**run, "run_dir": str(s.run_dir), "mlflow_run_id": s.tracker.run_id},
        "time_s": elapsed,
        "eval_time_s": time.perf_counter() - t0,
        **(extra or {}),
        "splits": results["splits"],
    }
    if s.is_main:
        state = json.loads((final / "state.json").read_text())
        report["eval"] = fingerprint(state, s.request and s.request.eval_key, s.cfg.eval.retain_sample)
        metrics = flat_metrics(results["splits"])
        if s.request is not None:
            if retrain == "self":  # a retrain run is its own reference
                from mtu_dist.evaluation.scoring import Results

                retrain = Results(report, results["losses"], str(s.run_dir))
            report["unlearning"] = unlearning_block(report, results["losses"], original=original, retrain=retrain)
            metrics |= mlflow_metrics(report["unlearning"])
            for at, values in curve_metrics(report["unlearning"]):
                s.tracker.log_metrics(values, at)
        if cumulative is not None:
            report["cumulative"] = _cumulative_report(
                s, state, results if cum_results is None else cum_results, cumulative, report
            )
            metrics |= _lineage_metrics(report["cumulative"])
            if cum_results is not None:
                atomic_write_json(final / "losses-cumulative.json", cum_results["losses"])
        atomic_write_json(final / "metrics.json", report)
        atomic_write_json(final / "losses.json", results["losses"])
        if ledger is not None:
            atomic_write_bytes(final / "ledger.json", ledger)
            s.tracker.log_artifact(final / "ledger.json")
        s.tracker.log_scores(metrics)  # one point at step 0: MLflow's chart view draws bars per run
        s.tracker.log_artifact(final / "metrics.json")
    s.tracker.finish()
    release_run_dir(s.run_dir)  # the next command of this process may write it (mtu demo, tune)
    return report


def _refuse_non_finite_final(s: Session, model: torch.nn.Module) -> None:
    """A run whose final model is not finite failed, whatever its loop concluded: exit non-zero, save nothing."""
    from mtu_dist.runner.checkpoint import non_finite

    name = non_finite(dict(model.state_dict()))
    if name is not None:
        raise UserError(
            f"{s.run_dir}: the final model's tensor '{name}' holds NaN or inf ({s.command} diverged); "
            "no final model was saved"
        )


def _cumulative_report(s: Session, state: dict, results: dict, cumulative: dict, report: dict) -> dict:
    from mtu_dist.evaluation.reference import fingerprint
    from mtu_dist.evaluation.scoring import unlearning_block

    req, lin = cumulative["request"], s.lineage
    cost = sum(step["cost_s"] or 0.0 for step in lin.steps)  # the whole chain's unlearning time
    out = {
        "depth": lin.depth,
        "pairs": len(req.pairs()),
        "instances": len(req.entries),
        "new_pairs": sum(map(len, lin.new.values())),
        "skipped_pairs": len(lin.skipped),
        "request_sha256": req.sha256,
        "pairs_sha256": req.pairs_sha256,
        "root": lin.root["checkpoint"],
        "same_as_request": cumulative["same_as_request"],
        "cost_s": cost,
        "eval": fingerprint(state, req.eval_key, s.cfg.eval.retain_sample),
        "splits": results["splits"],
    }
    creport = {"run": report["run"], "splits": results["splits"], "time_s": cost}
    out["unlearning"] = unlearning_block(
        creport, results["losses"], original=cumulative["original"], retrain=cumulative["retrain"]
    )
    return out


def _lineage_metrics(cum: dict) -> dict[str, float]:
    from mtu_dist.evaluation.scoring import mlflow_metrics

    if cum["depth"] < 2:  # a first step's cumulative set is its request: the same scores again
        return {}
    return {
        "lineage/depth": cum["depth"],
        "lineage/new_pairs": cum["new_pairs"],
        "lineage/skipped_pairs": cum["skipped_pairs"],
        "lineage/cumulative_pairs": cum["pairs"],
        "cumulative/cost_s": cum["cost_s"],
        **{f"cumulative/{k}": v for k, v in mlflow_metrics(cum["unlearning"]).items()},
        **{f"cumulative/{k}": v for k, v in flat_metrics(cum["splits"]).items()},
    }


def train_command(cfg: RunConfig, *, name: str | None, resume: bool, overwrite: bool, tracking_uri: str | None) -> dict:
    from mtu_dist.runner.train import fit

    s = open_session(cfg, "train", name or "original", resume=resume, overwrite=overwrite, tracking_uri=tracking_uri)
    model, elapsed, step = fit(s, resume=resume)
    return finish(s, model, elapsed=elapsed, step=step)


def retrain_command(
    cfg: RunConfig,
    *,
    request: str,
    name: str | None,
    resume: bool,
    overwrite: bool,
    tracking_uri: str | None,
    original: str | None = None,
) -> dict:
    """Train from scratch on the request's retain signal. With `original` (the model the request was
    made against) the run also writes its full unlearning block: UIS against the original, and itself as
    the retrain reference (the floor every method's UIS is compared with)."""
    from mtu_dist.runner.train import fit

    manifest, req = _inputs(cfg, request)
    s = open_session(
        cfg,
        "retrain",
        name or f"retrain-{req.setting}-{req.sha256[:8]}",
        manifest=manifest,
        request=req,
        resume=resume,
        overwrite=overwrite,
        tracking_uri=tracking_uri,
    )
    model, elapsed, step = fit(s, resume=resume)
    ref = None
    if original:
        from mtu_dist.evaluation.reference import reference_eval
        from mtu_dist.evaluation.scoring import Results

        ref = reference_eval(s, original)
        ref = ref and Results(*ref, read_state(original)["_folder"])
    return finish(s, model, elapsed=elapsed, step=step, original=ref, retrain="self" if original else None)


def unlearn_command(
    cfg: RunConfig,
    *,
    request: str,
    origin: str,
    name: str | None,
    overwrite: bool,
    resume: bool = False,
    tracking_uri: str | None,
    retrain: str | None = None,
) -> dict:
    """One unlearning run; from an earlier unlearning run's model, the next step of its lineage (lineage.py).
    `retrain`: a retrain run that removed the same pairs as the lineage so far (for a first request, the
    request's own): the gap to retrain and the cost ratio."""
    from mtu_dist.compliance.lineage import start_step
    from mtu_dist.evaluation.reference import reference_eval
    from mtu_dist.evaluation.scoring import Results, retrain_reference
    from mtu_dist.methods import build_method
    from mtu_dist.runner.unlearn import load_original, unlearn

    build_method(cfg.unlearn.method, cfg.unlearn.options)  # unknown method / bad options: fail before any work
    meta = read_state(origin)
    check_model_file(meta)  # a NaN/inf model is refused before a run folder exists
    manifest, req = _inputs(cfg, request)
    _same_data(meta, manifest)
    lineage = start_step(meta, req, manifest, method=cfg.unlearn.method)  # repeats, other lineage: before work
    cum_req, _ = lineage.cumulative_request(manifest)
    # the retrain reference (gap, cost ratio) is checked before any work
    retrain_ref = (
        retrain_reference(
            retrain,
            cum_req.pairs_sha256,
            cfg.eval.retain_sample,
            request_sha=req.sha256 if cum_req.pairs() == req.pairs() else None,
            what="lineage's cumulative forget set",
        )
        if retrain
        else None
    )
    s = open_session(
        cfg,
        "unlearn",
        name or f"unlearn-{cfg.unlearn.method}-{req.setting}-{req.sha256[:8]}",
        manifest=manifest,
        request=req,
        resume=resume,
        overwrite=overwrite,
        tracking_uri=tracking_uri,
        extra_params={
            "method": cfg.unlearn.method,
            "origin": meta["_folder"],
            "origin_sha256": meta["sha256"]["model.safetensors"],
        },
        lineage=lineage,
    )
    if s.is_main and lineage.skipped:
        shown = ", ".join(lineage.skipped[:5]) + (", ..." if len(lineage.skipped) > 5 else "")
        print(
            f"mtu: {req.path}: {len(lineage.skipped)} pair(s) were already forgotten earlier in this lineage and "
            f"are skipped: {shown}"
        )
    model, _ = load_original(s, origin)
    original_val = _original_val(meta)
    model, elapsed, stopped = unlearn(s, model, original_val, resume=resume)
    original_ref = reference_eval(s, origin)  # evaluated once per (checkpoint, request), then cached beside it
    original = original_ref and Results(*original_ref, meta["_folder"])
    # one request on the original: the cumulative set is the request, evaluated once
    same = cum_req.pairs() == req.pairs() and not s.request.retain_exclude
    root = lineage.root["checkpoint"]
    root_ref = original_ref if same else reference_eval(s, root, cum_req)
    cumulative = {
        "request": cum_req,
        "same_as_request": same,
        "retrain": retrain_ref,
        "original": root_ref and Results(*root_ref, root),
    }
    return finish(
        s,
        model,
        elapsed=elapsed,
        step=cfg.unlearn.steps,
        extra={"stop_reason": stopped, "trajectory": s.trajectory},
        original=original,
        retrain=retrain_ref if same else None,
        cumulative=cumulative,
    )


def _inputs(cfg: RunConfig, request: str | None) -> tuple[Manifest, ForgetRequest | None]:
    """The dataset's manifest and the forget request (if any), each parsed once for the whole command."""
    from mtu_dist.compliance.request import load_request
    from mtu_dist.data.manifest import load_manifest

    manifest = load_manifest(cfg.data.dataset, cfg.data.root)
    return manifest, load_request(request, manifest) if request else None


def _same_data(meta: dict, manifest: Manifest) -> None:
    """A model made from another version of the dataset (shards regenerated or edited under the same name)
    would be unlearned on instances it never saw under those ids: refuse it (older checkpoints record no
    data sha256 and are taken as they are)."""
    made_from = meta.get("data_sha256")
    if made_from and made_from != manifest.data_sha256:
        raise UserError(
            f"{meta['_folder']}: made from another version of {manifest.dataset} (data sha256 "
            f"{made_from[:12]}..., {manifest.root / 'manifest.json'} describes {manifest.data_sha256[:12]}...); "
            "unlearn on the data the model was trained on"
        )


def _original_val(meta: dict) -> dict | None:
    path = Path(meta["_folder"]) / "metrics.json"
    if path.is_file():
        import json

        return json.loads(path.read_text())["splits"].get("val")
    return None


def eval_command(
    cfg: RunConfig, *, ckpt: str, request: str | None, tracking_uri: str | None, retrain: str | None = None
) -> dict:
    """Evaluate a checkpoint (cached beside it). With a request and `retrain` (a retrain run on it), the
    checkpoint is also scored as a row of its own: the original's unlearning block (what doing nothing
    scores), without any unlearning run."""
    from mtu_dist.evaluation.reference import write_eval
    from mtu_dist.runner.unlearn import load_original

    meta = read_state(ckpt)
    check_model_file(meta)  # before an MLflow run is opened for it
    folder = Path(meta["_folder"])
    manifest, req = _inputs(cfg, request)
    s = open_session(
        cfg,
        "eval",
        _eval_run_name(folder, request),
        manifest=manifest,
        request=req,
        tracking_uri=tracking_uri,
        run_dir=folder,
    )
    model, _ = load_original(s, ckpt)
    results = evaluate(model, s, s.request)
    report = {"splits": results["splits"]}
    if s.is_main:  # metrics-<sha12>.json + losses-<sha12>.json: also the cache `mtu unlearn` reads (reference.py)
        out, report = write_eval(s, folder, meta, results["splits"], results["losses"])
        metrics = flat_metrics(results["splits"])
        if retrain and s.request is not None:
            from mtu_dist.evaluation.scoring import Results, mlflow_metrics, retrain_reference, unlearning_block
            from mtu_dist.utils.fileio import atomic_write_json

            ref = retrain_reference(
                retrain, s.request.pairs_sha256, cfg.eval.retain_sample, request_sha=s.request.sha256
            )
            mine = Results(report, results["losses"], str(folder))
            report["unlearning"] = unlearning_block(
                {**report, "time_s": 0.0}, results["losses"], original=mine, retrain=ref
            )
            atomic_write_json(out, report)
            metrics |= mlflow_metrics(report["unlearning"])
        report["mlflow_run_id"] = s.tracker.run_id
        s.tracker.log_metrics(metrics, 0)
        s.tracker.log_artifact(out)
        print(f"wrote {out}")
    s.tracker.finish()
    return report


def _eval_run_name(folder: Path, request: str | None) -> str:
    """`eval-<run>[-<checkpoint>][-<request file stem>]`: one checkpoint evaluated on two requests gives
    two runs told apart by name (a run's final model, `final/`, goes by the run's name alone)."""
    if folder.name == "final":
        parts = [folder.parent.name]
    else:  # a resume point, <run>/checkpoints/step-NNNNNNN, or a folder elsewhere
        run = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
        parts = [run.name, folder.name]
    return "-".join(["eval", *parts, *([Path(request).stem] if request else [])])


def config_from_checkpoint(ckpt: str) -> dict:
    """The model/data sections of the run that produced `ckpt` (so eval/unlearn rebuild the same model)."""
    meta = read_state(ckpt)
    conf = meta.get("config") or {}
    if not isinstance(conf, dict) or not all(isinstance(conf.get(k), dict) for k in ("model", "data")):
        raise UserError(
            f"{meta['_folder']}/state.json: checkpoint has no recorded config (its model and data sections)"
        )
    return {"model": conf["model"], "data": conf["data"], "seed": conf.get("seed", 0)}

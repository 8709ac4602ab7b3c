"""`mtu`: the command line. Each sub-command imports what it needs lazily so `mtu --help` is fast."""
from __future__ import annotations

import argparse
import os
import sys

from mtu_dist.errors import UserError


def cmd_data_synth(a):
    from mtu_dist.data.synth_cmd import synth
    from mtu_dist.data.verify import summarize
    for m in synth(a.datasets, a.out, train=a.train, val=a.val, test=a.test, height=a.height,
                   width=a.width, seed=a.seed, shard_size=a.shard_size, workers=a.workers,
                   overwrite=a.overwrite):
        print(summarize(m))


def cmd_data_convert(a):
    from mtu_dist.data.convert import convert
    from mtu_dist.data.verify import summarize
    print(summarize(convert(a.kind, a.src, a.out, shard_size=a.shard_size, workers=a.workers,
                            overwrite=a.overwrite)))


def cmd_data_verify(a):
    from mtu_dist.data.manifest import load_manifest
    from mtu_dist.data.verify import summarize, verify_dataset
    bad = 0
    for path in a.paths:
        m = load_manifest(path, a.root)
        problems = verify_dataset(m)
        for p in problems:
            print(p, file=sys.stderr)
        print(summarize(m))
        print(f"  {'OK' if not problems else f'{len(problems)} problem(s)'}")
        bad += len(problems)
    if bad:
        raise UserError(f"verification failed: {bad} problem(s) (listed above)")


def cmd_forget_make(a):
    from mtu_dist.data.manifest import load_manifest
    from mtu_dist.compliance.request import load_request, make_request, write_request
    m = load_manifest(a.dataset, a.root)
    exclude = load_request(a.exclude, m) if a.exclude else None
    root, forgotten = None, ()
    if getattr(a, "from"):  # the next request for a lineage: names its root, draws what it has not forgotten
        from mtu_dist.compliance.lineage import read_lineage
        _, rec = read_lineage(getattr(a, "from"))
        root, forgotten = rec["root"]["model_sha256"], rec["cumulative"]
    raw = make_request(m, fraction=a.fraction, setting=a.setting, tasks=a.tasks, seed=a.seed, exclude=exclude,
                       exclude_ids=forgotten, lineage_root=root)
    req = write_request(raw, a.out, overwrite=a.overwrite, manifest=m)  # validated before anything is written
    print(f"{a.out}: {req.setting} request, {len(req.entries)} instances, tasks "
          f"{list(req.target_tasks())}, sha256 {req.sha256[:12]}")


def cmd_forget_check(a):
    from mtu_dist.data.manifest import load_manifest
    from mtu_dist.compliance.request import load_request
    m = load_manifest(a.dataset, a.root)
    req = load_request(a.request, m)
    print(f"{a.request}: OK — {req.setting} request on {req.dataset}, {len(req.entries)} instances, "
          f"{len(req.pairs())} (instance, task) pairs, sha256 {req.sha256}")
    if getattr(a, "from"):  # what `mtu unlearn --from` would make of it: the same checks, nothing run
        from mtu_dist.runner.checkpoint import read_state
        from mtu_dist.compliance.lineage import start_step
        lin = start_step(read_state(getattr(a, "from")), req, m, method="-")
        print(f"  against the lineage of {getattr(a, 'from')} (step {lin.depth}): "
              f"{sum(map(len, lin.new.values()))} new pair(s), {len(lin.skipped)} already forgotten (would be skipped)"
              + (f": {', '.join(lin.skipped[:5])}{', ...' if len(lin.skipped) > 5 else ''}" if lin.skipped else ""))


def _config(a, base: dict | None = None):
    from mtu_dist.config import load_config
    return load_config(a.config, a.set, base=base)


def cmd_train(a):
    cfg = _config(a)  # a bad config fails before torch is imported
    from mtu_dist.runner.commands import train_command
    _print_summary(train_command(cfg, name=a.name, resume=a.resume, overwrite=a.overwrite,
                                 tracking_uri=a.tracking_uri))


def cmd_retrain(a):
    cfg = _config(a)
    from mtu_dist.runner.commands import retrain_command
    _print_summary(retrain_command(cfg, request=a.request, name=a.name, resume=a.resume,
                                   overwrite=a.overwrite, tracking_uri=a.tracking_uri, original=a.original))


def cmd_unlearn(a):
    from mtu_dist.runner.commands import config_from_checkpoint, unlearn_command
    base = config_from_checkpoint(getattr(a, "from"))
    if a.tuned:  # the knobs `mtu tune` chose for the method, before any --set item
        from mtu_dist.config import load_config
        from mtu_dist.studies.tune import chosen_overrides
        method = a.method or load_config(a.config, a.set, base=base).unlearn.method
        a.set = [*chosen_overrides(a.tuned, method), f"unlearn.method={method}", *a.set]
    cfg = _config(a, base=base)
    if a.method:
        cfg.unlearn.method = a.method
    _print_summary(unlearn_command(cfg, request=a.request, origin=getattr(a, "from"), name=a.name, resume=a.resume,
                                   overwrite=a.overwrite, tracking_uri=a.tracking_uri, retrain=a.retrain))


def cmd_eval(a):
    from mtu_dist.runner.commands import config_from_checkpoint, eval_command
    if a.retrain and not a.request:
        raise UserError("--retrain needs --request (the request the retrain run removed)")
    _print_summary(eval_command(_config(a, base=config_from_checkpoint(a.ckpt)), ckpt=a.ckpt, request=a.request,
                                tracking_uri=a.tracking_uri, retrain=a.retrain))


def cmd_score(a):
    from mtu_dist.evaluation.scoring import block_table, score_command
    report = score_command(a.run, original=a.original, retrain=a.retrain, tracking_uri=a.tracking_uri)
    print(block_table(report["unlearning"]))
    _print_cumulative(report)


def _print_summary(report: dict) -> None:
    from mtu_dist.reporting.tables import split_table
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(split_table(report))
        if report.get("unlearning"):
            from mtu_dist.evaluation.scoring import block_table
            print(block_table(report["unlearning"]))
            _print_cumulative(report)


def _print_cumulative(report: dict) -> None:
    """A lineage step's scores on everything its lineage forgot (beyond the first request)."""
    from mtu_dist.evaluation.scoring import block_table
    cum = report.get("cumulative")
    if cum and not cum["same_as_request"]:
        print(f"\ncumulative forget set: {cum['pairs']} pairs over {cum['depth']} requests, against the original "
              f"{cum['root']}")
        print(block_table(cum["unlearning"]))


def cmd_sweep(a):
    from mtu_dist.studies.sweep.driver import run_sweep
    run_sweep(a.grid, out=a.out, tracking_uri=a.tracking_uri, dry_run=a.dry_run)


def cmd_compare(a):
    from mtu_dist.reporting.compare import compare_command
    compare_command(parent=a.parent, experiment=a.experiment, sweep=a.sweep, tracking_uri=a.tracking_uri, out=a.out)


def cmd_tune(a):
    from mtu_dist.studies.tune import tune_command
    tune_command(a)


def cmd_report(a):
    from mtu_dist.reporting.report import report_command
    report_command(parent=a.parent, experiment=a.experiment, bench=a.bench, tracking_uri=a.tracking_uri, out=a.out)


def cmd_lineage(a):
    from mtu_dist.compliance.lineage import lineage_command
    lineage_command(a.run, write_request=a.write_request, as_json=a.json, show_pairs=a.pairs, overwrite=a.overwrite)


def cmd_audit(a):
    from mtu_dist.compliance.audit import audit_command
    audit_command(a.runs, request=a.request, tracking_uri=a.tracking_uri)


def cmd_server(a):
    from mtu_dist.reporting.server import serve
    serve(store=a.store, artifacts=a.artifacts, host=a.host, port=a.port, workers=a.workers)


def cmd_demo(a):
    from mtu_dist.studies.demo import run_demo
    run_demo(a)


def _data_args(p, out=True):
    if out:
        p.add_argument("--out", default="data_shards", help="root folder for datasets (default: data_shards)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="samples per shard (default: per split, a multiple of 16 shards of at most 1000 samples, "
                        "sizes within one: up to 8 ranks x 2 loader workers each read their own shards)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="writer processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset (atomically)")


def _run_args(p, run: bool = True):
    p.add_argument("--config", action="append", default=[], help="YAML config (repeatable; later wins)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a config field")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    if run:
        p.add_argument("--name", help="run folder name under <out>/<dataset>/")
        p.add_argument("--overwrite", action="store_true", help="redo an existing run (its final model is replaced only at the end)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mtu", description="Interference-aware multi-task unlearning, data-parallel.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="generate, convert and verify WebDataset shards").add_subparsers(
        dest="data_command", required=True, metavar="ACTION")
    p = data.add_parser("synth", help="write the synthetic benchmarks (no download)")
    p.add_argument("--datasets", nargs="+", default=["synth-indoor", "synth-street"])
    p.add_argument("--train", type=int, default=384, help="train samples per dataset (default: 384)")
    p.add_argument("--val", type=int, default=128, help="val samples per dataset (default: 128)")
    p.add_argument("--test", type=int, default=0, help="test samples per dataset (default: 0)")
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    _data_args(p)
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("convert", help="convert preprocessed NYUv2/Cityscapes (MTAN/LibMTL layout)")
    p.add_argument("kind", choices=["nyuv2", "cityscapes"])
    p.add_argument("src", help="folder with {train,val}/{image,label,depth[,normal]}/N.npy")
    _data_args(p)
    p.set_defaults(func=cmd_data_convert)
    p = data.add_parser("verify", help="check shards against their manifest")
    p.add_argument("paths", nargs="+", help="dataset folder, its manifest.json, or a dataset name")
    p.add_argument("--root", default="data_shards")
    p.set_defaults(func=cmd_data_verify)

    forget = sub.add_parser("forget", help="make and check forget requests").add_subparsers(
        dest="forget_command", required=True, metavar="ACTION")
    p = forget.add_parser("make", help="draw a forget request and write it to a file")
    p.add_argument("--dataset", required=True, help="dataset name or folder")
    p.add_argument("--fraction", type=float, required=True)
    p.add_argument("--setting", choices=["full", "partial"], required=True)
    p.add_argument("--tasks", nargs="+", help="target tasks (partial setting)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude", help="an existing request whose instances must not be drawn (dev requests)")
    p.add_argument("--from", help="an unlearning run: the request is for its lineage (lineage_root) and draws "
                   "no instance the lineage has already forgotten")
    p.add_argument("--out", required=True, help="output .yaml or .json")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--root", default="data_shards")
    p.set_defaults(func=cmd_forget_make)
    p = forget.add_parser("check", help="validate a forget request against a dataset")
    p.add_argument("request")
    p.add_argument("--dataset", required=True)
    p.add_argument("--from", help="a model (run folder): also check the request against its lineage (repeated "
                   "pairs, another lineage root)")
    p.add_argument("--root", default="data_shards")
    p.set_defaults(func=cmd_forget_check)

    p = sub.add_parser("train", help="train the original multi-task model")
    _run_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run's last good checkpoint")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("retrain", help="train from scratch on the retain signal of a request (gold standard)")
    _run_args(p)
    p.add_argument("--request", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--original", help="the original model: the run also writes its unlearning block (UIS against "
                   "it; itself as the retrain reference, the floor of UIS)")
    p.set_defaults(func=cmd_retrain)
    p = sub.add_parser("unlearn", help="apply an unlearning method to a trained checkpoint")
    _run_args(p)
    p.add_argument("--method", help="registered method (overrides unlearn.method)")
    p.add_argument("--request", required=True)
    p.add_argument("--from", required=True, help="checkpoint folder or run folder of the original model")
    p.add_argument("--resume", action="store_true", help="continue from the run's last good checkpoint")
    p.add_argument("--retrain", help="retrain run on the same request: adds the gap to retrain and the cost ratio")
    p.add_argument("--tuned", help="tuned.yaml written by `mtu tune`: the method's chosen knobs (--set items still win)")
    p.set_defaults(func=cmd_unlearn)
    p = sub.add_parser("eval", help="evaluate a checkpoint per split and task; writes metrics.json beside it")
    _run_args(p, run=False)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--request", help="forget request defining the forget/retain splits")
    p.add_argument("--retrain", help="a retrain run on --request: also score the checkpoint as a row of its own "
                   "(the original's unlearning block: what doing nothing scores)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("score", help="recompute a finished run's unlearning scores from its files (no model run)")
    p.add_argument("run", help="run folder of an unlearn or retrain run")
    p.add_argument("--original", help="the original model (default: the run's --from); its evaluation on the "
                   "run's request must be cached (mtu eval / mtu unlearn write it)")
    p.add_argument("--retrain", help="retrain run on the same request (gap to retrain, cost ratio)")
    p.add_argument("--tracking-uri", help="MLflow store the run was logged to (default: sqlite:///mlflow.db)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("sweep", help="a scaling study (world size x data size x forget fraction x method), resumable")
    p.add_argument("grid", help="grid YAML (see configs/sweep_tiny.yaml, configs/sweep_scaling.yaml)")
    p.add_argument("--out", help="sweep folder (default: sweeps/<grid name>)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the grid's, MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--dry-run", action="store_true", help="print the cells and their launch commands; run nothing")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("compare", help="tables and scaling plots of a sweep, read from MLflow and logged back to it")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--sweep", help="sweep folder (reads its parent run and tracking URI)")
    which.add_argument("--parent", help="the sweep's parent run id")
    which.add_argument("--experiment", help="experiment name: its latest sweep")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--out", help="output folder (default: <sweep>/report or reports/<name>-<id>)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("tune", help="choose each method's knobs on a dev forget request (same trial count for every method)")
    _run_args(p, run=False)
    p.add_argument("--request", required=True, help="the DEV request (never the evaluation request)")
    p.add_argument("--from", required=True, help="checkpoint folder or run folder of the original model")
    p.add_argument("--methods", nargs="+", help="registered methods (default: all)")
    p.add_argument("--space", help="search-space YAML (default: configs/tune_space.yaml)")
    p.add_argument("--trials", type=int, help="trials per method (default: the space file's; the same for every method)")
    p.add_argument("--out", help="tuning folder (default: tune/<dataset>-<setting>)")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("report", help="the paper-style table (methods x metrics, mean +- std over seeds) and plots, from MLflow")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--bench", help="benchmark folder made by bench/paper_table.py (reads its parent run and tracking URI)")
    which.add_argument("--parent", help="the benchmark's parent run id")
    which.add_argument("--experiment", help="experiment name: its latest benchmark parent run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--out", help="output folder (default: <bench>/report or reports/<name>-<id>)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("audit", help="check from its ledger that no forget pair supervised a run (non-zero on a leak)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder runs/<dataset>/<name> (retrain or unlearn)")
    p.add_argument("--request", help="the forget request file, if it moved (its sha256 must match the run's)")
    p.add_argument("--tracking-uri", help="MLflow store the run was logged to (default: MLFLOW_TRACKING_URI "
                   "or sqlite:///mlflow.db)")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("lineage", help="the chain of forget requests a model honoured, and its cumulative forget set")
    p.add_argument("run", help="run folder of an unlearning run (runs/<dataset>/<name>)")
    p.add_argument("--write-request", metavar="FILE", help="write the cumulative forget set as a request file "
                   "(mtu retrain --request FILE: the gold standard for the whole chain)")
    p.add_argument("--pairs", action="store_true", help="list every entry of the cumulative forget set")
    p.add_argument("--json", action="store_true", help="print the lineage as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --write-request file")
    p.set_defaults(func=cmd_lineage)
    p = sub.add_parser("server", help="start an MLflow tracking server (binds 127.0.0.1 unless --host says otherwise)")
    p.add_argument("--store", default="sqlite:///mlflow.db", help="backend store URI (default: sqlite:///mlflow.db)")
    p.add_argument("--artifacts", default="mlartifacts", help="artifact folder (default: mlartifacts)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("demo", help="the end-to-end demo on the embedded synthetic data")
    p.add_argument("--root", default="data_shards")
    p.add_argument("--overwrite", action="store_true", help="regenerate the synthetic shards")
    p.add_argument("--out", default="runs", help="run folders (default: runs)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    p.set_defaults(func=cmd_demo)
    return ap


def _close_progress_bars() -> None:
    """A bar the failing command left open would share its line with the error message."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def _end(status: str) -> None:
    """MLflow runs the command opened and did not finish end `status`; run folders it claimed are let go."""
    from mtu_dist.utils.lifecycle import signals_ignored
    with signals_ignored():
        if "mtu_dist.reporting.tracking" in sys.modules:
            from mtu_dist.reporting.tracking import end_open_runs
            end_open_runs(status)
        if "mtu_dist.runner.runclaim" in sys.modules:
            from mtu_dist.runner.runclaim import release_all
            release_all()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mtu_dist.utils.lifecycle import Terminated, raise_on_termination
    raise_on_termination()
    status = "FAILED"  # a bug keeps its traceback, and its runs end FAILED
    try:
        args.func(args)
        status = "FINISHED"
    except UserError as e:
        _close_progress_bars()
        print(f"mtu: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        status = "KILLED"
        _close_progress_bars()
        print("mtu: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        status = "KILLED"
        _close_progress_bars()
        print("mtu: terminated", file=sys.stderr)
        return 143
    finally:
        _end(status)
    return 0


if __name__ == "__main__":
    sys.exit(main())

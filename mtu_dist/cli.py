"""`mtu`: the command line. Each sub-command imports what it needs lazily so `mtu --help` is fast."""

from __future__ import annotations

import argparse
import os
import sys

from mtu_dist.errors import UserError


def cmd_data_synth(a):
    from mtu_dist.data.synth_cmd import synth
    from mtu_dist.data.verify import summarize

    for m in synth(
        a.datasets,
        a.out,
        train=a.train,
        val=a.val,
        test=a.test,
        height=a.height,
        width=a.width,
        seed=a.seed,
        shard_size=a.shard_size,
        workers=a.workers,
        overwrite=a.overwrite,
        progress=_progress_lines(),
    ):
        print(summarize(m))


def cmd_data_convert(a):
    from mtu_dist.data.convert import convert
    from mtu_dist.data.verify import summarize

    print(
        summarize(
            convert(
                a.kind,
                a.src,
                a.out,
                shard_size=a.shard_size,
                workers=a.workers,
                overwrite=a.overwrite,
                progress=_progress_lines(),
            )
        )
    )


def _progress_lines():
    """The writers' line per finished split: progress, left out under -q (the summary is the result)."""
    from mtu_dist.utils.logs import quiet

    return (lambda *_: None) if quiet() else print


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
    from mtu_dist.compliance.request import load_request, make_request, write_request
    from mtu_dist.data.manifest import load_manifest

    m = load_manifest(a.dataset, a.root)
    exclude = load_request(a.exclude, m) if a.exclude else None
    root, forgotten = None, ()
    if getattr(a, "from"):  # the next request for a lineage: names its root, draws what it has not forgotten
        from mtu_dist.compliance.lineage import read_lineage

        _, rec = read_lineage(getattr(a, "from"))
        root, forgotten = rec["root"]["model_sha256"], rec["cumulative"]
    raw = make_request(
        m,
        fraction=a.fraction,
        setting=a.setting,
        tasks=a.tasks,
        seed=a.seed,
        exclude=exclude,
        exclude_ids=forgotten,
        lineage_root=root,
    )
    req = write_request(raw, a.out, overwrite=a.overwrite, manifest=m)  # validated before anything is written
    print(
        f"{a.out}: {req.setting} request, {len(req.entries)} instances, tasks "
        f"{list(req.target_tasks())}, sha256 {req.sha256[:12]}"
    )


def cmd_forget_check(a):
    from mtu_dist.compliance.request import load_request
    from mtu_dist.data.manifest import load_manifest

    m = load_manifest(a.dataset, a.root)
    req = load_request(a.request, m)
    print(
        f"{a.request}: OK — {req.setting} request on {req.dataset}, {len(req.entries)} instances, "
        f"{len(req.pairs())} (instance, task) pairs, sha256 {req.sha256}"
    )
    if getattr(a, "from"):  # what `mtu unlearn --from` would make of it: the same checks, nothing run
        from mtu_dist.compliance.lineage import start_step
        from mtu_dist.runner.checkpoint import read_state

        lin = start_step(read_state(getattr(a, "from")), req, m, method="-")
        print(
            f"  against the lineage of {getattr(a, 'from')} (step {lin.depth}): "
            f"{sum(map(len, lin.new.values()))} new pair(s), {len(lin.skipped)} already forgotten (would be skipped)"
            + (f": {', '.join(lin.skipped[:5])}{', ...' if len(lin.skipped) > 5 else ''}" if lin.skipped else "")
        )


def _config(a, base: dict | None = None):
    from mtu_dist.config import load_config

    return load_config(a.config, a.set, base=base)


def cmd_train(a):
    cfg = _config(a)  # a bad config fails before torch is imported
    from mtu_dist.runner.commands import train_command

    _print_summary(train_command(cfg, name=a.name, resume=a.resume, overwrite=a.overwrite, tracking_uri=a.tracking_uri))


def cmd_retrain(a):
    cfg = _config(a)
    from mtu_dist.runner.commands import retrain_command

    _print_summary(
        retrain_command(
            cfg,
            request=a.request,
            name=a.name,
            resume=a.resume,
            overwrite=a.overwrite,
            tracking_uri=a.tracking_uri,
            original=a.original,
        )
    )


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
    _print_summary(
        unlearn_command(
            cfg,
            request=a.request,
            origin=getattr(a, "from"),
            name=a.name,
            resume=a.resume,
            overwrite=a.overwrite,
            tracking_uri=a.tracking_uri,
            retrain=a.retrain,
        )
    )


def cmd_eval(a):
    from mtu_dist.runner.commands import config_from_checkpoint, eval_command

    if a.retrain and not a.request:
        raise UserError("--retrain needs --request (the request the retrain run removed)")
    _print_summary(
        eval_command(
            _config(a, base=config_from_checkpoint(a.ckpt)),
            ckpt=a.ckpt,
            request=a.request,
            tracking_uri=a.tracking_uri,
            retrain=a.retrain,
        )
    )


def cmd_score(a):
    from mtu_dist.evaluation.scoring import block_table, score_command

    report = score_command(a.run, original=a.original, retrain=a.retrain, tracking_uri=a.tracking_uri)
    print(block_table(report["unlearning"]))
    _print_cumulative(report)


def _print_summary(report: dict) -> None:
    import torch.distributed as dist

    from mtu_dist.reporting.tables import split_table

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
        print(
            f"\ncumulative forget set: {cum['pairs']} pairs over {cum['depth']} requests, against the original "
            f"{cum['root']}"
        )
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


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples keep their lines; every option's help ends with its default: the value itself, unless the
    text says it in words (a default computed at run time, or none). Required options say so."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.required:
            return f"{text} (required)"
        if action.default is None:
            return text  # its default is worded in the text (tests/test_cli.py checks every option has one)
        shown = _shown(action.default).replace("%", "%%")  # argparse expands %-formats in help text
        return f"{text} (default: {shown})"


def _shown(default) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default)) or "none"
    return str(default)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _command(sub, name: str, help: str, *examples: str, func=None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, epilog=_examples(*examples), formatter_class=_HelpFormatter)
    if func is not None:
        p.set_defaults(func=func)
    return p


class _Methods:
    """The method registry's names, in its order, read when argparse first needs them (--method's help, or a
    value to check): importing the registry imports torch, which `mtu --help` and most commands do without."""

    def __iter__(self):
        from mtu_dist.methods import METHODS

        return iter(METHODS)

    def __contains__(self, name) -> bool:
        return name in list(self)


def _method(name: str) -> str:
    """A registered method's name; any other stops the command with the registry's one-line error."""
    if name not in _Methods():
        raise UserError(f"unknown method '{name}' (available: {', '.join(sorted(_Methods()))})")
    return name


class _Version(argparse.Action):
    """`mtu --version`: the installed package's version, looked up only when asked."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"mtu {_version()}")
        parser.exit()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mtu_dist")
    except PackageNotFoundError:  # a source tree on sys.path, not installed: pyproject.toml has it
        return "unknown (not installed)"


ORIGINAL = "runs/synth-indoor/original"
URI = "(default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working folder)"


def _data_args(p, out=True):
    if out:
        p.add_argument("--out", default="data_shards", help="root folder for datasets")
    p.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="samples per shard (default: per split, a multiple of 16 shards of at most 1000 samples, "
        "sizes within one: up to 8 ranks x 2 loader workers each read their own shards)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help=f"writer processes (default: all cores, {os.cpu_count() or 1} here)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset (atomically)")


def _run_args(p, run: str | None = None):
    """Options every model command takes; `run`: the default name of the run folder it makes (None: none)."""
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML config, repeatable, later files win (default: none: the built-in defaults, "
        "spelled out in configs/default.yaml)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, repeatable, wins over --config (default: none)",
    )
    p.add_argument("--tracking-uri", help=f"MLflow tracking URI {URI}")
    if run:
        p.add_argument("--name", help=f"run folder name under <out>/<dataset>/ (default: {run})")
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="redo an existing run (its final model is replaced only at the end)",
        )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mtu",
        formatter_class=_HelpFormatter,
        description="Interference-aware multi-task unlearning, data-parallel. `mtu COMMAND --help` for a "
        "command's options and examples.",
        epilog=_examples(
            "mtu demo",
            "mtu data synth && mtu train",
            f"mtu unlearn --method iamu --request requests/full.yaml --from {ORIGINAL}",
        ),
    )
    ap.add_argument("--version", action=_Version, help="print the installed version and exit")
    loud = ap.add_mutually_exclusive_group()
    loud.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars: warnings, errors and the results only"
    )
    loud.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="show the libraries' INFO log lines (MLflow's database set-up, DeepSpeed's accelerator); "
        "-vv: DEBUG too (default: off: their INFO and DEBUG lines hidden)",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = _command(
        sub,
        "data",
        "generate, convert and verify WebDataset shards",
        "mtu data synth",
        "mtu data verify synth-indoor synth-street",
    ).add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = _command(
        data,
        "synth",
        "write the synthetic benchmarks (no download)",
        "mtu data synth",
        "mtu data synth --train 100000 --height 96 --width 128 --workers 16",
        "mtu data synth --train 40 --val 16 --height 16 --width 24 --out data_tiny",
        func=cmd_data_synth,
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        default=["synth-indoor", "synth-street"],
        metavar="NAME",
        help="synthetic benchmarks to write",
    )
    p.add_argument("--train", type=int, default=384, help="train samples per dataset")
    p.add_argument("--val", type=int, default=128, help="val samples per dataset")
    p.add_argument("--test", type=int, default=0, help="test samples per dataset")
    p.add_argument("--height", type=int, default=48, help="image height in pixels")
    p.add_argument("--width", type=int, default=64, help="image width in pixels")
    p.add_argument(
        "--seed", type=int, default=0, help="scene seed: a sample is a pure function of (seed, split, index)"
    )
    _data_args(p)
    p = _command(
        data,
        "convert",
        "convert preprocessed NYUv2/Cityscapes (MTAN/LibMTL layout)",
        "mtu data convert nyuv2 ~/datasets/nyuv2",
        "mtu data convert cityscapes ~/datasets/cityscapes --workers 4",
        func=cmd_data_convert,
    )
    p.add_argument("kind", choices=["nyuv2", "cityscapes"], help="source dataset: %(choices)s")
    p.add_argument("src", help="folder with {train,val}/{image,label,depth[,normal]}/N.npy")
    _data_args(p)
    p = _command(
        data,
        "verify",
        "check shards against their manifest",
        "mtu data verify synth-indoor",
        "mtu data verify data_shards/synth-street/manifest.json",
        func=cmd_data_verify,
    )
    p.add_argument("paths", nargs="+", metavar="DATASET", help="dataset folder, its manifest.json, or a dataset name")
    p.add_argument("--root", default="data_shards", help="folder a dataset name is looked up in")

    forget = _command(
        sub,
        "forget",
        "make and check forget requests",
        "mtu forget make --dataset synth-indoor --fraction 0.05 --setting full --out requests/full.yaml",
        "mtu forget check requests/full.yaml --dataset synth-indoor",
    ).add_subparsers(dest="forget_command", required=True, metavar="ACTION")
    p = _command(
        forget,
        "make",
        "draw a forget request and write it to a file",
        "mtu forget make --dataset synth-indoor --fraction 0.05 --setting full --seed 0 --out requests/full.yaml",
        "mtu forget make --dataset synth-indoor --fraction 0.05 --setting partial --tasks seg "
        "--out requests/partial.yaml",
        "mtu forget make --dataset synth-indoor --fraction 0.05 --setting full --seed 1 "
        "--exclude requests/full.yaml --out requests/full-dev.yaml",
        func=cmd_forget_make,
    )
    p.add_argument("--dataset", required=True, help="dataset name (under --root) or folder")
    p.add_argument("--fraction", type=float, required=True, help="share of the train instances to forget, in (0, 1)")
    p.add_argument(
        "--setting",
        choices=["full", "partial"],
        required=True,
        help="full: whole instances, every task; partial: only the --tasks of each instance",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="target tasks (default: every task under full; partial needs them, e.g. --tasks seg)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the draw")
    p.add_argument(
        "--exclude",
        metavar="REQUEST",
        help="an existing request whose instances must not be drawn, "
        "e.g. the evaluation request when drawing a dev request (default: none)",
    )
    p.add_argument(
        "--from",
        metavar="RUN",
        help="an unlearning run: the request is for its lineage (lineage_root) "
        "and draws no instance the lineage has already forgotten (default: none: a first request)",
    )
    p.add_argument("--out", required=True, help="output .yaml or .json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--root", default="data_shards", help="folder a dataset name is looked up in")
    p = _command(
        forget,
        "check",
        "validate a forget request against a dataset",
        "mtu forget check requests/full.yaml --dataset synth-indoor",
        "mtu forget check requests/full.yaml --dataset synth-indoor --from runs/synth-indoor/iamu-full",
        func=cmd_forget_check,
    )
    p.add_argument("request", help="forget request file (.yaml or .json)")
    p.add_argument("--dataset", required=True, help="dataset name (under --root) or folder")
    p.add_argument(
        "--from",
        metavar="RUN",
        help="a model (run folder): also check the request against its lineage "
        "(repeated pairs, another lineage root) (default: none)",
    )
    p.add_argument("--root", default="data_shards", help="folder a dataset name is looked up in")

    p = _command(
        sub,
        "train",
        "train the original multi-task model",
        "mtu train",
        "mtu train --config configs/tiny.yaml",
        "mtu train --resume",
        func=cmd_train,
    )
    _run_args(p, run="original")
    p.add_argument("--resume", action="store_true", help="continue from the run's last good checkpoint")
    p = _command(
        sub,
        "retrain",
        "train from scratch on the retain signal of a request (gold standard)",
        "mtu retrain --request requests/full.yaml --name retrain-full",
        f"mtu retrain --request requests/full.yaml --original {ORIGINAL}",
        func=cmd_retrain,
    )
    _run_args(p, run="retrain-<setting>-<request sha256[:8]>")
    p.add_argument("--request", required=True, help="forget request file: its pairs never supervise the run")
    p.add_argument("--resume", action="store_true", help="continue from the run's last good checkpoint")
    p.add_argument(
        "--original",
        metavar="RUN",
        help="the original model: the run also writes its unlearning "
        "block (UIS against it; itself as the retrain reference, the floor of UIS) (default: none)",
    )
    p = _command(
        sub,
        "unlearn",
        "apply an unlearning method to a trained checkpoint",
        f"mtu unlearn --method iamu --request requests/full.yaml --from {ORIGINAL} --name iamu-full",
        f"mtu unlearn --method neggrad_plus --request requests/full.yaml --from {ORIGINAL} "
        "--set unlearn.steps=20 --retrain runs/synth-indoor/retrain-full",
        f"mtu unlearn --method iamu --request requests/full.yaml --from {ORIGINAL} --name iamu-full --resume",
        func=cmd_unlearn,
    )
    _run_args(p, run="unlearn-<method>-<setting>-<request sha256[:8]>")
    p.add_argument(
        "--method",
        type=_method,
        choices=_Methods(),
        metavar="METHOD",
        help="registered method, overrides unlearn.method: %(choices)s "
        "(default: unlearn.method of the config, neggrad_plus unless set)",
    )
    p.add_argument("--request", required=True, help="forget request file")
    p.add_argument("--from", required=True, metavar="RUN", help="checkpoint folder or run folder of the original model")
    p.add_argument("--resume", action="store_true", help="continue from the run's last good checkpoint")
    p.add_argument(
        "--retrain",
        metavar="RUN",
        help="retrain run on the same request: adds the gap to retrain and the cost ratio (default: none)",
    )
    p.add_argument(
        "--tuned",
        metavar="FILE",
        help="tuned.yaml written by `mtu tune`: the method's chosen knobs (--set items still win) (default: none)",
    )
    p = _command(
        sub,
        "eval",
        "evaluate a checkpoint per split and task; writes metrics.json beside it",
        f"mtu eval --ckpt {ORIGINAL}",
        f"mtu eval --ckpt {ORIGINAL} --request requests/full.yaml",
        func=cmd_eval,
    )
    _run_args(p)
    p.add_argument("--ckpt", required=True, help="checkpoint folder or run folder")
    p.add_argument(
        "--request",
        help="forget request defining the forget/retain splits (default: none: the retain sample and val only)",
    )
    p.add_argument(
        "--retrain",
        metavar="RUN",
        help="a retrain run on --request: also score the checkpoint as a row "
        "of its own (the original's unlearning block: what doing nothing scores) (default: none)",
    )
    p = _command(
        sub,
        "score",
        "recompute a finished run's unlearning scores from its files (no model run)",
        "mtu score runs/synth-indoor/iamu-full",
        "mtu score runs/synth-indoor/iamu-full --retrain runs/synth-indoor/retrain-full",
        func=cmd_score,
    )
    p.add_argument("run", help="run folder of an unlearn or retrain run")
    p.add_argument(
        "--original",
        metavar="RUN",
        help="the original model (default: the run's --from); its evaluation "
        "on the run's request must be cached (mtu eval / mtu unlearn write it)",
    )
    p.add_argument(
        "--retrain", metavar="RUN", help="retrain run on the same request (gap to retrain, cost ratio) (default: none)"
    )
    p.add_argument("--tracking-uri", help=f"MLflow store the run was logged to {URI}")

    p = _command(
        sub,
        "sweep",
        "a scaling study (world size x data size x forget fraction x method), resumable",
        "mtu sweep configs/sweep_tiny.yaml",
        "mtu sweep configs/sweep_scaling.yaml --dry-run",
        func=cmd_sweep,
    )
    p.add_argument("grid", help="grid YAML (see configs/sweep_tiny.yaml, configs/sweep_scaling.yaml)")
    p.add_argument("--out", help="sweep folder (default: sweeps/<the grid's name>)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: the grid's, MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the cells and their launch commands; run nothing")
    p = _command(
        sub,
        "compare",
        "tables and scaling plots of a sweep, read from MLflow and logged back to it",
        "mtu compare --sweep sweeps/tiny",
        "mtu compare --sweep sweeps/tiny --out reports/tiny",
        func=cmd_compare,
    )
    which = p.add_mutually_exclusive_group(required=True)
    required = "one of --sweep, --parent, --experiment is required"
    which.add_argument("--sweep", help=f"sweep folder (reads its parent run and tracking URI); {required}")
    which.add_argument("--parent", metavar="RUN_ID", help=f"the sweep's parent run id; {required}")
    which.add_argument("--experiment", help=f"experiment name: its latest sweep; {required}")
    p.add_argument("--tracking-uri", help=f"MLflow tracking URI {URI}")
    p.add_argument("--out", help="output folder (default: <sweep>/report or reports/<name>-<id>)")

    p = _command(
        sub,
        "tune",
        "choose each method's knobs on a dev forget request (same trial count for every method)",
        f"mtu tune --request requests/full-dev.yaml --from {ORIGINAL}",
        f"mtu tune --request requests/full-dev.yaml --from {ORIGINAL} --methods iamu neggrad_plus --trials 4",
        func=cmd_tune,
    )
    _run_args(p)
    p.add_argument("--request", required=True, help="the DEV request (never the evaluation request)")
    p.add_argument("--from", required=True, metavar="RUN", help="checkpoint folder or run folder of the original model")
    p.add_argument(
        "--methods",
        nargs="+",
        type=_method,
        choices=_Methods(),
        metavar="METHOD",
        help="registered methods to tune: %(choices)s (default: all)",
    )
    p.add_argument("--space", metavar="FILE", help="search-space YAML (default: configs/tune_space.yaml)")
    p.add_argument(
        "--trials", type=int, help="trials per method (default: the space file's; the same for every method)"
    )
    p.add_argument("--out", help="tuning folder (default: tune/<dataset>-<setting>)")
    p = _command(
        sub,
        "report",
        "the paper-style table (methods x metrics, mean +- std over seeds) and plots, from MLflow",
        "mtu report --bench bench/results/paper_table",
        "mtu report --experiment paper_table",
        func=cmd_report,
    )
    which = p.add_mutually_exclusive_group(required=True)
    required = "one of --bench, --parent, --experiment is required"
    which.add_argument(
        "--bench",
        help=f"benchmark folder made by bench/paper_table.py (reads its parent run and tracking URI); {required}",
    )
    which.add_argument("--parent", metavar="RUN_ID", help=f"the benchmark's parent run id; {required}")
    which.add_argument("--experiment", help=f"experiment name: its latest benchmark parent run; {required}")
    p.add_argument("--tracking-uri", help=f"MLflow tracking URI {URI}")
    p.add_argument("--out", help="output folder (default: <bench>/report or reports/<name>-<id>)")

    p = _command(
        sub,
        "audit",
        "check from its ledger that no forget pair supervised a run (non-zero on a leak)",
        "mtu audit runs/synth-indoor/iamu-full",
        "mtu audit runs/synth-indoor/retrain-full runs/synth-indoor/iamu-full",
        func=cmd_audit,
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder runs/<dataset>/<name> (retrain or unlearn)")
    p.add_argument(
        "--request",
        help="the forget request file, if it moved (its sha256 must match the run's) "
        "(default: the path the run recorded)",
    )
    p.add_argument("--tracking-uri", help=f"MLflow store the run was logged to {URI}")
    p = _command(
        sub,
        "lineage",
        "the chain of forget requests a model honoured, and its cumulative forget set",
        "mtu lineage runs/synth-indoor/iamu-full",
        "mtu lineage runs/synth-indoor/iamu-full --pairs --write-request cumulative.json",
        func=cmd_lineage,
    )
    p.add_argument("run", help="run folder of an unlearning run (runs/<dataset>/<name>)")
    p.add_argument(
        "--write-request",
        metavar="FILE",
        help="write the cumulative forget set as a request file "
        "(mtu retrain --request FILE: the gold standard for the whole chain) (default: none)",
    )
    p.add_argument("--pairs", action="store_true", help="list every entry of the cumulative forget set")
    p.add_argument("--json", action="store_true", help="print the lineage as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --write-request file")
    p = _command(
        sub,
        "server",
        "start an MLflow tracking server (binds 127.0.0.1 unless --host says otherwise)",
        "mtu server",
        "mtu server --port 5001 --store sqlite:///mlflow.db",
        func=cmd_server,
    )
    p.add_argument("--store", default="sqlite:///mlflow.db", help="backend store URI")
    p.add_argument("--artifacts", default="mlartifacts", help="artifact folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port to listen on")
    p.add_argument("--workers", type=int, default=1, help="server worker processes")

    p = _command(
        sub,
        "demo",
        "the end-to-end demo on the embedded synthetic data",
        "mtu demo",
        "mtu -q demo --out runs-demo",
        func=cmd_demo,
    )
    p.add_argument("--root", default="data_shards", help="folder of the synthetic shards (written if missing)")
    p.add_argument("--overwrite", action="store_true", help="regenerate the synthetic shards")
    p.add_argument("--out", default="runs", help="run folders")
    p.add_argument("--tracking-uri", help=f"MLflow tracking URI {URI}")
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
    try:
        args = build_parser().parse_args(argv)
    except UserError as e:  # a --method the registry does not know: its one line, as at run time
        print(f"mtu: error: {e}", file=sys.stderr)
        return 2
    from mtu_dist.utils.logs import configure

    configure(quiet_flag=args.quiet, verbose=args.verbose)  # before the libraries are imported: some log then
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

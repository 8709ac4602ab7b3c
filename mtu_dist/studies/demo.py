"""`mtu demo`: the whole pipeline on the embedded synthetic data, in one process.

synthetic shards -> original model -> a full-task and a partial-task forget request -> retrain for
each (the gold standard) -> every registered method but iamu's ablations (the paper table compares
those: `bench/paper_table.py`) -> evaluation -> a table per setting, with all runs as children of one
MLflow parent run. About six minutes on 2 idle cores.

Each table names every metric with its unit and direction, marks the best value of each column and the
retrain as the reference row (tables.py); it is printed, saved as Markdown, CSV and JSON rows under
`<out>/demo/` and logged to the parent run (artifacts/demo), which also gets per-method summary metrics
(`<setting>/<method>/uis`, ...) and the figures `uis.png` and `interference.png`. `mtu report --parent ID`
shows the tables again. Only the presentation lives here: what runs, in which order, with which seeds is
the pipeline above.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mtu_dist.config import load_config
from mtu_dist.data.manifest import load_manifest
from mtu_dist.data.verify import summarize, verify_dataset
from mtu_dist.errors import UserError
from mtu_dist.tasks import TASKS
from mtu_dist.utils.fileio import atomic_write_bytes, atomic_write_text
from mtu_dist.utils.lifecycle import Terminated

DEMO_DATASET = "synth-indoor"
DATASETS = [DEMO_DATASET]  # the one the demo runs on (each dataset's samples depend only on its own seed)
REQUESTS = {"full": {"setting": "full", "tasks": None}, "partial": {"setting": "partial", "tasks": ["seg"]}}


def ensure_synthetic(root: str, overwrite: bool = False):
    from mtu_dist.data.synth_cmd import synth

    missing = [d for d in DATASETS if overwrite or not (Path(root) / d / "manifest.json").is_file()]
    if missing:
        synth(
            missing,
            root,
            train=384,
            val=128,
            test=0,
            height=48,
            width=64,
            seed=0,
            shard_size=64,
            workers=os.cpu_count() or 1,
            overwrite=True,
            progress=lambda *_: None,
        )
    return [load_manifest(Path(root) / d) for d in DATASETS]


def _requests(manifest, out: Path) -> dict[str, Path]:
    from mtu_dist.compliance.request import make_request, write_request

    paths = {}
    for name, spec in REQUESTS.items():
        path = out / f"{manifest.dataset}-{name}.yaml"
        if not path.exists():
            write_request(make_request(manifest, fraction=0.05, seed=0, **spec), path)
        paths[name] = path
    return paths


def run_demo(args) -> None:
    from mtu_dist.evaluation.scoring import score_command
    from mtu_dist.methods import METHODS
    from mtu_dist.reporting.report import ABLATIONS
    from mtu_dist.reporting.tracking import Tracker
    from mtu_dist.runner.commands import eval_command, retrain_command, train_command, unlearn_command

    for m in ensure_synthetic(args.root, args.overwrite):
        problems = verify_dataset(m)
        print(summarize(m) + ("\n  verified OK" if not problems else ""))
        if problems:
            raise UserError(f"{m.root}: {len(problems)} problem(s), first: {problems[0]}")
    base = {"data": {"dataset": DEMO_DATASET, "root": args.root}, "out": args.out}
    cfg = lambda extra=(): load_config(overrides=list(extra), base=base)  # noqa: E731
    parent = Tracker(
        enabled=True, uri=args.tracking_uri, experiment=DEMO_DATASET, run_name="demo", tags={"mtu.command": "demo"}
    )
    os.environ["MTU_PARENT_RUN_ID"] = parent.run_id
    common = {"tracking_uri": args.tracking_uri}
    status = "FAILED"  # an interrupt ends it KILLED (mtu's exit path ends every run left open)
    try:
        original = Path(args.out) / DEMO_DATASET / "original"
        if not (original / "final" / "metrics.json").is_file():
            train_command(cfg(), name="original", resume=True, overwrite=False, **common)
        manifest = load_manifest(Path(args.root) / DEMO_DATASET)
        requests = _requests(manifest, Path(args.out) / "requests")
        results = {}
        for setting, req in requests.items():
            rows = {"original": eval_command(cfg(), ckpt=str(original), request=str(req), **common)}
            retrain = Path(args.out) / DEMO_DATASET / f"retrain-{setting}"
            retrain_command(cfg(), request=str(req), name=retrain.name, resume=False, overwrite=True, **common)
            rows["retrain"] = score_command(str(retrain), original=str(original), retrain=None, **common)  # its UIS
            for method in (m for m in METHODS if m not in ABLATIONS):
                rows[method] = unlearn_command(
                    cfg([f"unlearn.method={method}"]),
                    request=str(req),
                    origin=str(original),
                    name=f"{method}-{setting}",
                    overwrite=True,
                    retrain=str(retrain),
                    **common,
                )
            rows["original"] = {**rows["original"], "time_s": _training_time(original)}  # eval has no time of its own
            results[setting] = present(parent, setting, req, rows, Path(args.out), order=len(results))
        figures(parent, results, Path(args.out))
        status = "FINISHED"
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    finally:
        os.environ.pop("MTU_PARENT_RUN_ID", None)
        parent.finish(status)
    uri = parent.uri
    print(
        f"\nAll runs are children of the MLflow run 'demo' ({parent.run_id}) in experiment {DEMO_DATASET}; next:\n"
        f"  mtu report --parent {parent.run_id} --tracking-uri {uri}\n"
        f"  mlflow ui --backend-store-uri {uri}"
    )


def _training_time(run: Path) -> float | None:
    """The original's training wall time, from its final metrics.json (train writes `time_s`)."""
    path = run / "final" / "metrics.json"
    return json.loads(path.read_text()).get("time_s") if path.is_file() else None


def summary_metrics(setting: str, rows: dict[str, dict]) -> dict[str, float]:
    """Per method, the table's scores as metrics of the parent run: `<setting>/<method>/<score>` and
    `<setting>/<method>/<split>/<task>/<primary metric>` (MLflow's chart view of the parent)."""
    out = {}
    for method, s in rows.items():
        out |= {f"{setting}/{method}/{k}": s[k] for k in ("uis", "mia_auc", "gap_retrain", "time_s")}
        out |= {
            f"{setting}/{method}/{sp}/{t}/{TASKS[t].primary}": v
            for sp, tasks in s["splits"].items()
            for t, v in tasks.items()
        }
    return {k: float(v) for k, v in out.items() if v is not None}


def present(parent, setting: str, request: Path, reports: dict[str, dict], out: Path, order: int) -> dict:
    """Print the setting's table, save it (Markdown, CSV, JSON rows) under <out>/demo/, log it and the
    summary metrics to the parent run. Returns the summary rows."""
    from mtu_dist.reporting.report import DEMO_FOLDER, demo_section
    from mtu_dist.reporting.tables import csv_text, method_table, plain, summary

    rows = {name: summary(rep) for name, rep in reports.items()}
    record = {"dataset": DEMO_DATASET, "setting": setting, "request": str(request), "order": order, "rows": rows}
    print(f"\n## {DEMO_DATASET}, {setting}-task request ({request})\n")
    print(plain(method_table(rows)))
    folder = out / DEMO_FOLDER
    stem = f"{DEMO_DATASET}-{setting}"
    files = {
        f"{stem}.md": demo_section(record),
        f"{stem}.csv": csv_text(method_table(rows)),
        f"{stem}.json": json.dumps(record, indent=2) + "\n",
    }
    for name, text in files.items():
        atomic_write_text(folder / name, text)
        parent.log_artifact(folder / name, DEMO_FOLDER)
    parent.log_metrics(summary_metrics(setting, rows), 0)
    parent.flush()
    return rows


def figures(parent, results: dict[str, dict], out: Path) -> None:
    """The UIS and interference figures of every setting, saved under <out>/demo/ and logged to the parent."""
    from mtu_dist.reporting.report import DEMO_FOLDER, demo_figures

    folder = out / DEMO_FOLDER
    for name, data in demo_figures(results).items():
        atomic_write_bytes(folder / name, data)
        parent.log_artifact(folder / name, DEMO_FOLDER)
        print(f"wrote {folder / name}")

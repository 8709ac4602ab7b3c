"""`mtu demo`: the whole pipeline on the embedded synthetic data, in one process.

synthetic shards -> original model -> a full-task and a partial-task forget request -> retrain for
each (the gold standard) -> every registered method but iamu's ablations (the paper table compares
those: `bench/paper_table.py`) -> evaluation -> a table per setting, with all runs as children of one
MLflow parent run. About six minutes on 2 idle cores.
"""
from __future__ import annotations

import os
from pathlib import Path

from mtu_dist.config import load_config
from mtu_dist.data.manifest import load_manifest
from mtu_dist.data.verify import summarize, verify_dataset
from mtu_dist.errors import UserError
from mtu_dist.utils.lifecycle import Terminated
from mtu_dist.tasks import TASKS

DATASETS = ["synth-indoor", "synth-street"]
DEMO_DATASET = "synth-indoor"
REQUESTS = {"full": {"setting": "full", "tasks": None}, "partial": {"setting": "partial", "tasks": ["seg"]}}


def ensure_synthetic(root: str, overwrite: bool = False):
    from mtu_dist.data.synth_cmd import synth
    missing = [d for d in DATASETS if overwrite or not (Path(root) / d / "manifest.json").is_file()]
    if missing:
        synth(missing, root, train=384, val=128, test=0, height=48, width=64, seed=0, shard_size=64,
              workers=os.cpu_count() or 1, overwrite=True, progress=lambda *_: None)
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
    from mtu_dist.runner.commands import eval_command, retrain_command, train_command, unlearn_command
    from mtu_dist.evaluation.scoring import score_command
    from mtu_dist.methods import METHODS
    from mtu_dist.reporting.report import ABLATIONS
    from mtu_dist.reporting.tracking import Tracker
    for m in ensure_synthetic(args.root, args.overwrite):
        problems = verify_dataset(m)
        print(summarize(m) + ("\n  verified OK" if not problems else ""))
        if problems:
            raise UserError(f"{m.root}: {len(problems)} problem(s), first: {problems[0]}")
    base = {"data": {"dataset": DEMO_DATASET, "root": args.root}, "out": args.out}
    cfg = lambda extra=(): load_config(overrides=list(extra), base=base)  # noqa: E731
    parent = Tracker(enabled=True, uri=args.tracking_uri, experiment=DEMO_DATASET, run_name="demo", tags={"mtu.command": "demo"})
    os.environ["MTU_PARENT_RUN_ID"] = parent.run_id
    common = {"tracking_uri": args.tracking_uri}
    status = "FAILED"  # an interrupt ends it KILLED (mtu's exit path ends every run left open)
    try:
        original = Path(args.out) / DEMO_DATASET / "original"
        if not (original / "final" / "metrics.json").is_file():
            train_command(cfg(), name="original", resume=True, overwrite=False, **common)
        manifest = load_manifest(Path(args.root) / DEMO_DATASET)
        requests = _requests(manifest, Path(args.out) / "requests")
        for setting, req in requests.items():
            rows = {"original": eval_command(cfg(), ckpt=str(original), request=str(req), **common)}
            retrain = Path(args.out) / DEMO_DATASET / f"retrain-{setting}"
            retrain_command(cfg(), request=str(req), name=retrain.name, resume=False, overwrite=True, **common)
            rows["retrain"] = score_command(str(retrain), original=str(original), retrain=None, **common)  # its UIS
            for method in (m for m in METHODS if m not in ABLATIONS):
                rows[method] = unlearn_command(cfg([f"unlearn.method={method}"]), request=str(req), origin=str(original),
                                               name=f"{method}-{setting}", overwrite=True, retrain=str(retrain), **common)
            print(f"\n## {DEMO_DATASET}, {setting}-task request ({req})\n")
            print(method_table(rows))
        status = "FINISHED"
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    finally:
        os.environ.pop("MTU_PARENT_RUN_ID", None)
        parent.finish(status)
    print("\nAll runs are in MLflow (experiment synth-indoor, parent run 'demo'): `mlflow ui --backend-store-uri sqlite:///mlflow.db`")


SCORES = {"UIS": lambda u: (u["uis"] or {}).get("mean"), "MIA AUC": lambda u: u["mia_auc"],
          "gap pp": lambda u: u["gap_retrain"]}  # column -> value in a run's `unlearning` block


def method_table(rows: dict[str, dict]) -> str:
    """Methods x splits: the primary metric of every task per split, the unlearning scores (UIS: lower
    is better; MIA AUC: the nearer the retrain's, the better; gap to retrain in percentage points) and
    the wall time. A score a row has no reference for is left empty."""
    splits = [sp for sp in ("forget", "forget_kept", "retain", "val") if sp in next(iter(rows.values()))["splits"]]
    cols = [(sp, t) for sp in splits for t in TASKS if t in next(iter(rows.values()))["splits"][sp]]
    head = "| method | " + " | ".join(f"{sp} {t}" for sp, t in cols) + " | " + " | ".join(SCORES) + " | time s |"
    lines = [head, "|" + "---|" * (len(cols) + len(SCORES) + 2)]
    for name, rep in rows.items():
        cells = [f"{rep['splits'][sp][t][TASKS[t].primary]:.3f}" for sp, t in cols]
        scores = [score(rep["unlearning"]) if rep.get("unlearning") else None for score in SCORES.values()]
        cells += ["" if v is None else f"{v:.3f}" for v in scores]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rep.get('time_s', 0):.1f} |")
    return "\n".join(lines)

"""Successive forget requests: k = 1..K requests of 2% of the instances each, per method, on both benchmarks.

For each benchmark (synth-indoor, synth-street): one original (trained once); per request sequence
(`--seeds`, default 3) K full-task requests of `fraction` of the train instances each, drawn one after
another like `mtu forget make --from` (none repeats an instance already forgotten), and for every k a
retrain on the cumulative retain signal (the gold standard after k requests). Per method, a lineage:
step k is `mtu unlearn` on request k from step
k-1's model, scored against the original and retrain k on the cumulative forget set (metrics.json
"cumulative"). Every method runs with the same knobs (the config defaults, `unlearn.stop_band` 0: a
target task stops being ascended once its forget pairs reach the parent's val level).

Reported per (benchmark, method, k), mean ± std over the sequences: cumulative UIS, gap to retrain (pp),
MIA AUC, the per-request UIS,
and the chain's cumulative cost against one retrain per request (sum of the retrains 1..k). Printed as
Markdown tables and written to `<out>/lineage.json`, `<out>/lineage.md` and `<out>/uis_vs_requests.png`.

    .venv/bin/python bench/lineage.py            # default size (25 minutes measured on 2 cores)
    .venv/bin/python bench/lineage.py --quick    # tiny data, 2 methods, K = 2 (tests)

Resumable: a run whose record (`cells/<name>.json`) holds the sha256 of the spec it would run now is
skipped. In-process calls of the `mtu` commands; MLflow in `<out>/mlflow.db`, each chain as nested runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtu_dist.config import load_config  # noqa: E402
from mtu_dist.utils.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file  # noqa: E402

DATASETS = ("synth-indoor", "synth-street")
EXPERIMENT = "lineage"
REQUEST_SEED = 500  # request k of sequence `seed` is drawn with seed REQUEST_SEED + 100 * seed + k
SIZES = {
    "default": {
        "train": 384,
        "val": 64,
        "height": 32,
        "width": 40,
        "shard_size": 48,
        "requests": 5,
        "fraction": 0.02,
        "config": {
            "model": {"width": 16, "head_width": 16},
            "train": {"epochs": 30, "global_batch": 16},
            "unlearn": {"forget_batch": 8, "retain_batch": 16, "stop_band": 0.0},
            "eval": {"batch": 32, "retain_sample": 64},
        },
        "methods": [
            "finetune",
            "grad_ascent",
            "neggrad_plus",
            "random_label",
            "l1_sparse",
            "salun",
            "scrub",
            "pcgrad",
            "orthograd",
            "iamu",
        ],
        "datasets": list(DATASETS),
        "seeds": [0, 1, 2],
    },
    "quick": {
        "train": 40,
        "val": 16,
        "height": 16,
        "width": 24,
        "shard_size": 8,
        "requests": 2,
        "fraction": 0.05,
        "config": {
            "model": {"width": 8, "head_width": 8},
            "train": {"epochs": 2, "global_batch": 8},
            "unlearn": {"steps": 4, "forget_batch": 4, "retain_batch": 8, "stop_band": 0.0},
            "eval": {"batch": 8, "retain_sample": 8},
        },
        "methods": ["neggrad_plus", "iamu"],
        "datasets": ["synth-indoor"],
        "seeds": [0],
    },
}


class Bench:
    def __init__(self, a, size: dict):
        self.a, self.size = a, size
        self.out = Path(a.out).resolve()
        self.uri = f"sqlite:///{self.out / 'mlflow.db'}"
        self.methods = a.methods or size["methods"]

    def cfg(self, dataset: str, sets=()):
        conf = json.loads(json.dumps(self.size["config"]))
        conf.update(
            {
                "data": {"dataset": dataset, "root": str(self.out / "data"), "workers": 0},
                "out": str(self.out / "runs"),
                "tracking": {"experiment": EXPERIMENT},
            }
        )
        conf["unlearn"]["checkpoint_every"] = 0
        return load_config(overrides=list(sets), base=conf)

    def fresh(self, name: str, spec: dict, run: Path) -> tuple[bool, str]:
        """(must run, spec sha256): a run is redone unless its record holds this spec and it finished."""
        sha = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
        rec = self.out / "cells" / f"{name}.json"
        done = (
            rec.is_file()
            and json.loads(rec.read_text()).get("spec") == sha
            and (run / "final" / "metrics.json").is_file()
        )
        return not done, sha

    def mark(self, name: str, sha: str) -> None:
        atomic_write_json(self.out / "cells" / f"{name}.json", {"spec": sha})

    # ---------------- the pipeline ----------------

    def run(self) -> list[dict]:
        """Per benchmark one original; per request sequence (seed) its requests, retrains and chains."""
        rows = []
        for ds in self.a.datasets or self.size["datasets"]:
            manifest = self.data(ds)
            original = self.original(ds, manifest)
            for seed in self.a.seeds if self.a.seeds is not None else self.size["seeds"]:
                requests, cumulative = self.requests(manifest, original, seed)
                retrains = [self.retrain(ds, k, c, seed) for k, c in enumerate(cumulative, 1)]
                rows += [
                    {**self.retrain_row(ds, k, r, c, original), "seed": seed}
                    for k, (r, c) in enumerate(zip(retrains, cumulative), 1)
                ]
                for m in self.methods:
                    rows += [{**row, "seed": seed} for row in self.chain(ds, m, original, requests, retrains, seed)]
        return rows

    def data(self, dataset: str):
        from mtu_dist.data.synth_cmd import synth_once

        return synth_once(
            self.out / "data", dataset, {k: self.size[k] for k in ("train", "val", "height", "width", "shard_size")}
        )

    def original(self, dataset: str, manifest) -> Path:
        from mtu_dist.runner.commands import train_command

        run = self.out / "runs" / dataset / "original"
        cfg = self.cfg(dataset)
        must, sha = self.fresh(
            f"{dataset}-original", {"config": _training(cfg), "data": sha256_file(manifest.root / "manifest.json")}, run
        )
        if must:
            print(f"{dataset}: training the original")
            train_command(cfg, name="original", resume=False, overwrite=True, tracking_uri=self.uri)
            self.mark(f"{dataset}-original", sha)
        return run

    def requests(self, manifest, original: Path, seed: int) -> tuple[list[Path], list[Path]]:
        """K requests (none draws an instance an earlier one took) and the K cumulative request files."""
        from mtu_dist.compliance.request import make_request, merge_entries, request_bytes, write_request

        root_sha = _model_sha(original)
        folder = self.out / "requests" / manifest.dataset
        requests, cumulative, taken = [], [], {}
        for k in range(1, self.size["requests"] + 1):
            raw = make_request(
                manifest,
                fraction=self.size["fraction"],
                setting="full",
                tasks=None,
                seed=REQUEST_SEED + 100 * seed + k,
                exclude_ids=taken,
                lineage_root=root_sha,
            )
            path = folder / f"r{k}{_tag(seed)}.yaml"
            write_request(raw, path, overwrite=True)  # same draw, same bytes: the runs' records stay valid
            taken = merge_entries(manifest, taken, {e["id"]: tuple(e["tasks"]) for e in raw["entries"]})
            _, data = request_bytes(taken, dataset=manifest.dataset, tasks=manifest.tasks, lineage_root=root_sha)
            cum = folder / f"cumulative-{k}{_tag(seed)}.json"
            atomic_write_bytes(cum, data)
            requests.append(path)
            cumulative.append(cum)
        return requests, cumulative

    def retrain(self, dataset: str, k: int, request: Path, seed: int) -> Path:
        from mtu_dist.runner.commands import retrain_command

        run = self.out / "runs" / dataset / f"retrain-{k}{_tag(seed)}"
        cfg = self.cfg(dataset)
        must, sha = self.fresh(
            f"{dataset}-{run.name}", {"config": _training(cfg), "request": sha256_file(request)}, run
        )
        if must:
            print(f"{dataset}: retrain on the cumulative retain signal after {k} request(s)")
            retrain_command(
                cfg, request=str(request), name=run.name, resume=False, overwrite=True, tracking_uri=self.uri
            )
            self.mark(f"{dataset}-{run.name}", sha)
        return run

    def retrain_row(self, dataset: str, k: int, run: Path, request: Path, original: Path) -> dict:
        """Retrain k scored against the original on the cumulative forget set (the floor of the UIS column)."""
        from mtu_dist.errors import UserError
        from mtu_dist.evaluation.scoring import original_reference, score_command
        from mtu_dist.runner.commands import eval_command

        cfg = self.cfg(dataset)
        try:
            original_reference(str(original), sha256_file(request), cfg.eval.retain_sample)
        except UserError:  # the original's evaluation on the cumulative set, cached beside it (the chains reuse it)
            cfg.tracking.enabled = False
            eval_command(cfg, ckpt=str(original), request=str(request), tracking_uri=None)
        report = score_command(str(run), original=str(original), retrain=str(run), tracking_uri=self.uri)
        block = report["unlearning"]
        return {
            "dataset": dataset,
            "method": "retrain",
            "k": k,
            "uis": block["uis"]["mean"],
            "gap_retrain": 0.0,
            "mia_auc": block["mia_auc"],
            "uis_request": None,
            "cost_s": report["time_s"],
            "pairs": len(json.loads((run / "final" / "ledger.json").read_text())["roles"]["retain"]["keys"]),
        }

    def chain(
        self, dataset: str, method: str, original: Path, requests: list[Path], retrains: list[Path], seed: int
    ) -> list[dict]:
        from mtu_dist.runner.commands import unlearn_command

        rows, parent, spent = [], original, 0.0
        retrain_s = [json.loads((r / "final" / "metrics.json").read_text())["time_s"] for r in retrains]
        for k, (request, retrain) in enumerate(zip(requests, retrains), 1):
            run = self.out / "runs" / dataset / f"{method}-{k}{_tag(seed)}"
            cfg = self.cfg(dataset, [f"unlearn.method={method}"])
            spec = {
                "config": _unlearning(cfg),
                "request": sha256_file(request),
                "parent": _model_sha(parent),
                "retrain": _model_sha(retrain),
            }
            must, sha = self.fresh(f"{dataset}-{run.name}", spec, run)
            if must:
                print(f"{dataset} {method}: request {k} (sequence {seed})")
                t = time.perf_counter()
                unlearn_command(
                    cfg,
                    request=str(request),
                    origin=str(parent),
                    name=run.name,
                    overwrite=True,
                    tracking_uri=self.uri,
                    retrain=str(retrain),
                )
                print(f"  {time.perf_counter() - t:.1f} s")
                self.mark(f"{dataset}-{run.name}", sha)
            report = json.loads((run / "final" / "metrics.json").read_text())
            cum = report["cumulative"]
            spent = cum["cost_s"]
            rows.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "k": k,
                    "uis": cum["unlearning"]["uis"]["mean"],
                    "gap_retrain": cum["unlearning"]["gap_retrain"],
                    "mia_auc": cum["unlearning"]["mia_auc"],
                    "uis_request": report["unlearning"]["uis"]["mean"],
                    "cost_s": spent,
                    "cost_over_retrains": spent / sum(retrain_s[:k]),
                    "pairs": cum["pairs"],
                    "stop_reason": report.get("stop_reason"),
                }
            )
            parent = run
        return rows


def _tag(seed: int) -> str:
    """Run and file name suffix of request sequence `seed` (sequence 0 has none)."""
    return "" if seed == 0 else f"-s{seed}"


def _training(cfg) -> dict:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ("tracking", "out", "unlearn")}


def _unlearning(cfg) -> dict:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ("tracking", "out")}


def _model_sha(run: Path) -> str:
    return json.loads((Path(run) / "final" / "state.json").read_text())["sha256"]["model.safetensors"]


# ---------------- report ----------------


def _stat(vals: list, digits: int) -> str:
    """mean ± std over the request sequences (just the value for one)."""
    import numpy as np

    vals = [v for v in vals if v is not None]
    if not vals:
        return ""
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f}"


def _groups(rows: list[dict]):
    """(dataset, its methods in order, k values, (method, k) -> rows over seeds)."""
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == ds]
        cell: dict = {}
        for r in mine:
            cell.setdefault((r["method"], r["k"]), []).append(r)
        yield ds, list(dict.fromkeys(r["method"] for r in mine)), sorted({r["k"] for r in mine}), cell


def tables(rows: list[dict]) -> str:
    out = []
    seeds = sorted({r.get("seed", 0) for r in rows})
    spread = f" (mean ± std over {len(seeds)} request sequences)" if len(seeds) > 1 else ""
    for ds, methods, ks, cell in _groups(rows):
        for title, key, digits in (
            ("cumulative UIS (lower is better)", "uis", 4),
            ("gap to retrain on the cumulative forget set, pp (lower is better)", "gap_retrain", 2),
            ("MIA AUC on the cumulative forget set (retrain is the reference)", "mia_auc", 3),
            ("chain cost / sum of one retrain per request (lower is cheaper)", "cost_over_retrains", 3),
        ):
            out += [
                f"\n{ds}: {title}, after k requests{spread}\n",
                "| method | " + " | ".join(f"k={k}" for k in ks) + " |",
                "|---|" + "---|" * len(ks),
            ]
            out += [
                f"| {m} | " + " | ".join(_stat([r.get(key) for r in cell.get((m, k), [])], digits) for k in ks) + " |"
                for m in methods
                if not (key == "cost_over_retrains" and m == "retrain")
            ]
        last = ks[-1]
        out += [
            f"\n{ds}: cumulative cost after k={last} requests{spread}\n",
            "| method | chain cost s | sum of retrains 1..k, s |",
            "|---|---|---|",
        ]
        retrain_sums = [
            sum(r["cost_s"] for r in rows if r["dataset"] == ds and r["method"] == "retrain" and r.get("seed", 0) == sd)
            for sd in seeds
        ]
        for m in methods:
            if m != "retrain":
                out.append(f"| {m} | {_stat([r['cost_s'] for r in cell[(m, last)]], 1)} | {_stat(retrain_sums, 1)} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = list(_groups(rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    for ax, (ds, methods, ks, cell) in zip(axes[0], groups):
        for m in methods:
            pts = [(k, [r["uis"] for r in cell.get((m, k), []) if r["uis"] is not None]) for k in ks]
            pts = [(k, v) for k, v in pts if v]
            if pts:
                ax.errorbar(
                    [k for k, _ in pts],
                    [np.mean(v) for _, v in pts],
                    yerr=[np.std(v, ddof=1) if len(v) > 1 else 0.0 for _, v in pts],
                    marker="o",
                    capsize=3,
                    label=m,
                    linewidth=2.5 if m in ("iamu", "retrain") else 1.2,
                    **(
                        {"linestyle": "--", "color": "black"}
                        if m == "retrain"
                        else {"color": "crimson"}
                        if m == "iamu"
                        else {}
                    ),
                )
        ax.set_title(f"{ds}: UIS on the cumulative forget set")
        ax.set_xlabel("number of successive requests k")
        ax.set_ylabel("UIS (lower is better)")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny data, 2 methods, 2 requests (tests)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lineage"), help="results folder")
    ap.add_argument("--methods", nargs="+", help="methods (default: every method but iamu's ablations)")
    ap.add_argument("--datasets", nargs="+", choices=DATASETS)
    ap.add_argument("--seeds", nargs="+", type=int, help="request sequences (default: 0 1 2; --quick: 0)")
    a = ap.parse_args(argv)
    size = SIZES["quick" if a.quick else "default"]
    t0 = time.perf_counter()
    rows = Bench(a, size).run()
    wall = time.perf_counter() - t0
    text = tables(rows)
    print(text)
    print(f"\nwall time {wall:.0f} s")
    out = Path(a.out)
    atomic_write_json(out / "lineage.json", {"size": size, "wall_s": wall, "rows": rows})
    atomic_write_text(out / "lineage.md", text + "\n")
    plot(rows, out / "uis_vs_requests.png")
    print(f"wrote {out / 'lineage.json'}, {out / 'lineage.md'}, {out / 'uis_vs_requests.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every performance figure of the project, measured in one run: a table `figure | value | goal | met? |
absolute` (medians; on CUDA also each section's peak memory) and one JSON.

Sections, one after the other in this process tree (variants inside each interleaved, see each module):
  data       bench/data_throughput.py  loader delivery (2 workers) vs training-step consumption     goal >= 5x
  signals    bench/signal_engines.py         batched vs sequential signal engines, K = 2..8
  iamu       bench/iamu_step_overhead.py     iamu step vs its floor (forward + K single-signal backward
             bench/iamu_setup_vs_epoch.py    passes), goal overhead <= 15%; iamu setup vs one epoch
  reduction  bench/sharded_vs_replicated.py  replicated vs sharded: memory and bytes per rank, time at 2 ranks
  ranks      bench/runner.py           train step time, 2 ranks / 1 rank, same global batch (real
                                       `accelerate launch`)                                         goal <= 0.6
  mlflow     bench/mlflow_overhead.py  step time with tracking (sqlite store, the real Tracker) vs
                                       without; time inside Tracker calls                           goal <= 2%
  unlearn    bench/runner.py           unlearning vs retrain wall time (real commands)              goal <= 1/20

Model, batches and epochs come from the run config (defaults, `--config`, `--set`; `--quick` puts
configs/tiny.yaml first and uses tiny data and few repeats). `--device cuda` runs the models on the GPU
(NCCL for the 2-rank figures, which need 2 GPUs; with one they are reported as skipped). A section
that fails is reported as such and the others still run; the exit status is then 1.

    .venv/bin/python bench/suite.py            # full, about 10 minutes on 2 cores
    .venv/bin/python bench/suite.py --quick    # smoke run, under a minute
    bench/gpu.sh                               # CUDA, ResNet backbone (configs/resnet_gpu.yaml)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import data_throughput
import iamu_step_overhead
import mlflow_overhead
import runner
import sharded_vs_replicated
import signal_engines
import synthetic
import torch
from timing import ForeignLoad, PeakMemory, describe_load

from mtu_dist.config import load_config
from mtu_dist.errors import UserError
from mtu_dist.runner.runinfo import git_commit
from mtu_dist.utils.fileio import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "suite.json"
KS = (2, 4, 6, 8)
SIZES = {  # per section: how much is measured (quick: a smoke run, the numbers mean little)
    "full": {
        "data": dict(repeats=3, loader_samples=512, steps=10, budget_s=3.0),
        "signals": dict(repeats=5),
        "iamu": dict(repeats=5, setup_repeats=2, piece_calls=10),
        "reduction": dict(dist_repeats=10),
        "image": (synthetic.HEIGHT, synthetic.WIDTH),
        "shards": "full",
        "ranks": dict(repeats=3, epochs=2),
        "mlflow": dict(repeats=4, epochs=1),
        "original_epochs": 2,
    },
    "quick": {
        "data": dict(repeats=1, loader_samples=64, steps=3, budget_s=0.5),
        "signals": dict(repeats=1),
        "iamu": dict(repeats=1, setup_repeats=1, piece_calls=2),
        "reduction": dict(dist_repeats=2),
        "image": (16, 24),
        "shards": "tiny",
        "ranks": dict(repeats=1, epochs=1),
        "mlflow": dict(repeats=1, epochs=1),
        "original_epochs": 1,
    },
}


# --------------------------------------------------------------------------- the figures


def figure_table(methods) -> list[tuple]:
    """(key, section, label, unit, goal): every figure the suite reports, in order."""
    return [
        (
            "loader_over_step",
            "data",
            "loader delivery / train-step consumption (worse thread setting)",
            "x",
            (">=", 5.0),
        ),
        *[
            (f"signals_sequential_over_batched_k{k}", "signals", f"signals K={k}: sequential / batched time", "x", None)
            for k in KS
        ],
        ("iamu_step_overhead", "iamu", "iamu step / floor (forward + K backward) - 1", "%", ("<=", 0.15)),
        ("iamu_step_overhead_pieces", "iamu", "iamu overhead, isolated pieces / floor", "%", ("<=", 0.15)),
        ("iamu_setup_over_epoch", "iamu", "iamu setup (task subspaces) / one training epoch", "x", None),
        (
            "sharded_over_replicated_memory",
            "reduction",
            "reduced signals per rank, sharded / replicated (2 ranks)",
            "x",
            None,
        ),
        (
            "sharded_over_replicated_bytes",
            "reduction",
            "bytes sent per rank, sharded / replicated (2 ranks, ring)",
            "x",
            None,
        ),
        ("sharded_over_replicated_time", "reduction", "reduction time, sharded / replicated (2 ranks)", "x", None),
        (
            "step_time_2rank_over_1rank",
            "ranks",
            "train step time, 2 ranks / 1 rank, same global batch",
            "x",
            ("<=", 0.6),
        ),
        ("mlflow_overhead", "mlflow", "train step time with MLflow / without - 1", "%", ("<=", 0.02)),
        ("mlflow_tracker_share", "mlflow", "time inside Tracker calls / train step time", "%", ("<=", 0.02)),
        *[
            (f"unlearn_over_retrain_{m}", "unlearn", f"{m} unlearning / retrain wall time", "x", ("<=", 0.05))
            for m in methods
        ],
    ]


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f} ms"


def plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def data_figures(r: dict) -> dict:
    st, l2 = r["step"], r["loader"]["workers"]["2"]["median"]
    return {
        "loader_over_step": (
            r["ratios"]["loader_vs_step_worst"],
            f"loader {l2:.0f} samples/s; step {ms(st['1_thread']['step_s_median'])} (1 thread), "
            f"{ms(st['default_threads']['step_s_median'])} ({plural(st['default_thread_count'], 'thread')}), "
            f"batch {st['batch']}",
        )
    }


def engine_figures(r: dict) -> dict:
    out = {}
    for k in KS:
        d = r["engines"]["K"][str(k)]
        out[f"signals_sequential_over_batched_k{k}"] = (
            d["sequential_over_batched"],
            f"sequential {ms(d['sequential_s']['median'])}, batched {ms(d['batched_s']['median'])}",
        )
    return out


def iamu_figures(r: dict) -> dict:
    s, u = r["step"], r["setup"]
    floor = ms(s["floor_s"]["median"])
    return {
        "iamu_step_overhead": (
            s["overhead_measured"],
            f"iamu {ms(s['iamu_s']['median'])}, floor {floor}, K = {s['K']}",
        ),
        "iamu_step_overhead_pieces": (
            s["overhead_from_pieces"],
            f"{ms(sum(s['overhead_pieces_s'].values()))} of pieces, floor {floor}",
        ),
        "iamu_setup_over_epoch": (
            u["setup_over_epoch"],
            f"setup {u['setup_s']['median']:.2f} s, epoch {u['epoch_s']['median']:.2f} s ({u['epoch_steps']} steps)",
        ),
    }


def reduction_figures(r: dict) -> dict:
    red, out = r["reduction"], {}
    a2 = next(a for a in red["analytic"] if a["world"] == 2)
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    out["sharded_over_replicated_memory"] = (
        a2["memory_ratio"],
        f"replicated {mib(a2['replicated_block_bytes'])}, sharded {mib(a2['sharded_block_bytes'])} (1/N at N ranks)",
    )
    detail = f"replicated {mib(a2['replicated_bytes'])}, sharded {mib(a2['sharded_bytes'])}"
    if "2" in red["measured"]:
        m2 = red["measured"]["2"]["modes"]
        lo = [m2[mode]["lo_bytes_per_rank"] for mode in ("replicated", "sharded")]
        if all(lo):
            detail += f"; measured on loopback {mib(lo[0]['min'])}, {mib(lo[1]['min'])}"
        rt, st = m2["replicated"]["total_s"]["median"], m2["sharded"]["total_s"]["median"]
        out["sharded_over_replicated_time"] = (st / rt, f"replicated {ms(rt)}, sharded {ms(st)}")
    out["sharded_over_replicated_bytes"] = (a2["bytes_ratio"], detail)
    return out


def ranks_figures(r: dict) -> dict:
    t = r["median_step_s"]
    return {
        "step_time_2rank_over_1rank": (
            r["step_time_2rank_over_1rank"],
            f"1 rank {ms(t[1])}, 2 ranks {ms(t[2])} per step, global batch {r['global_batch']}",
        )
    }


def mlflow_figures(r: dict) -> dict:
    t = r["median_step_s"]
    return {
        "mlflow_overhead": (
            r["overhead"],
            f"step {ms(t['on'])} with, {ms(t['off'])} without, {plural(r['steps'], 'step')}",
        ),
        "mlflow_tracker_share": (
            r["tracker_share"],
            f"{ms(r['tracker_s_per_step'])} per step in Tracker calls ({r['points_per_run']} points per run)",
        ),
    }


def unlearn_figures(r: dict) -> dict:
    return {
        f"unlearn_over_retrain_{m}": (
            v,
            f"unlearn {r['unlearn_s'][m]:.1f} s ({r['unlearn_steps']} steps), retrain "
            f"{r['retrain_s']:.1f} s ({r['retrain_epochs']} epochs)",
        )
        for m, v in r["unlearn_over_retrain"].items()
    }


FIGURES_OF = {
    "data": data_figures,
    "signals": engine_figures,
    "iamu": iamu_figures,
    "reduction": reduction_figures,
    "ranks": ranks_figures,
    "mlflow": mlflow_figures,
    "unlearn": unlearn_figures,
}


def collect(results: dict, methods) -> dict:
    """key -> {label, value, unit, goal, met, absolute, peak_mib} or, for a section that did not run,
    {label, value: None, skipped | error}."""
    figs = {}
    values = {}
    for name, res in results.items():
        if "result" in res:
            values.update({k: (v, d, res["peak_mib"]) for k, (v, d) in FIGURES_OF[name](res["result"]).items()})
    for key, section, label, unit, goal in figure_table(methods):
        entry = {
            "label": label,
            "section": section,
            "unit": unit,
            "goal": None if goal is None else {"op": goal[0], "value": goal[1]},
        }
        res = results.get(section, {})
        if key in values:
            v, detail, peak = values[key]
            met = None if goal is None else (v >= goal[1] if goal[0] == ">=" else v <= goal[1])
            entry.update(value=v, met=met, absolute=detail, peak_mib=peak)
        else:
            why = res.get("error") or res.get("skipped") or "not measured in this run (see the section's notes)"
            entry.update(value=None, met=None, **({"error": why} if "error" in res else {"skipped": why}))
        figs[key] = entry
    return figs


def fmt(v: float, unit: str, goal: bool = False) -> str:
    if unit == "%":
        return f"{100 * v:g}%" if goal else f"{100 * v:+.1f}%"
    return f"{v:g}x" if goal else f"{v:.3g}x"


def table(figs: dict, cuda: bool) -> str:
    head = "| figure | value | goal | met? | absolute |" + (" peak CUDA MiB |" if cuda else "")
    lines = [head, "|---|---:|---|---|---|" + ("---:|" if cuda else "")]
    for f in figs.values():
        goal = "" if f["goal"] is None else f"{f['goal']['op']} {fmt(f['goal']['value'], f['unit'], goal=True)}"
        if f["value"] is None:
            cells = [
                "-",
                goal,
                "-",
                ("error: " if "error" in f else "skipped: ")
                + (f.get("error") or f["skipped"]).strip().splitlines()[-1][:120],
            ]
        else:
            cells = [fmt(f["value"], f["unit"]), goal, {True: "yes", False: "no", None: "-"}[f["met"]], f["absolute"]]
        peak = [] if not cuda else ["-" if f.get("peak_mib") is None else f"{f['peak_mib']:.0f}"]
        lines.append("| " + " | ".join([f["label"], *cells, *peak]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- running the sections


@contextlib.contextmanager
def output_to(log: Path):
    """Everything written to stdout and stderr meanwhile (Python, C libraries, child processes) goes to `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log, "w") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def run_section(name: str, fn, log: Path, device: str) -> dict:
    """Run one section with its output in `log`; its result, wall time, foreign load and peak memory, or
    its error (the other sections still run)."""
    print(f"{name} ...", file=sys.stderr, flush=True)
    out = {}
    with output_to(log), ForeignLoad() as fl, PeakMemory(device) as peak:
        try:
            out["result"] = fn()
        except Exception as e:
            traceback.print_exc()
            out["error"] = "".join(traceback.format_exception_only(e)).strip()  # the whole traceback is in the log
    out.update(wall_s=fl.result["wall_s"], machine_load=fl.result, peak_mib=peak.mib)
    print(
        f"  {out['wall_s']:.0f} s" + ("" if "result" in out else f": FAILED, log {log}\n{_tail(log)}"),
        file=sys.stderr,
        flush=True,
    )
    return out


def _tail(path: Path, n: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def check_device(device: str) -> int:
    """GPUs visible for `device` (0 on CPU); a clear error when CUDA is asked for and absent."""
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # in-process runs stay on the CPU even where a GPU is visible
        return 0
    if not torch.cuda.is_available():
        raise UserError(
            "--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
            "run on a CUDA machine or use --device cpu"
        )
    return torch.cuda.device_count()


def sections(cfg, files, sets, size: dict, work: Path, device: str, gpus: int, methods) -> dict:
    """name -> zero-argument callable (or a 'skipped' reason), in the order they run."""
    two_ranks = device == "cpu" or gpus >= 2
    h, w = size["image"]
    spec = synthetic.Spec(
        model=cfg.model,
        height=h,
        width=w,
        forget_batch=cfg.unlearn.forget_batch,
        retain_batch=cfg.unlearn.retain_batch,
        device=device,
    )
    shards = lambda: runner.make_shards(work / "shards", size["shards"])  # noqa: E731
    return {
        "data": lambda: data_throughput.measure(
            generator=False,
            batch=cfg.train.global_batch,
            model_cfg=cfg.model,
            device=device,
            workdir=work,
            **size["data"],
        ),
        # three sections: one that fails (say iamu on a device it does not support) leaves the others' figures
        "signals": lambda: signal_engines.measure(spec, ks=KS, **size["signals"]),
        "iamu": lambda: iamu_step_overhead.measure(spec, **size["iamu"]),
        "reduction": lambda: sharded_vs_replicated.measure(spec, two_ranks=two_ranks, **size["reduction"]),
        "ranks": (
            lambda: runner.throughput(work / "ranks", shards(), files=files, sets=sets, device=device, **size["ranks"])
        )
        if two_ranks
        else f"needs 2 CUDA devices, {gpus} visible",
        "mlflow": lambda: mlflow_overhead.measure(work / "mlflow", shards(), files=files, sets=sets, **size["mlflow"]),
        "unlearn": lambda: runner.unlearn_vs_retrain(
            work / "unlearn", shards(), files=files, sets=sets, methods=methods, original_epochs=size["original_epochs"]
        ),
    }


def summary(out: dict) -> dict:
    """Every figure (value, goal, met, absolute detail, peak CUDA MiB) and each section's wall time and peak
    memory, without the raw per-repeat results: the one JSON a GPU run prints."""
    return {
        "device": out["device"],
        "env": out["env"],
        "figures": {
            k: {
                f: v
                for f, v in fig.items()
                if f in ("value", "unit", "goal", "met", "absolute", "peak_mib", "error", "skipped")
            }
            for k, fig in out["figures"].items()
        },
        "sections": {
            n: {k: r.get(k) for k in ("wall_s", "peak_mib", "error", "skipped") if k in r}
            for n, r in out["sections"].items()
        },
    }


def environment(device: str) -> dict:
    env = {
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
    }
    if device == "cuda":
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--quick", action="store_true", help="smoke run: configs/tiny.yaml first, tiny data, 1 repeat")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the models run (default cpu)")
    p.add_argument("--config", action="append", default=[], help="run config YAML (repeatable; later wins)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a config field")
    p.add_argument("--methods", default="iamu", help="unlearning methods timed against the retrain (default iamu)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT})")
    p.add_argument("--workdir", type=Path, help="folder for the temporary data, runs and logs (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (section logs, runs)")
    p.add_argument(
        "--print-json",
        action="store_true",
        help="end with one line of JSON: every figure, each section's wall time and peak memory, the environment",
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="SECTION",
        help="leave a section out (repeatable): data, signals, iamu, reduction, ranks, mlflow, unlearn",
    )
    a = p.parse_args(argv)
    try:
        gpus = check_device(a.device)
        known = ("data", "signals", "iamu", "reduction", "ranks", "mlflow", "unlearn")
        if bad := [s for s in a.skip if s not in known]:
            raise UserError(f"--skip {bad[0]}: not a section; the sections are {', '.join(known)}")
        files = ([str(ROOT / "configs" / "tiny.yaml")] if a.quick else []) + [str(Path(f).resolve()) for f in a.config]
        cfg = load_config(files, a.set)
    except UserError as e:
        print(f"bench/suite.py: {e}", file=sys.stderr)
        return 2
    methods = tuple(m for m in a.methods.split(",") if m)
    size = SIZES["quick" if a.quick else "full"]
    t0, env = time.perf_counter(), environment(a.device)
    work = Path(tempfile.mkdtemp(prefix="mtu-suite-", dir=a.workdir))
    results = {}

    def write(partial: bool) -> dict:
        """The results JSON, rewritten after every section: a run stopped by a time limit keeps what it measured."""
        figs = collect(results, methods)
        env.update(
            wall_s=time.perf_counter() - t0,
            loadavg_end=list(os.getloadavg()),
            peak_rss_mib={
                "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "largest_child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            },
        )
        load = {n: r["machine_load"] for n, r in results.items() if "machine_load" in r}
        out = {
            "suite": "mtu_dist performance figures",
            "quick": a.quick,
            "device": a.device,
            "partial": partial,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "config": cfg.model_dump(mode="json"),
            "env": env,
            "figures": figs,
            "sections": {n: {k: v for k, v in r.items() if k != "machine_load"} for n, r in results.items()},
            "machine_load": load,
        }
        atomic_write_json(a.out, out)
        return out

    try:
        for name, fn in sections(cfg, files, a.set, size, work, a.device, gpus, methods).items():
            fn = "left out (--skip)" if name in a.skip else fn
            (work / name).mkdir(exist_ok=True)
            results[name] = (
                {"skipped": fn} if isinstance(fn, str) else run_section(name, fn, work / f"{name}.log", a.device)
            )
            write(partial=True)
    finally:
        if not a.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    out = write(partial=False)
    figs, load = out["figures"], out["machine_load"]
    print(table(figs, a.device == "cuda"))
    print(
        f"\n{'quick' if a.quick else 'full'} run on {a.device}, {env['wall_s']:.0f} s wall "
        f"on {env['cpu_count']} cores; "
        f"cores busy with other processes: {describe_load(load)}; results: {a.out}"
    )
    if a.print_json:
        print(json.dumps(summary(out), default=str))
    failed = [n for n, r in results.items() if "error" in r]
    bad = [k for k, f in figs.items() if f["value"] is not None and not math.isfinite(f["value"])]
    if failed or bad:
        print(
            f"failed sections: {', '.join(failed) or '-'}; non-finite figures: {', '.join(bad) or '-'}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Signal engines: `batched` vs `sequential` computation of K per-task gradient signals
(mtu_dist/distributed/signals.py).

For K = 2, 4, 6, 8 losses from ONE forward over a batch of 24 (loss k: task k mod 3 on the k-th of K
disjoint sample subsets), the time per engine call (gradients + packing), on synthetic batches
(synthetic.py). Both engines must give the same buffer (allclose, rtol = atol = 1e-5, float32).
Ratio sequential/batched = speed of batched. When batched is the slower one at K = 6 (or with
--profile), one call of each engine is profiled (torch.profiler, top ops and call counts).

    .venv/bin/python bench/signal_engines.py            # full run
    .venv/bin/python bench/signal_engines.py --quick    # 24x32 images, 3 repeats
"""

from __future__ import annotations

import sys
import warnings

import torch
from synthetic import (
    STEP_K,
    TASK_NAMES,
    Spec,
    footer,
    make_batch,
    make_model,
    measure_with,
    ms,
    parser,
    quick_spec,
    rng,
    stats,
    threads_line,
    timed,
)
from timing import median, ordered

from mtu_dist.distributed import signals as engines
from mtu_dist.distributed.gradstep import ParamLayout
from mtu_dist.tasks import TASKS
from mtu_dist.utils.fileio import atomic_write_json


def engine_losses(preds: dict, batch: dict, k: int) -> list[torch.Tensor]:
    """K losses over one graph: loss j = mean per-sample loss of task j mod 3 on sample subset j."""
    per_sample = {t: TASKS[t].per_sample_loss(preds[t], batch[t]) for t in TASK_NAMES}
    chunks = torch.arange(batch["image"].shape[0], device=batch["image"].device).tensor_split(k)
    return [per_sample[TASK_NAMES[j % len(TASK_NAMES)]][chunks[j]].mean() for j in range(k)]


def profile_engines(model, params, layout, batch, k: int, device: str, top: int = 10) -> dict:
    """torch.profiler of one call of each engine at K: the ops that make up the difference."""
    from torch.profiler import ProfilerActivity, profile

    preds = model(batch["image"])
    losses = engine_losses(preds, batch, k)
    out = {"K": k}
    for e, fn in engines.ENGINES.items():
        buf = layout.new_buffer(k, torch.float32, device)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t, _ = timed(fn, losses, params, layout, buf)
        ev = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)
        out[e] = {
            "wall_s": t,
            "ops": [{"op": a.key, "calls": a.count, "self_cpu_s": a.self_cpu_time_total / 1e6} for a in ev[:top]],
        }
    return out


def bench_engines(ks, repeats: int, spec: Spec, want_profile: bool) -> dict:
    model = make_model(spec)
    params = [p for p in model.parameters() if p.requires_grad]
    layout = ParamLayout(params, 1)
    batch = make_batch(spec.engine_batch, 100, spec)
    times = {(k, e): [] for k in ks for e in engines.ENGINES}
    fwd, diffs, vmap_warnings = [], {k: 0.0 for k in ks}, set()
    variants = [(k, e) for k in ks for e in engines.ENGINES]
    for rep in range(-1, repeats):  # rep -1: warm-up of both engines at the smallest K, not recorded
        t_fwd, preds = timed(model, batch["image"])
        losses = {k: engine_losses(preds, batch, k) for k in ks}
        bufs = {}
        for k, e in ordered(variants, rep) if rep >= 0 else [(ks[0], e) for e in engines.ENGINES]:
            buf = layout.new_buffer(k, torch.float32, spec.device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t, _ = timed(engines.ENGINES[e], losses[k], params, layout, buf)
            vmap_warnings.update(str(c.message).split("\n")[0][:200] for c in caught)
            bufs[(k, e)] = buf
            if rep >= 0:
                times[(k, e)].append(t)
        for k in ks if rep >= 0 else ks[:1]:
            a, b = bufs[(k, "sequential")], bufs[(k, "batched")]
            if not torch.allclose(a, b, rtol=1e-5, atol=1e-5):
                raise AssertionError(f"engines disagree at K={k}: max |diff| {(a - b).abs().max().item():.3g}")
            assert a.abs().sum() > 0
            diffs[k] = max(diffs[k], (a - b).abs().max().item())
        if rep >= 0:
            fwd.append(t_fwd)
        del preds, losses, bufs
    out = {"batch": spec.engine_batch, "forward_s": stats(fwd), "K": {}, "warnings": sorted(vmap_warnings)}
    for k in ks:
        s, b = median(times[(k, "sequential")]), median(times[(k, "batched")])
        paired = [x / y for x, y in zip(times[(k, "sequential")], times[(k, "batched")])]
        out["K"][str(k)] = {
            "sequential_s": stats(times[(k, "sequential")]),
            "batched_s": stats(times[(k, "batched")]),
            "sequential_over_batched": s / b,
            "paired_ratio_median": median(paired),
            "sequential_per_signal_s": s / k,
            "batched_per_signal_s": b / k,
            "max_abs_diff": diffs[k],
            "allclose_1e-5": True,
        }
    # `signal_engine: auto` (the config default) measures both engines twice on the first signals it sees
    out["auto_probe_cost_s"] = {
        str(k): 2 * (median(times[(k, "sequential")]) + median(times[(k, "batched")])) for k in ks
    }
    kp = max((k for k in ks if k <= STEP_K), default=ks[0])
    if want_profile or out["K"][str(kp)]["sequential_over_batched"] < 1:  # batched slower: show why
        out["profile"] = profile_engines(model, params, layout, batch, kp, spec.device)
    return out


def measure(
    spec: Spec | None = None,
    *,
    repeats: int = 7,
    ks=(2, 4, 6, 8),
    threads: int = 1,
    profile: bool = False,
    quick: bool = False,
) -> dict:
    """{"engines": ...} with the environment; what main() writes."""
    spec = spec or Spec()
    return measure_with(
        "signal_engines",
        spec,
        lambda section: {
            "engines": section(
                "engines", f"engines K={ks}, {repeats} repeats", lambda: bench_engines(ks, repeats, spec, profile)
            )
        },
        threads=threads,
        quick=quick,
        config={"repeats": repeats, "ks": list(ks)},
    )


def tables(res: dict) -> str:
    e = res["engines"]
    L = [
        threads_line(res),
        "",
        f"### Signal engines (one forward, batch {e['batch']}; time per call incl. packing)",
        "",
        "| K | sequential ms | batched ms | sequential/batched | paired median | max abs diff |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for k, d in e["K"].items():
        L.append(
            f"| {k} | {ms(d['sequential_s']['median'])} ({rng(d['sequential_s'])}) | "
            f"{ms(d['batched_s']['median'])} ({rng(d['batched_s'])}) | {d['sequential_over_batched']:.2f}x | "
            f"{d['paired_ratio_median']:.2f}x | {d['max_abs_diff']:.1e} |"
        )
    L.append(
        f"\nForward (batch {e['batch']}): {ms(e['forward_s']['median'])} ms. Engines agree (allclose 1e-5) at every K."
    )
    if e["warnings"]:
        L.append("Warnings raised by the engines: " + "; ".join(e["warnings"]))
    if "profile" in e:
        pr = e["profile"]
        L += [
            "",
            f"torch.profiler, one call per engine at K = {pr['K']} (top ops by self CPU time):",
            "",
            "| engine | op | calls | self CPU s |",
            "|---|---|---:|---:|",
        ]
        for eng_name in engines.ENGINES:
            for row in pr[eng_name]["ops"][:6]:
                L.append(f"| {eng_name} | {row['op']} | {row['calls']} | {row['self_cpu_s']:.3f} |")
    return "\n".join(L)


def main(argv=None) -> int:
    p = parser(__doc__, "signal_engines")
    p.add_argument("--repeats", type=int, help="repeats (default 7; quick 3)")
    p.add_argument("--ks", type=str, default="2,4,6,8", help="engine K values (default 2,4,6,8)")
    p.add_argument("--profile", action="store_true", help="profile both engines even when batched is faster")
    a = p.parse_args(argv)
    repeats = a.repeats or (3 if a.quick else 7)
    ks = tuple(int(k) for k in a.ks.split(","))
    if repeats < 1 or min(ks) < 1:
        p.error("repeats and K values must be >= 1")
    res = measure(quick_spec(a.quick), repeats=repeats, ks=ks, threads=a.threads, profile=a.profile, quick=a.quick)
    atomic_write_json(a.out, res)
    print(tables(res))
    print(footer(res, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

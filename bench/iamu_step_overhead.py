"""One `iamu` step vs its floor: what the projection, orthogonalization and packing add to the
per-task gradients every multi-task method needs.

One `iamu` step (default options, after `setup`; world 1, sequential engine, replicated) on a forget
batch of 8 + retain batch of 16 (synthetic.py), vs its floor: one forward of the concatenated batch,
the same losses, and K = 3 forget + 3 retain separate single-signal `torch.autograd.grad` calls over
the same graph. Overhead (projection, orthogonalization, packing, update) = iamu/floor - 1 (goal <=
15%); also iamu / `neggrad_plus` step (expected about K/2..K). The overhead pieces are also timed on
their own (same tensors, many calls), which resolves a few-percent overhead that the noisy step-time
ratio cannot. When the overhead misses the goal (or with --profile), one iamu step is profiled with
cProfile and the top costs are reported with file:line. With --setup-repeats the set-up it needs is
measured as well (iamu_setup_vs_epoch.py), as bench/suite.py's `iamu` section does.

    .venv/bin/python bench/iamu_step_overhead.py            # full run
    .venv/bin/python bench/iamu_step_overhead.py --quick    # 24x32 images, 3 repeats
"""

from __future__ import annotations

import cProfile
import itertools
import os
import pstats
import sys
import time

import iamu_setup_vs_epoch
import torch
from synthetic import (
    REPO,
    STEP_K,
    TASK_NAMES,
    Breakdown,
    Spec,
    clear_grads,
    clone_args,
    footer,
    make_batch,
    make_ctx,
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

from mtu_dist.methods.iamu import Iamu
from mtu_dist.methods.neggrad_plus import NegGradPlus
from mtu_dist.runner.objective import global_counts, normalised_losses
from mtu_dist.utils.fileio import atomic_write_json

OVERHEAD_GOAL = 0.15


def floor_step(model, params, forget, retain, split: dict | None = None):
    """One forward of the concatenated batch + the same K losses + K single-signal autograd.grad calls."""
    t0 = time.perf_counter()
    nf = forget["image"].shape[0]
    preds = model(torch.cat([forget["image"], retain["image"]]))
    f = normalised_losses({t: p[:nf] for t, p in preds.items()}, forget, TASK_NAMES, global_counts(forget, 1))
    r = normalised_losses({t: p[nf:] for t, p in preds.items()}, retain, TASK_NAMES, global_counts(retain, 1))
    signals = [f[t] for t in TASK_NAMES] + [r[u] for u in TASK_NAMES]
    t1 = time.perf_counter()
    grads = [torch.autograd.grad(s, params, retain_graph=True, allow_unused=True) for s in signals]
    if split is not None:
        split["forward_losses"] = t1 - t0
        split["grads"] = time.perf_counter() - t1
    return grads


def replay(bd: Breakdown, labels, n_calls: int) -> dict[str, float]:
    """Median, over n_calls rounds, of the time of every recorded call of each label (summed per round):
    the same work, on the same tensors, as in one real step, without the step's noisy autograd around it."""
    out = {}
    for label in labels:
        rounds = []
        for _ in range(n_calls):
            total = 0.0
            for fn, args, kwargs in bd.calls.get(label, []):
                a, kw = clone_args(args), clone_args(kwargs)
                t, _ = timed(fn, *a, **kw)
                total += t
            rounds.append(total)
        out[label] = median(rounds)
    return out


def profile_step(fn, top: int = 15) -> dict:
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    prof.disable()
    st = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():
        rel = os.path.relpath(file, REPO) if file.startswith(str(REPO)) else file
        rows.append(
            {"where": f"{rel}:{line}" if line else rel, "function": func, "calls": nc, "tottime_s": tt, "cumtime_s": ct}
        )
    by_tot = sorted(rows, key=lambda r: -r["tottime_s"])[:top]
    package = sorted((r for r in rows if r["where"].startswith("mtu_dist/")), key=lambda r: -r["cumtime_s"])[:top]
    return {"wall_s": wall, "top_tottime": by_tot, "package_by_cumtime": package}


def bench_step(method: Iamu, model, repeats: int, spec: Spec, n_piece_calls: int, want_profile: bool) -> dict:
    ctx = make_ctx(model)
    params = method.params
    plain = NegGradPlus({})
    forget, retain = make_batch(spec.forget_batch, 200, spec, forget=True), make_batch(spec.retain_batch, 201, spec)
    bd = Breakdown()
    bd.wrap(method, "signals", "signals")
    bd.wrap(method, "_project", "project")
    bd.wrap(method, "_orthogonalize", "orthogonalize")
    bd.wrap(method.layout, "new_buffer", "new_buffer")
    bd.wrap(method.layout, "pack", "pack")
    bd.wrap(method.layout, "unpack_into_grads", "unpack")

    def iamu():
        clear_grads(params)
        return method.step(ctx, forget, retain)

    def floor():
        clear_grads(params)
        return floor_step(model, params, forget, retain, split_now)

    def neggrad():
        clear_grads(params)
        return plain.step(ctx, forget, retain)

    fns = {"iamu": iamu, "floor": floor, "neggrad_plus": neggrad}
    times = {k: [] for k in fns}
    parts, floor_split = [], []
    for rep in range(-1, repeats):  # rep -1: warm-up (one neggrad_plus step), not recorded
        for name in ordered(fns, rep) if rep >= 0 else ["neggrad_plus"]:
            split_now = {}
            bd.take()
            t, _ = timed(fns[name])
            if rep < 0:
                continue
            times[name].append(t)
            if name == "iamu":
                parts.append({"total": t, **bd.take()})
            if name == "floor":
                floor_split.append(split_now)
    # the overhead pieces on their own: record one more step's calls, replay them many times
    bd.recording = True
    iamu()
    bd.recording = False
    bd.take()
    pieces = replay(bd, ("new_buffer", "pack", "project", "orthogonalize", "unpack"), n_piece_calls)
    bd.calls.clear()
    med = {k: median(v) for k, v in times.items()}
    paired = [a / b for a, b in zip(times["iamu"], times["floor"])]
    sig = median([p["signals"] for p in parts])
    pack = median([p["pack"] for p in parts])
    in_step = {
        "forward + losses (rest)": median(
            [p["total"] - p["signals"] - p["project"] - p["orthogonalize"] - p["unpack"] for p in parts]
        ),
        "autograd.grad x K (signals - new_buffer - pack)": sig - pack - median([p["new_buffer"] for p in parts]),
        "new_buffer": median([p["new_buffer"] for p in parts]),
        "pack": pack,
        "project": median([p["project"] for p in parts]),
        "orthogonalize": median([p["orthogonalize"] for p in parts]),
        "unpack": median([p["unpack"] for p in parts]),
    }
    overhead = med["iamu"] / med["floor"] - 1
    pieces_sum = sum(pieces.values())
    out = {
        "forget_batch": spec.forget_batch,
        "retain_batch": spec.retain_batch,
        "K": STEP_K,
        "engine": "sequential",
        "reduction": "replicated",
        "world": 1,
        "iamu_s": stats(times["iamu"]),
        "floor_s": stats(times["floor"]),
        "neggrad_plus_s": stats(times["neggrad_plus"]),
        "floor_split_s": {k: median([s[k] for s in floor_split]) for k in ("forward_losses", "grads")},
        "iamu_breakdown_s": in_step,
        "overhead_pieces_s": pieces,
        "overhead_pieces_calls": n_piece_calls,
        "overhead_measured": overhead,
        "overhead_paired_median": median(paired) - 1,
        "overhead_from_pieces": pieces_sum / med["floor"],
        "overhead_goal": OVERHEAD_GOAL,
        "iamu_over_neggrad_plus": med["iamu"] / med["neggrad_plus"],
        "floor_over_neggrad_plus": med["floor"] / med["neggrad_plus"],
        "expected_iamu_over_neggrad_plus": [STEP_K / 2, STEP_K],
    }
    out["overhead_goal_met"] = overhead <= OVERHEAD_GOAL
    out["overhead_goal_met_pieces"] = out["overhead_from_pieces"] <= OVERHEAD_GOAL
    if want_profile or not (out["overhead_goal_met"] and out["overhead_goal_met_pieces"]):
        out["profile"] = profile_step(iamu)
    return out


def ready_iamu(spec: Spec) -> tuple[Iamu, torch.nn.Module]:
    """An iamu set up as in iamu_setup_vs_epoch.py (same model, same retain batches), untimed."""
    model = make_model(spec)
    method = Iamu({})
    method.setup(make_ctx(model), itertools.cycle(iamu_setup_vs_epoch.retain_batches(spec)), None)
    clear_grads(method.params)
    return method, model


def measure(
    spec: Spec | None = None,
    *,
    repeats: int = 7,
    setup_repeats: int = 0,
    piece_calls: int = 20,
    threads: int = 1,
    profile: bool = False,
    quick: bool = False,
) -> dict:
    """{"step": ...}, and {"setup": ...} when `setup_repeats` (the set-up measured, its iamu then
    stepped), with the environment; what main() writes."""
    spec = spec or Spec()

    def body(section):
        out = {}
        if setup_repeats:
            out["setup"], method, model = section(
                "setup",
                f"setup vs epoch, {setup_repeats} repeats",
                lambda: iamu_setup_vs_epoch.bench_setup(setup_repeats, spec),
            )
        else:
            method, model = ready_iamu(spec)
        out["step"] = section(
            "step",
            f"iamu step vs floor vs neggrad_plus, {repeats} repeats",
            lambda: bench_step(method, model, repeats, spec, piece_calls, profile),
        )
        return out

    return measure_with(
        "iamu_step_overhead",
        spec,
        body,
        threads=threads,
        quick=quick,
        config={"repeats": repeats, "setup_repeats": setup_repeats},
    )


def tables(res: dict) -> str:
    s = res["step"]
    L = [
        f"### iamu step vs its floor (forget {s['forget_batch']} + retain {s['retain_batch']}, K = {s['K']}, "
        "sequential engine, world 1)",
        "",
        "| Measurement | ms (median) | min - max |",
        "|---|---:|---:|",
    ]
    for key, label in (
        ("iamu_s", "iamu step"),
        ("floor_s", "floor: forward + K autograd.grad"),
        ("neggrad_plus_s", "neggrad_plus step"),
    ):
        L.append(f"| {label} | {ms(s[key]['median'])} | {rng(s[key])} |")
    L += ["", "| Part of the iamu step | ms (median) |", "|---|---:|"]
    for k, v in s["iamu_breakdown_s"].items():
        L.append(f"| in step: {k} | {ms(v)} |")
    L.append(f"| floor: forward + losses | {ms(s['floor_split_s']['forward_losses'])} |")
    L.append(f"| floor: autograd.grad x K | {ms(s['floor_split_s']['grads'])} |")
    for k, v in s["overhead_pieces_s"].items():
        L.append(f"| isolated ({s['overhead_pieces_calls']} calls): {k} | {ms(v)} |")
    L += [
        "",
        "| Ratio | value | goal |",
        "|---|---:|---|",
        f"| iamu / floor - 1 (medians) | {100 * s['overhead_measured']:+.1f}% | <= {100 * OVERHEAD_GOAL:.0f}% |",
        f"| iamu / floor - 1 (paired per repeat) | {100 * s['overhead_paired_median']:+.1f}% | |",
        f"| overhead from isolated pieces / floor | {100 * s['overhead_from_pieces']:.1f}% | "
        f"<= {100 * OVERHEAD_GOAL:.0f}% |",
        f"| iamu / neggrad_plus | {s['iamu_over_neggrad_plus']:.2f}x | about {STEP_K // 2}..{STEP_K}x |",
        f"| floor / neggrad_plus | {s['floor_over_neggrad_plus']:.2f}x | |",
        f"| overhead goal met (measured medians / isolated pieces) | "
        f"{'yes' if s['overhead_goal_met'] else 'no'} / {'yes' if s['overhead_goal_met_pieces'] else 'no'} | |",
    ]
    if "profile" in s:
        L += [
            "",
            "cProfile of one iamu step (top by own time):",
            "",
            "| where | function | calls | own s | cum s |",
            "|---|---|---:|---:|---:|",
        ]
        for row in s["profile"]["top_tottime"][:12]:
            L.append(
                f"| {row['where']} | {row['function']} | {row['calls']} | {row['tottime_s']:.3f} "
                f"| {row['cumtime_s']:.3f} |"
            )
    return "\n".join(L)


def main(argv=None) -> int:
    p = parser(__doc__, "iamu_step_overhead")
    p.add_argument("--repeats", type=int, help="repeats of the step measurements (default 7; quick 3)")
    p.add_argument(
        "--setup-repeats",
        type=int,
        default=0,
        help="also measure the set-up vs one epoch, this many repeats (default 0: set up once, untimed)",
    )
    p.add_argument("--profile", action="store_true", help="profile one iamu step even when the goal is met")
    a = p.parse_args(argv)
    repeats = a.repeats or (3 if a.quick else 7)
    if repeats < 1 or a.setup_repeats < 0:
        p.error("repeats must be >= 1")
    res = measure(
        quick_spec(a.quick),
        repeats=repeats,
        setup_repeats=a.setup_repeats,
        piece_calls=5 if a.quick else 20,
        threads=a.threads,
        profile=a.profile,
        quick=a.quick,
    )
    atomic_write_json(a.out, res)
    print(threads_line(res) + "\n\n" + tables(res))
    if "setup" in res:
        print("\n" + iamu_setup_vs_epoch.tables(res))
    print(footer(res, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""iamu's set-up cost: `Iamu.setup` (the task subspaces; default subspace_batches = 8, retain batch 16)
vs one epoch of training over the retain data (384 samples / batch 16 = 24 forward + backward + AdamW
steps), on synthetic batches (synthetic.py). Set up twice: with the sequential signal engine, and with
the config default `auto`, which first times both engines. Set-up, epoch and auto set-up interleaved.

    .venv/bin/python bench/iamu_setup_vs_epoch.py            # full run
    .venv/bin/python bench/iamu_setup_vs_epoch.py --quick    # 24x32 images, 3 repeats
"""

from __future__ import annotations

import copy
import itertools
import sys

import torch
from synthetic import (
    TASK_NAMES,
    Breakdown,
    Spec,
    clear_grads,
    footer,
    make_batch,
    make_ctx,
    make_model,
    measure_with,
    parser,
    quick_spec,
    stats,
    threads_line,
    timed,
)
from timing import median, ordered

from mtu_dist.methods.iamu import Iamu
from mtu_dist.runner.objective import global_counts, normalised_losses
from mtu_dist.utils.fileio import atomic_write_json

RETAIN_SAMPLES = 384  # one epoch = RETAIN_SAMPLES / retain batch training steps


def retain_batches(spec: Spec) -> list[dict]:
    """One epoch of retain batches (the set-up cycles through them)."""
    return [make_batch(spec.retain_batch, 300 + i, spec) for i in range(RETAIN_SAMPLES // spec.retain_batch)]


def bench_setup(repeats: int, spec: Spec) -> tuple[dict, Iamu, torch.nn.Module]:
    model = make_model(spec)
    ctx = make_ctx(model)
    retain = retain_batches(spec)
    subspace_batches = Iamu({}).opts.subspace_batches
    train_model = copy.deepcopy(model)
    opt = torch.optim.AdamW(train_model.parameters(), lr=3e-3, weight_decay=1e-4)

    def epoch():
        for b in retain:
            losses = normalised_losses(train_model(b["image"]), b, TASK_NAMES, global_counts(b, 1))
            sum(losses.values()).backward()
            torch.nn.utils.clip_grad_norm_(train_model.parameters(), 5.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    ctx_auto = make_ctx(model, engine="auto")  # the config default: measures both engines on first use
    method, picks = None, []
    times = {"setup": [], "setup_auto": [], "epoch": []}
    parts = []
    for rep in range(repeats):
        for name in ordered(("setup", "epoch", "setup_auto"), rep):
            if name == "setup":
                method = Iamu({})
                bd = Breakdown()
                bd.wrap(method, "_pass", "gradient passes (signals + covariance / sketch sums)")
                bd.wrap(method, "_gradient_bases", "task bases (the passes + eigh / Nystrom)")
                bd.wrap(method, "_bases", "mode bases (orth)")
                t, logs = timed(method.setup, ctx, itertools.cycle(retain), None)
                parts.append(bd.take())
                clear_grads(method.params)
            elif name == "setup_auto":
                m_auto = Iamu({})
                t, _ = timed(m_auto.setup, ctx_auto, itertools.cycle(retain), None)
                picks.append(m_auto.engine)
                clear_grads(m_auto.params)
                del m_auto
            else:
                t, _ = timed(epoch)
            times[name].append(t)
    for attr in ("_pass", "_gradient_bases", "_bases"):  # unwrap for later use
        method.__dict__.pop(attr, None)
    s, e, sa = median(times["setup"]), median(times["epoch"]), median(times["setup_auto"])
    out = {
        "subspace_batches": subspace_batches,
        "retain_batch": spec.retain_batch,
        "epoch_samples": RETAIN_SAMPLES,
        "epoch_steps": len(retain),
        "setup_s": stats(times["setup"]),
        "epoch_s": stats(times["epoch"]),
        "setup_auto_engine_s": stats(times["setup_auto"]),
        "auto_engine_picks": picks,
        "setup_breakdown_s": {k: median([p[k] for p in parts]) for k in parts[0]},
        "basis_dim_mean": logs.get("basis_dim_mean"),
        "setup_over_epoch": s / e,
        "paired_ratio_median": median([a / b for a, b in zip(times["setup"], times["epoch"])]),
        "setup_auto_over_epoch": sa / e,
        "setup_auto_over_setup": sa / s,
        "epoch_step_s": e / len(retain),
    }
    return out, method, model


def measure(spec: Spec | None = None, *, setup_repeats: int = 7, threads: int = 1, quick: bool = False) -> dict:
    """{"setup": ...} with the environment; what main() writes."""
    spec = spec or Spec()
    return measure_with(
        "iamu_setup_vs_epoch",
        spec,
        lambda section: {
            "setup": section(
                "setup", f"setup vs epoch, {setup_repeats} repeats", lambda: bench_setup(setup_repeats, spec)[0]
            )
        },
        threads=threads,
        quick=quick,
        config={"setup_repeats": setup_repeats},
    )


def tables(res: dict) -> str:
    u = res["setup"]
    sa = u["setup_auto_engine_s"]
    L = [
        f"### Subspace computation vs one training epoch ({u['epoch_samples']} samples, "
        f"{u['epoch_steps']} steps of batch {u['retain_batch']})",
        "",
        "| Measurement | s (median) | min - max |",
        "|---|---:|---:|",
        f"| Iamu.setup ({u['subspace_batches']} batches of {u['retain_batch']}) | {u['setup_s']['median']:.2f} | "
        f"{u['setup_s']['min']:.2f} - {u['setup_s']['max']:.2f} |",
    ]
    for k, v in u["setup_breakdown_s"].items():
        L.append(f"| setup: {k} | {v:.2f} | |")
    L += [
        f"| one epoch (forward + backward + AdamW) | {u['epoch_s']['median']:.2f} | "
        f"{u['epoch_s']['min']:.2f} - {u['epoch_s']['max']:.2f} |",
        f"| Iamu.setup with signal_engine auto (config default; picked "
        f"{', '.join(sorted(set(u['auto_engine_picks'])))}) | {sa['median']:.2f} | "
        f"{sa['min']:.2f} - {sa['max']:.2f} |",
        f"| setup / epoch | {u['setup_over_epoch']:.2f}x (paired {u['paired_ratio_median']:.2f}x) | |",
        f"| setup (auto engine) / epoch | {u['setup_auto_over_epoch']:.2f}x | |",
        f"| setup auto / setup sequential | {u['setup_auto_over_setup']:.2f}x | |",
    ]
    return "\n".join(L)


def main(argv=None) -> int:
    p = parser(__doc__, "iamu_setup_vs_epoch")
    p.add_argument("--setup-repeats", type=int, help="repeats of setup vs epoch (default 7; quick 3)")
    a = p.parse_args(argv)
    setup_repeats = a.setup_repeats or (3 if a.quick else 7)
    if setup_repeats < 1:
        p.error("repeats must be >= 1")
    res = measure(quick_spec(a.quick), setup_repeats=setup_repeats, threads=a.threads, quick=a.quick)
    atomic_write_json(a.out, res)
    print(threads_line(res) + "\n\n" + tables(res))
    print(footer(res, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

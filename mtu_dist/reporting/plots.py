"""Plots of a sweep's cells, of the paper table and of the demo (matplotlib, Agg: no display needed),
returned as PNG bytes. Each figure states what it draws and nothing it does not.

* `scaling.png`: training throughput vs world size, with the linear-scaling line from the smallest world
  size (dotted, only where there are two world sizes or more to scale between), and step time vs world
  size for training and for each unlearning method, one curve per forget fraction;
* `cost_vs_forget.png`: unlearning wall time (setup included) vs forget fraction, the retrain's training
  time beside it when the sweep has retrain cells;
* `uis_vs_forget.png`: UIS vs forget fraction — only when the runs recorded `uis`.
One line per method and world size (and data size, when the sweep has several).
For `mtu report` (the paper table): `uis_bars` (UIS per method, 95% intervals over seeds) and
`tradeoff` (forget progress vs task-level and instance-level interference, one curve per method and
seed), one panel (row) per benchmark x setting.
For `mtu demo`: `demo_uis` (UIS per method, one bar per setting) and `demo_interference` (the relative
drop of each task's primary metric on retain and val against the original, per method and setting).
"""

from __future__ import annotations

import io
from collections import defaultdict
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _series(rows, key, x, y) -> dict[str, list[tuple[float, float]]]:
    """Points (x, y) grouped by a label; the labels carry every axis of the rows (one row per label and x),
    so the mean only merges a cell run twice."""
    acc = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if y(r) is not None:
            acc[key(r)][x(r)].append(y(r))
    return {k: sorted((xv, mean(ys)) for xv, ys in pts.items()) for k, pts in sorted(acc.items())}


def _lines(ax, series, style="-o") -> None:
    for label, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    if series:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def scaling(rows) -> bytes:
    many_n = len({r.train_size for r in rows}) > 1
    n_label = (lambda r: f", n={r.train_size}") if many_n else (lambda r: "")
    train = [r for r in rows if r.kind == "train"]
    unl = [r for r in rows if r.kind == "unlearn"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    thr = _series(train, lambda r: f"train{n_label(r)}", lambda r: r.world_size, lambda r: r.samples_per_s)
    linear = {label: pts for label, pts in thr.items() if len(pts) > 1}  # one world size: nothing to scale
    for label, pts in linear.items():  # ideal: throughput proportional to world size
        (w0, s0) = pts[0]
        left.plot(
            [p[0] for p in pts], [s0 * p[0] / w0 for p in pts], ":", color="gray", label=f"linear scaling{label[5:]}"
        )
    _lines(left, thr)
    left.set(
        xlabel="world size (ranks)",
        ylabel="samples / s",
        title="training throughput" + ("" if linear else " (one world size: no scaling line)"),
    )
    _lines(right, _series(train, lambda r: f"train{n_label(r)}", lambda r: r.world_size, lambda r: r.step_s))
    _lines(
        right,
        _series(
            unl,
            lambda r: f"unlearn {r.method}, f={r.forget_fraction:g}{n_label(r)}",
            lambda r: r.world_size,
            lambda r: r.step_s,
        ),
        "--s",
    )
    right.set(
        xlabel="world size (ranks)", ylabel="seconds / step", title="step time (unlearning: per forget fraction f)"
    )
    for ax in (left, right):
        ax.set_xticks(sorted({r.world_size for r in rows}))
        ax.grid(alpha=0.3)
    return _png(fig)


def vs_forget(rows, y, ylabel: str, title: str) -> bytes:
    many_n = len({r.train_size for r in rows}) > 1
    key = lambda r: f"{r.method}, W={r.world_size}" + (f", n={r.train_size}" if many_n else "")  # noqa: E731
    fig, ax = plt.subplots(figsize=(6, 4))
    _lines(ax, _series(rows, key, lambda r: r.forget_fraction, y))
    ax.set(xlabel="forget fraction", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    return _png(fig)


def draw_all(rows) -> tuple[dict[str, bytes], list[str]]:
    """The figures that the rows support, and a note for each one that had to be left out."""
    unl = [r for r in rows if r.kind != "train"]  # with the retrain reference, when the sweep has one
    has_retrain = any(r.kind == "retrain" for r in unl)
    figures, notes = {"scaling.png": scaling(rows)}, []
    if unl:
        title = "unlearning cost" + (" (retrain: its training time)" if has_retrain else "")
        figures["cost_vs_forget.png"] = vs_forget(unl, lambda r: r.cost_s, "wall time (s)", title)
    else:
        notes.append("no unlearning cells: cost_vs_forget.png not drawn")
    if any("uis" in r.quality for r in unl):
        figures["uis_vs_forget.png"] = vs_forget(
            unl, lambda r: r.quality.get("uis"), "UIS (lower is better)", "unlearning impact score"
        )
    else:
        notes.append("no run recorded `uis` (`mtu unlearn --retrain RUN` records it): uis_vs_forget.png not drawn")
    return figures, notes


# --------------------------------------------------------------------------
# paper-table figures (`mtu report`): one panel per benchmark x setting
# --------------------------------------------------------------------------


def _panels(n: int, width: float, height: float):
    cols = min(n, 2) or 1
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def uis_bars(groups: dict[str, list[tuple[str, float, float, float]]], ours: str) -> bytes:
    """Horizontal bars of mean UIS per method (error bar: the 95% interval, below and above), `ours` highlighted."""
    fig, axes = _panels(len(groups), 5.5, 0.3 * max((len(v) for v in groups.values()), default=1) + 1.2)
    for ax, (label, items) in zip(axes, groups.items()):
        names = [m for m, *_ in items]
        colors = ["tab:red" if m == ours else "tab:gray" if m == "retrain" else "tab:blue" for m in names]
        ax.barh(
            range(len(items)),
            [v for _, v, _, _ in items],
            xerr=[[lo for *_, lo, _ in items], [hi for *_, hi in items]],
            color=colors,
            capsize=2,
        )
        ax.set_yticks(range(len(items)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel="UIS (lower is better; bars: 95% interval)", title=label)
        ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def tradeoff(groups: dict[str, dict[str, list[list[tuple]]]], ours: str) -> bytes:
    """Per benchmark x setting, two panels: forget progress toward the retrain's level (x; 1 = the
    retrain's forget level) against task-level and instance-level interference (y), one curve per run
    (colour per method), a dotted line at equal forgetting. Curves: [(step, progress, task, instance)]."""
    cmap = plt.get_cmap("tab20")
    methods = sorted({m for g in groups.values() for m in g})
    color = {m: ("tab:red" if m == ours else cmap(i % 20)) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(max(1, len(groups)), 2, figsize=(11, 3.8 * max(1, len(groups))), squeeze=False)
    for row, (label, by_method) in zip(axes, groups.items()):
        for col, (ax, what) in enumerate(zip(row, ("task-level", "instance-level"))):
            for m, curves in by_method.items():
                for i, c in enumerate(curves):
                    pts = [(p[1], p[2 + col]) for p in c if p[1] is not None and p[2 + col] is not None]
                    if pts:
                        ax.plot(
                            [x for x, _ in pts],
                            [y for _, y in pts],
                            "-",
                            lw=2 if m == ours else 1,
                            color=color[m],
                            alpha=0.8,
                            label=m if i == 0 else None,
                        )
            ax.axvline(1.0, color="black", ls=":", lw=1)
            ax.set(
                xlabel="forget progress (1 = the retrain's forget level)",
                ylabel=f"{what} interference",
                title=f"{label}: {what}",
            )
            ax.grid(alpha=0.3)
            if len(ax.get_lines()) > 1:
                ax.legend(fontsize=6, ncol=2)
            else:  # the full setting has no non-target task: task-level interference is undefined there
                ax.text(
                    0.5,
                    0.5,
                    "no trajectories"
                    if not by_method
                    else "undefined here (every task is a target)"
                    if col == 0
                    else "no points",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                )
    return _png(fig)


# --------------------------------------------------------------------------
# demo figures (`mtu demo`, `mtu report` of a demo): summary rows per setting (tables.summary)
# --------------------------------------------------------------------------


def _bar_style(method: str) -> dict:
    return {"hatch": "//", "alpha": 0.6} if method == "retrain" else {}


def _bar_legend(ax, labels: list[str], title: str | None = None) -> None:
    """One plain patch per colour (not the first bar drawn, which may be the hatched reference) and the hatch."""
    from matplotlib.patches import Patch

    handles = [Patch(color=f"C{k}", label=label) for k, label in enumerate(labels)]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="retrain (reference)"))
    ax.legend(handles=handles, fontsize=7, title=title, title_fontsize=7)


def demo_uis(by_setting: dict[str, dict[str, dict]]) -> bytes:
    """UIS per method (lower is better), one bar per setting; the retrain (hatched) is the reference."""
    methods = [
        m
        for m in dict.fromkeys(m for rows in by_setting.values() for m in rows)
        if any(rows.get(m, {}).get("uis") is not None for rows in by_setting.values())
    ]
    fig, ax = plt.subplots(figsize=(7, 0.35 * max(len(methods), 1) * len(by_setting) + 1.5))
    height = 0.8 / max(len(by_setting), 1)
    for k, rows in enumerate(by_setting.values()):
        for i, m in enumerate(methods):
            v = rows.get(m, {}).get("uis")
            if v is not None:
                ax.barh(i + k * height, v, height, color=f"C{k}", **_bar_style(m))
    ax.set_yticks(
        [i + height * (len(by_setting) - 1) / 2 for i in range(len(methods))],
        [f"{m} (reference)" if m == "retrain" else m for m in methods],
        fontsize=8,
    )
    ax.invert_yaxis()
    ax.set(xlabel="UIS (lower is better)", title="unlearning impact score per method")
    ax.grid(axis="x", alpha=0.3)
    if methods:
        _bar_legend(ax, [f"{setting}-task request" for setting in by_setting])
    return _png(fig)


def relative_drop(rows: dict[str, dict], split: str, task: str) -> dict[str, float]:
    """Per method: 100 x (original - method) / original of the task's primary metric on `split` (> 0: a drop)."""
    orig = rows.get("original", {}).get("splits", {}).get(split, {}).get(task)
    if not orig:
        return {}
    return {
        m: 100 * (orig - v) / orig
        for m, r in rows.items()
        if m != "original" and (v := r["splits"].get(split, {}).get(task)) is not None
    }


def demo_interference(by_setting: dict[str, dict[str, dict]]) -> bytes:
    """Interference: per setting (row) and split (retain, val; column), the relative drop of each task's
    primary metric against the original, one bar per task for every method; the retrain (hatched) is the
    reference: what removing the pairs by training without them costs."""
    from mtu_dist.tasks import TASKS

    splits = ("retain", "val")
    fig, axes = plt.subplots(max(len(by_setting), 1), 2, figsize=(12, 4 * max(len(by_setting), 1)), squeeze=False)
    for row, (setting, rows) in zip(axes, by_setting.items()):
        methods = [m for m in rows if m != "original"]
        tasks = [t for t in TASKS if any(relative_drop(rows, sp, t) for sp in splits)]
        width = 0.8 / max(len(tasks), 1)
        for ax, sp in zip(row, splits):
            for k, t in enumerate(tasks):
                drop = relative_drop(rows, sp, t)
                for i, m in enumerate(methods):
                    if m in drop:
                        ax.bar(i + k * width, drop[m], width, color=f"C{k}", **_bar_style(m))
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xticks(
                [i + width * (len(tasks) - 1) / 2 for i in range(len(methods))],
                [f"{m} (ref.)" if m == "retrain" else m for m in methods],
                rotation=45,
                ha="right",
                fontsize=7,
            )
            ax.set(ylabel="drop vs the original (%; lower is better)", title=f"{setting}-task request: {sp} split")
            ax.grid(axis="y", alpha=0.3)
            if tasks:
                _bar_legend(ax, tasks, "primary metric")
    return _png(fig)

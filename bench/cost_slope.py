"""Unlearning cost against the retrain as the data grows, from a finished (or partly finished) cost sweep.

    .venv/bin/mtu sweep configs/sweep_cost_cpu.yaml            # sweeps/cost_cpu
    .venv/bin/python bench/cost_slope.py sweeps/cost_cpu       # this table; --json for the numbers

Per method and train size: the unlearning cost (method setup + steps, the stop rule's checks included),
the steps it ran, the retrain's training time and their ratio; per method the least-squares slope of
log(ratio) against log(train size) and the train size at which the fitted line reaches 1/20 (measured
when a size already reaches it). The same per step of unlearning (`ratio / steps`), which takes the stop
rule's varying step counts out, and the ratio a run of the full step budget would have. Reads only the
run folders' final/metrics.json files.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

GOAL = 1 / 20
CELL = re.compile(r"^(?P<method>.+)-n(?P<n>\d+)-f(?P<f>[0-9.]+)-w(?P<w>\d+)$")


def load(sweep: Path) -> tuple[dict, dict]:
    """(retrain seconds per (n, f), unlearning rows) from the sweep's run folders."""
    retrain, rows = {}, []
    for metrics in sorted(sweep.glob("runs/*/*/final/metrics.json")):
        m = CELL.match(metrics.parent.parent.name)
        if not m:
            continue
        report = json.loads(metrics.read_text())
        n, f = int(m["n"]), float(m["f"])
        if m["method"] == "retrain":
            retrain[(n, f)] = report["time_s"]
            continue
        steps = _steps(report.get("stop_reason", ""))
        rows.append(
            {
                "method": m["method"],
                "n": n,
                "fraction": f,
                "cost_s": report["time_s"],
                "steps": steps,
                "uis": ((report.get("unlearning") or {}).get("uis") or {}).get("mean"),
                "stop_reason": report.get("stop_reason"),
            }
        )
    for r in rows:
        r["retrain_s"] = retrain.get((r["n"], r["fraction"]))
        r["ratio"] = r["cost_s"] / r["retrain_s"] if r["retrain_s"] else None
    return retrain, rows


def _steps(reason: str) -> int | None:
    m = re.search(r"at step (\d+)", reason)
    return int(m[1]) if m else None


def fit(points: list[tuple[float, float]]) -> dict:
    """log y = a + b log x by least squares; the x at which y reaches GOAL."""
    if len(points) < 2:
        return {"slope": None, "n_at_goal": None}
    xs, ys = [math.log(x) for x, _ in points], [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    reached = [x for x, y in points if y <= GOAL]
    at = min(reached) if reached else (math.exp((math.log(GOAL) - a) / b) if b < 0 else None)
    return {"slope": b, "n_at_goal": at, "measured": bool(reached)}


def summarize(rows: list[dict], budget: int) -> dict:
    out = {}
    for r in rows:  # a run that used its whole budget says so instead of naming a step
        r["steps"] = r["steps"] or (budget if r["stop_reason"] == "budget" else None)
    for method in sorted({r["method"] for r in rows}):
        mine = sorted((r for r in rows if r["method"] == method and r["ratio"]), key=lambda r: r["n"])
        ratio = fit([(r["n"], r["ratio"]) for r in mine])
        full = [(r["n"], r["ratio"] / r["steps"] * budget) for r in mine if r["steps"]]
        out[method] = {"rows": mine, "ratio_fit": ratio, "budget_ratio_fit": fit(full)}
    return out


def table(summary: dict, budget: int) -> str:
    lines = [
        "| method | train size | steps | cost s | retrain s | ratio | ratio at the full budget | UIS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, s in summary.items():
        for r in s["rows"]:
            full = f"{r['ratio'] / r['steps'] * budget:.4f}" if r["steps"] else "-"
            uis = f"{r['uis']:.3f}" if r["uis"] is not None else "-"
            lines.append(
                f"| {method} | {r['n']} | {r['steps'] or '-'} | {r['cost_s']:.1f} | {r['retrain_s']:.1f} "
                f"| {r['ratio']:.4f} | {full} | {uis} |"
            )
    lines += [
        "",
        "| method | slope of log ratio vs log size | size at 1/20 | same at the full budget: slope | size at 1/20 |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, s in summary.items():
        a, b = s["ratio_fit"], s["budget_ratio_fit"]
        lines.append(f"| {method} | {_f(a['slope'])} | {_n(a)} | {_f(b['slope'])} | {_n(b)} |")
    return "\n".join(lines)


def _f(v):
    return "-" if v is None else f"{v:.3f}"


def _n(fit_: dict) -> str:
    if fit_["n_at_goal"] is None:
        return "not reached (slope >= 0 or one size)"
    if fit_["n_at_goal"] > 1e9:  # a slope near 0: the line hardly falls
        return "> 1e9 (extrapolated; slope near 0)"
    return f"{fit_['n_at_goal']:.0f}" + (" (measured)" if fit_.get("measured") else " (extrapolated)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path, help="the sweep folder (sweeps/cost_cpu)")
    p.add_argument("--budget", type=int, default=200, help="the grid's unlearn.steps (default: 200)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    _, rows = load(a.sweep)
    summary = summarize(rows, a.budget)
    print(json.dumps(summary, indent=1) if a.json else table(summary, a.budget))


if __name__ == "__main__":
    main()

"""bench/cost_slope.py: ratios, the fitted slope and the size at 1/20 from a sweep's run folders."""

from __future__ import annotations

import json
import math
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import cost_slope  # noqa: E402


def _run(folder, name, time_s, reason=None):
    final = folder / "runs" / "synth-indoor" / name / "final"
    final.mkdir(parents=True)
    report = {"time_s": time_s, **({"stop_reason": reason} if reason else {})}
    (final / "metrics.json").write_text(json.dumps(report))


def test_slope_and_size_at_one_twentieth(tmp_path):
    for n in (100, 400, 1600):
        _run(tmp_path, f"retrain-n{n}-f0.02-w1", time_s=n / 10)  # the retrain grows with n
        _run(tmp_path, f"iamu-n{n}-f0.02-w1", time_s=5.0, reason="budget")  # a fixed budget does not
        _run(
            tmp_path,
            f"pcgrad-n{n}-f0.02-w1",
            time_s=n / 100,  # stops at a step growing with n
            reason=f"stop rule at step {n // 10}: every target task's forget-pair metric reached its threshold",
        )
    _, rows = cost_slope.load(tmp_path)
    s = cost_slope.summarize(rows, budget=200)
    iamu = s["iamu"]["ratio_fit"]
    assert [r["ratio"] for r in s["iamu"]["rows"]] == pytest.approx([0.5, 0.125, 0.03125])
    assert iamu["slope"] == pytest.approx(-1.0) and iamu["n_at_goal"] == 1600 and iamu["measured"]
    assert s["iamu"]["budget_ratio_fit"]["slope"] == pytest.approx(-1.0)
    pcgrad = s["pcgrad"]
    assert pcgrad["ratio_fit"]["slope"] == pytest.approx(0.0, abs=1e-12) and pcgrad["ratio_fit"]["n_at_goal"] is None
    # per step: 0.1 / (n / 10) * 200 = 200 / n -> 1/20 at n = 4000, extrapolated
    assert pcgrad["budget_ratio_fit"]["slope"] == pytest.approx(-1.0)
    assert math.isclose(pcgrad["budget_ratio_fit"]["n_at_goal"], 4000, rel_tol=1e-9)
    assert "| iamu | 1600 | 200 |" in cost_slope.table(s, 200)

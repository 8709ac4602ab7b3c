"""The benchmark's statistics (pure, fast): intervals with a known answer, paired differences, the
equal-forgetting interpolation on a hand-made trajectory, the UIS floor, per-task feasibility,
the memorisation figures, and tuned.yaml merged under a lock by concurrent writers."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import yaml

from mtu_dist.evaluation.scoring import Results, unlearning_block
from mtu_dist.evaluation.statistics import at_level, interval, paired, progress
from mtu_dist.evaluation.trajectory import curve, interference
from mtu_dist.reporting.report import Row, below_floor, memorisation, memorisation_lines, table, uis_line
from mtu_dist.studies.tune import _merge_tuned, criterion


def test_interval_known_answers():
    assert interval([0.3, 0.3, 0.3]) == pytest.approx(interval([0.3, 0.3, 0.3]))
    c = interval([0.3] * 5)
    assert (c.mean, c.lo, c.hi, c.n) == pytest.approx((0.3, 0.3, 0.3, 5))  # no spread, no width
    one = interval([0.7, None, float("nan")])
    assert one.n == 1 and one.lo == one.hi == 0.7 and not one.excludes(0)
    assert interval([]) is None
    # 5 draws of N(mu, 1): the 95% interval must cover mu about 95% of the time (binomial sd over
    # 300 replications ~1.3%; a plain percentile bootstrap covers ~85% at n = 5 and fails this)
    rng = np.random.default_rng(1)
    mu, covered = 2.0, 0
    for i in range(300):
        iv = interval(rng.normal(mu, 1.0, 5), n_boot=1000, seed=i)
        covered += iv.lo <= mu <= iv.hi
    assert 0.90 <= covered / 300 <= 0.99, covered / 300
    # and its width is Student-t's to within 20% (t interval: mean +- 2.776 sd / sqrt(5))
    x = rng.normal(0, 1, 5)
    iv, half_t = interval(x, n_boot=20000), 2.776 * x.std(ddof=1) / np.sqrt(5)
    assert (iv.hi - iv.lo) / 2 == pytest.approx(half_t, rel=0.2)


def test_paired_difference_uses_the_same_seeds():
    a = {0: 0.10, 1: 0.20, 2: 0.15, 3: 0.30}
    b = {0: 0.12, 1: 0.23, 2: 0.17, 3: 0.33, 9: 5.0}  # seed 9 has no partner: left out
    d = paired(a, b)
    assert d.n == 4 and d.mean == pytest.approx(-0.025)
    assert d.hi < 0 and d.excludes(0)  # every seed lower: the spread between seeds cancels in the pairs
    unpaired = interval(list(a.values())).mean - interval(list(b.values())[:4]).mean
    assert unpaired == pytest.approx(d.mean)
    assert not paired({0: 0.1, 1: 0.3}, {0: 0.2, 1: 0.2}).excludes(0)


def test_equal_forgetting_interpolation_on_a_hand_made_trajectory():
    points = [
        {"step": 0, "progress": 0.0, "task_interference": 0.0, "instance_interference": 0.00},
        {"step": 10, "progress": 0.5, "task_interference": 0.1, "instance_interference": 0.02},
        {"step": 20, "progress": 1.5, "task_interference": 0.3, "instance_interference": 0.06},
        {"step": 30, "progress": 0.8, "task_interference": 0.9, "instance_interference": 0.09},
    ]
    at = at_level(points, 1.0)  # halfway between steps 10 and 20: the FIRST crossing, not the last point
    assert at["step"] == pytest.approx(15) and at["progress"] == 1.0
    assert at["task_interference"] == pytest.approx(0.2) and at["instance_interference"] == pytest.approx(0.04)
    assert at_level(points, 2.0) is None  # never reached
    assert at_level(points, 0.0)["step"] == 0  # reached at the first point
    # progress: per task from the original's level (1 = the retrain's), the least of the targets
    assert progress(
        {"seg": 0.4, "depth": 0.9}, {"seg": 0.6, "depth": 1.0}, {"seg": 0.4, "depth": 0.5}
    ) == pytest.approx(0.2)
    # a task already at the retrain's level has nothing to forget: it is left out, not a None for all
    assert progress(
        {"seg": 0.5, "depth": 0.0}, {"seg": 0.6, "depth": 0.0}, {"seg": 0.4, "depth": 0.0}
    ) == pytest.approx(0.5)
    assert progress({"seg": 0.5}, {"seg": 0.6}, {}) is None


def test_trajectory_interference_and_curve():
    p0 = {
        "step": 0,
        "forget": {"seg": 0.8},
        "forget_kept": {"depth": 0.9, "normal": 60.0},
        "retain": {"seg": 0.8, "depth": 0.9, "normal": 60.0},
        "val": {"seg": 0.4, "depth": 0.6, "normal": 50.0},
    }
    p = {
        "step": 5,
        "forget": {"seg": 0.5},
        "forget_kept": {"depth": 0.81, "normal": 60.0},
        "retain": {"seg": 0.72, "depth": 0.9, "normal": 60.0},
        "val": {"seg": 0.4, "depth": 0.6, "normal": 45.0},
    }
    got = interference(p0, p, ["seg"])
    # task-level: depth/normal on forget_kept (0.1, 0), retain (0, 0), val (0, 0.1); instance: seg retain 0.1, val 0
    assert got["task_interference"] == pytest.approx(0.2 / 6)
    assert got["instance_interference"] == pytest.approx(0.05)
    c = curve({"targets": ["seg"], "points": [p0, p]}, {"seg": 0.5})
    assert [x["progress"] for x in c] == pytest.approx([0.0, 1.0])
    full = interference(p0, p, ["seg", "depth", "normal"])
    assert full["task_interference"] is None  # every task a target: no task-level interference


def _splits(forget, val, retain=0.8):
    return {"forget": {"seg": {"miou": forget}}, "val": {"seg": {"miou": val}}, "retain": {"seg": {"miou": retain}}}


def _losses():
    return {sp: [(f"{sp}{i}", "seg", 0.1 * i) for i in range(8)] for sp in ("forget", "retain", "val")}


def test_uis_floor_flag():
    run = lambda s: {"run": {"tasks": ["seg"]}, "splits": s, "time_s": 1.0}  # noqa: E731
    original = Results(run(_splits(0.8, 0.4)), _losses(), "o")
    retrain = Results(run(_splits(0.36, 0.36)), _losses(), "r")
    # retrain's UIS: (0.04/0.4 + 0.04/0.4) / 2 = 0.1
    good = unlearning_block(run(_splits(0.4, 0.4)), _losses(), original=original, retrain=retrain)
    assert good["uis_retrain"] == pytest.approx(0.1) and good["uis"]["mean"] == pytest.approx(0.0)
    assert good["uis_excess"] == pytest.approx(-0.1) and good["below_floor"] is True
    worse = unlearning_block(run(_splits(0.6, 0.3)), _losses(), original=original, retrain=retrain)
    assert worse["uis_excess"] == pytest.approx(0.375 - 0.1) and worse["below_floor"] is False
    # the report: the row below the floor is flagged and not ranked as the strongest baseline
    rows = {
        "retrain": [Row("b", "full", s, "retrain", {"uis": 0.1, "uis_excess": 0.0}) for s in (0, 1)],
        "finetune": [Row("b", "full", s, "finetune", {"uis": 0.05, "uis_excess": -0.05}) for s in (0, 1)],
        "scrub": [Row("b", "full", s, "scrub", {"uis": 0.2 + s / 100, "uis_excess": 0.1}) for s in (0, 1)],
        "iamu": [Row("b", "full", s, "iamu", {"uis": 0.12 + s / 50, "uis_excess": 0.02}) for s in (0, 1)],
    }
    assert below_floor(rows) == {"finetune"}
    assert "| finetune (below floor) |" in table(rows) and "| scrub |" in table(rows)
    line = uis_line(
        "full, b",
        {m: np.mean([r.metrics["uis"] for r in rs]) for m, rs in rows.items()},
        "full",
        below_floor(rows),
        {
            m: ({r.seed: r.metrics["uis"] for r in rows["iamu"]}, {r.seed: r.metrics["uis"] for r in rows[m]})
            for m in ("finetune", "scrub")
        },
    )
    assert "strongest baseline scrub" in line and "not ranked: finetune" in line
    assert "paired difference iamu - scrub -0.0750 [" in line and "excludes 0" in line


def test_feasibility_holds_per_task():
    """An untouched task is not hidden by a forgotten one: seg at its val level, depth 19% above."""
    original = {"val": {"seg": {"miou": 0.4}, "depth": {"delta1": 0.6}}, "retain": {"seg": {"miou": 0.8}}}
    trial = {
        "forget": {"seg": {"miou": 0.4}, "depth": {"delta1": 0.714}},
        "val": {"seg": {"miou": 0.4}},
        "retain": {"seg": {"miou": 0.8}},
    }
    c = criterion(original, trial, 0.1)
    assert c["forget_gap"] == pytest.approx(0.19) and not c["feasible"]  # the mean (0.095) would pass
    trial["forget"]["depth"]["delta1"] = 0.63
    assert criterion(original, trial, 0.1)["feasible"]


def test_memorisation_figures_from_the_rows():
    orig = [
        Row(
            "b",
            "partial",
            s,
            "original",
            {
                "eval/forget/seg/miou": 0.6 + s / 10,
                "eval/val/seg/miou": 0.4,
                "eval/forget_kept/depth/delta1": 0.9,
                "eval/val/depth/delta1": 0.6,
                "mia_auc": 0.95,
            },
        )
        for s in (0, 1)
    ]
    # partial: the retrain still saw the kept tasks of the forget instances, so the goal reads the attack on
    # the target tasks (mia_auc_target); a row without it (full setting) is read by mia_auc
    ret = [Row("b", "partial", s, "retrain", {"mia_auc": 0.93, "mia_auc_target": 0.55}) for s in (0, 1)]
    memo = memorisation({"original": orig, "retrain": ret})
    assert memo["tasks"]["seg"]["excess"].mean == pytest.approx((0.6 / 0.4 + 0.7 / 0.4) / 2 - 1)
    assert memo["tasks"]["depth"]["excess"].mean == pytest.approx(0.5)  # kept pairs count for a kept task
    assert memo["mia_original"].mean == pytest.approx(0.95) and memo["mia_retrain"].mean == pytest.approx(0.55)
    assert "| MIA AUC (target tasks), retrain | 0.550" in "\n".join(memorisation_lines(memo))


def _writer(path, method, n):
    from pathlib import Path

    for i in range(n):
        _merge_tuned(Path(path), "req", "orig", f"{method}{i}", {"set": [f"unlearn.lr={i}"]})


def test_tuned_yaml_merges_concurrent_writers(tmp_path):
    path = tmp_path / "tuned.yaml"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), m, 15)) for m in ("a", "b", "c")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    methods = yaml.safe_load(path.read_text())["methods"]
    assert set(methods) == {f"{m}{i}" for m in "abc" for i in range(15)}  # nobody lost another's entry


def test_kept_task_goal_line_pairs_the_retrains_move():
    from mtu_dist.reporting.report import goal_lines

    def row(m, s, depth_kept, depth_val):
        return Row(
            "b",
            "partial",
            s,
            m,
            {
                "eval/forget_kept/depth/delta1": depth_kept,
                "eval/val/depth/delta1": depth_val,
                "eval/forget/seg/miou": 0.3,
                "uis": 0.1,
            },
        )

    g = {
        "original": [row("original", s, 0.9, 0.6) for s in (0, 1)],
        "retrain": [row("retrain", 0, 0.72, 0.6), row("retrain", 1, 0.81, 0.6)],  # moves 20%, 10%
        "iamu": [row("iamu", 0, 0.9, 0.57), row("iamu", 1, 0.9, 0.54)],
    }  # moves 5%, 10%
    text = goal_lines({("b", "partial"): g})
    assert "move at most 7.50%" in text  # the mean over seeds of the val move, the larger one
    assert "iamu - retrain -7.50% [" in text  # per seed: 5 - 20, 10 - 10


def test_partial_mia_goal_reads_the_attack_on_the_target_tasks():
    """In the partial setting the retrain still trains on the kept tasks of the forget instances, so the MIA
    goal compares the attack on the target tasks (mia_auc_target); the full setting keeps mia_auc."""
    from mtu_dist.reporting.report import goal_lines

    def rows(setting, method, mia, target):
        return [
            Row("b", setting, s, method, {"uis": 0.1, "mia_auc": mia, "mia_auc_target": target, "uis/seg": 0.1})
            for s in (0, 1)
        ]

    groups = {
        ("b", setting): {
            m: rows(setting, m, mia, target) for m, mia, target in (("iamu", 0.60, 0.52), ("retrain", 0.93, 0.50))
        }
        for setting in ("full", "partial")
    }
    text = goal_lines(groups)
    assert "partial, b: iamu MIA AUC (target tasks) 0.520 vs retrain 0.500: gap 0.020" in text
    assert "full, b: iamu MIA AUC 0.600 vs retrain 0.930: gap 0.330" in text


def test_a_baseline_missing_a_seed_is_not_the_strongest():
    """A stopped run leaves baselines with one seed; their mean is over other requests, so the goal line
    ranks only the baselines that have every seed iamu has (and says which it left out)."""
    from mtu_dist.reporting.report import goal_lines, incomplete

    def rows(m, uis, seeds=(0, 1, 2)):
        return [Row("b", "full", s, m, {"uis": u, "uis_excess": 0.1}) for s, u in zip(seeds, uis)]

    g = {
        "retrain": rows("retrain", [0.01, 0.01, 0.01]),
        "iamu": rows("iamu", [0.10, 0.12, 0.14]),
        "pcgrad": rows("pcgrad", [0.05], seeds=(0,)),  # lucky single seed: lowest mean, but incomplete
        "salun": rows("salun", [0.20, 0.22, 0.24]),
    }
    assert incomplete(g) == {"pcgrad": "1 of 3 seeds"}
    text = goal_lines({("b", "full"): g})
    assert "strongest baseline salun 0.2200" in text and "45% below" in text  # (0.22 - 0.12) / 0.22
    assert "incomplete, not ranked: pcgrad (1 of 3 seeds)" in text
    assert "paired difference iamu - salun -0.1000 [" in text


def test_the_uis_goal_needs_the_interval_below_zero_not_only_the_margin():
    """32% below on the means, but the paired interval includes 0 (one seed goes the other way): NOT met."""
    from mtu_dist.reporting.report import goal_lines

    def rows(m, uis):
        return [Row("b", "full", s, m, {"uis": u, "uis_excess": 0.1}) for s, u in enumerate(uis)]

    g = {"retrain": rows("retrain", [0.01] * 4), "salun": rows("salun", [0.20, 0.20, 0.20, 0.20])}
    g["iamu"] = rows("iamu", [0.05, 0.05, 0.05, 0.39])  # mean 0.135: 32.5% below 0.2
    text = goal_lines({("b", "full"): g})
    assert "32% below" in text and "includes 0" in text and text.rstrip().endswith("NOT met")
    g["iamu"] = rows("iamu", [0.13, 0.14, 0.13, 0.14])  # the same margin, every request below
    text = goal_lines({("b", "full"): g})
    assert "32% below" in text and "excludes 0" in text and text.rstrip().endswith(": met")


def test_the_paired_table_lists_iamu_minus_each_row_ablations_first():
    from mtu_dist.reporting.report import paired_table

    def rows(m, uis, mia):
        return [Row("b", "full", s, m, {"uis": u, "mia_auc": a}) for s, (u, a) in enumerate(zip(uis, mia))]

    g = {
        "original": rows("original", [0.3, 0.3], [0.99, 0.99]),
        "salun": rows("salun", [0.20, 0.30], [0.70, 0.80]),
        "iamu": rows("iamu", [0.10, 0.12], [0.60, 0.62]),
        "iamu_no_proj": rows("iamu_no_proj", [0.14], [0.66]),  # one seed in common
    }
    lines = paired_table(g).splitlines()
    assert lines[0] == "| row | seeds | iamu - row: uis | iamu - row: mia auc |"
    assert lines[2] == "| iamu_no_proj | 1 | -0.0400 | -0.060 |"  # ablations first; one seed: no interval
    assert lines[3].startswith("| salun | 2 | -0.1400 [") and "| -0.140 [" in lines[3]  # per seed -0.1, -0.18
    assert len(lines) == 4  # the original is the reference for UIS, not a row


def test_a_variant_of_ours_from_another_version_is_never_the_strongest_baseline():
    """A store can hold rows of an ablation this version does not register (`iamu_no_kept`, say): a
    variant of ours by its name, listed with the ablations, never ranked as a baseline."""
    from mtu_dist.reporting.report import baselines, goal_lines, method_order, paired_table

    def rows(m, uis):
        return [Row("b", "partial", s, m, {"uis": u, "uis_excess": 0.1}) for s, u in enumerate(uis)]

    g = {
        "retrain": rows("retrain", [0.01] * 3),
        "iamu": rows("iamu", [0.10, 0.11, 0.12]),
        "iamu_no_kept": rows("iamu_no_kept", [0.09, 0.10, 0.11]),  # lower than iamu: would be "strongest"
        "scrub": rows("scrub", [0.20, 0.21, 0.22]),
        "zz_new_baseline": rows("zz_new_baseline", [0.30, 0.30, 0.30]),  # unknown, not ours: a baseline
    }
    assert baselines(g) == ["scrub", "zz_new_baseline"]
    assert method_order(g)[-2:] == ["zz_new_baseline", "iamu_no_kept"]
    text = goal_lines({("b", "partial"): g})
    assert "strongest baseline scrub 0.2100" in text and "iamu_no_kept" not in text
    assert paired_table(g).splitlines()[2].startswith("| iamu_no_kept | 3 |")  # with the ablations, first


def test_the_ablations_are_held_to_the_goal_against_the_strongest_ranked_baseline():
    """The ablation table measures each row against the baseline the goal line picks (complete, above
    the floor), with paired differences against it and the retrain over the seeds both ran."""
    from mtu_dist.reporting.report import ablation_goal_table, strongest_baseline

    def rows(m, uis, excess=0.1):
        return [Row("b", "partial", s, m, {"uis": u, "uis_excess": excess}) for s, u in enumerate(uis)]

    g = {
        "retrain": rows("retrain", [0.03, 0.04, 0.05]),
        "iamu": rows("iamu", [0.06, 0.05, 0.07]),
        "iamu_no_proj": rows("iamu_no_proj", [0.04, 0.04, 0.04]),
        "pcgrad": rows("pcgrad", [0.08, 0.09, 0.10]),
        "scrub": rows("scrub", [0.01, 0.02]),  # lower, but two of three seeds: not ranked
        "salun": rows("salun", [0.02, 0.02, 0.02], excess=-0.01),  # below the floor: not ranked
    }
    assert strongest_baseline(g) == "pcgrad"
    lines = ablation_goal_table(g, "partial").splitlines()
    assert lines[0].startswith("| row | seeds | mean UIS | below pcgrad (goal 50%) | row - pcgrad | row - retrain |")
    assert lines[2].startswith("| iamu | 3 | 0.0600 | 33% | -0.0300 [")  # (0.09 - 0.06) / 0.09
    # per seed -0.04, -0.05, -0.06 against pcgrad; +0.01, 0.00, -0.01 against the retrain
    assert lines[3].startswith("| iamu_no_proj | 3 | 0.0400 | 56% | -0.0500 [") and "| +0.0000 [" in lines[3]
    assert len(lines) == 4
    del g["pcgrad"]
    assert strongest_baseline(g) is None and ablation_goal_table(g, "partial") == ""

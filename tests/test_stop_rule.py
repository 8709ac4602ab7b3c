"""The stop rule's decisions on a scripted sequence of forget-pair metrics (no model: the measurement
is replaced, the decisions are the code under test)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mtu_dist.runner.loop import StopRule


def _rule(sequence: list[dict], targets=("seg", "depth")) -> StopRule:
    rule = object.__new__(StopRule)  # skips measuring the original: the thresholds are given
    rule.s = SimpleNamespace(manifest=SimpleNamespace(tasks=("seg", "depth", "normal")))
    rule.targets, rule.thresholds, rule.done = targets, {"seg": 0.30, "depth": 0.60}, set()
    rule.asked = []
    points = iter(sequence)

    def measure(model, only=None):
        rule.asked.append(set(only))
        return {t: {"miou" if t == "seg" else "delta1": v} for t, v in next(points).items()}

    rule._forget_metrics = measure
    return rule


def test_a_task_that_climbs_back_is_ascended_again_and_the_run_ends_when_all_are_done_at_once():
    rule = _rule(
        [
            {"seg": 0.29, "depth": 0.70},  # seg done
            {"seg": 0.33, "depth": 0.59},  # seg came back above its level, depth done: not finished
            {"seg": 0.30, "depth": 0.60},  # both at their level (the threshold counts as done)
        ]
    )
    assert rule.update(None) is False and rule.done == {"seg"}
    assert rule.mask().tolist() == [True, False, False]  # seg is not ascended at the next step
    assert rule.update(None) is False and rule.done == {"depth"}
    assert rule.mask().tolist() == [False, True, False]  # seg is ascended again
    assert rule.update(None) is True and rule.done == {"seg", "depth"}
    assert rule.asked == [{"seg", "depth"}] * 3  # every target task measured at every check


def test_no_thresholds_never_stops():
    rule = _rule([])
    rule.thresholds = {}
    assert rule.update(None) is False and rule.mask().dtype == torch.bool

"""An unlearning run's trajectory: forgetting and collateral every `unlearn.trajectory_every` steps.

Each point holds the primary metric of every task on fixed evaluation subsets, the same for every
method on a request (they depend only on the request and the manifest):

* `forget`: the request's target pairs (all of them: the forget set is small);
* `forget_kept`: the kept tasks of the forgotten instances (partial setting);
* `retain`: the first `unlearn.trajectory_sample` train instances outside the request, in manifest order;
* `val`: the first `unlearn.trajectory_sample` val instances, in manifest order.

From the points (pure functions below): the two interferences the benchmark separates, each a mean
relative move |U - O| / O of the primary metric against the trajectory's first point (the model
before unlearning), over

* *task-level*: the non-target tasks (kept tasks of the forget instances; the other tasks on retain
  and val), and
* *instance-level*: the target tasks on retain and val instances.

In the full setting every task is a target, so task-level interference is undefined (None).
"""

from __future__ import annotations

import time

import numpy as np

from mtu_dist.data.stream import blank_sample, load_instances
from mtu_dist.evaluation.evaluate import instance_batches, primary, run_split

SPLITS = ("forget", "forget_kept", "retain", "val")


class Recorder:
    """Evaluates the fixed subsets on demand; `seconds` is the time spent (kept out of the run's cost)."""

    def __init__(self, s, forget_set: list[dict], targets):
        m, u = s.manifest, s.cfg.unlearn
        self.s, self.points, self.seconds = s, [], 0.0
        forgetting, forgotten = s.forget_entries, s.forgotten_entries
        every = lambda k: np.ones(len(m.tasks), bool)  # noqa: E731
        retain_ids = [k for k in m.split("train").keys if k not in forgotten][: u.trajectory_sample]
        self.sets = {
            "forget": forget_set,
            "retain": load_instances(m, "train", retain_ids, every),
            "val": load_instances(m, "val", m.split("val").keys[: u.trajectory_sample], every),
        }
        if set(targets) != set(m.tasks):
            kept = lambda k: np.array([t not in forgetting[k] for t in m.tasks])  # noqa: E731
            self.sets["forget_kept"] = load_instances(m, "train", list(forgetting), kept)
        self.targets = list(targets)

    def record(self, model, step: int) -> None:
        t0 = time.perf_counter()
        m, s = self.s.manifest, self.s
        point = {"step": step}
        model.eval()
        for name in SPLITS:
            if name in self.sets:
                metrics, _ = run_split(
                    model,
                    instance_batches(self.sets[name], s.rank, s.world, 16, blank_sample(m)),
                    m.tasks,
                    m.num_classes,
                    s.world,
                    losses=False,
                )  # metrics only
                point[name] = {t: primary(metrics, t) for t in metrics}
        model.train()
        self.points.append(point)
        self.seconds += time.perf_counter() - t0

    def result(self) -> dict:
        return {
            "every": self.s.cfg.unlearn.trajectory_every,
            "sample": self.s.cfg.unlearn.trajectory_sample,
            "targets": self.targets,
            "points": self.points,
        }


# --------------------------------------------------------------------------
# interference and progress (pure)
# --------------------------------------------------------------------------


def _move(p0: dict, p: dict, split: str, tasks) -> list[float]:
    out = []
    for t in tasks:
        o, u = p0.get(split, {}).get(t), p.get(split, {}).get(t)
        if o is not None and u is not None and o != 0:
            out.append(abs(u - o) / abs(o))
    return out


def interference(p0: dict, p: dict, targets) -> dict:
    """Task-level and instance-level interference of point `p` against the first point `p0`."""
    tasks = list(p0.get("val", {}))
    others = [t for t in tasks if t not in targets]
    task_level = _move(p0, p, "forget_kept", others) + _move(p0, p, "retain", others) + _move(p0, p, "val", others)
    inst_level = _move(p0, p, "retain", targets) + _move(p0, p, "val", targets)
    return {
        "task_interference": float(np.mean(task_level)) if task_level else None,
        "instance_interference": float(np.mean(inst_level)) if inst_level else None,
    }


def curve(trajectory: dict, retrain_forget: dict) -> list[dict]:
    """Per point: step, forget progress toward the retrain's forget level (statistics.progress) and
    both interferences. `retrain_forget`: {task: primary} of the retrain on the request's forget pairs."""
    from mtu_dist.evaluation.statistics import progress

    points, targets = trajectory["points"], trajectory["targets"]
    if not points:
        return []
    p0 = points[0]
    start = {t: p0["forget"][t] for t in targets if t in p0.get("forget", {})}
    return [
        {
            "step": p["step"],
            "progress": progress(p.get("forget", {}), start, retrain_forget),
            **interference(p0, p, targets),
        }
        for p in points
    ]

"""Intervals for the benchmark's cells, paired differences, and unlearning at equal forgetting.

Pure functions of numbers (no files, no models), so every figure of `mtu report` can be recomputed.

**Intervals.** A table cell is one value per evaluation seed; each seed draws a new forget request
(>= 100 instances), so the spread over seeds already holds both the request-to-request and the
instance-to-instance variation of the cell (a cluster bootstrap's clusters are exactly these
requests). `interval` resamples the seeds (percentile bootstrap of the mean) and widens the result
by the small-sample factor t_{n-1} / z, so that with 5 seeds the interval does not claim more than a
Student-t interval would (a plain percentile bootstrap covers ~85% at n = 5). `paired` does the same
on the per-seed differences of two methods on the same requests and seeds.

**Equal forgetting.** A trajectory is a list of points (step, forget progress, interference...).
`at_level` interpolates linearly between the two points around the first crossing of a level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

LEVEL = 0.95
N_BOOT = 4000
BOOT_SEED = 0


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    n: int

    def excludes(self, value: float = 0.0) -> bool:
        return self.n > 1 and not (self.lo <= value <= self.hi)


def _finite(values) -> np.ndarray:
    return np.array([float(v) for v in values if v is not None and math.isfinite(float(v))])


def interval(values, level: float = LEVEL, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> Interval | None:
    """Mean and `level` interval of the finite values (see the module docstring); a lone value's
    interval is the value itself (n = 1 says it is not an interval)."""
    v = _finite(values)
    if v.size == 0:
        return None
    mean = float(v.mean())
    if v.size == 1:
        return Interval(mean, mean, mean, 1)
    rng = np.random.default_rng(seed)
    boot = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    q = (1 - level) / 2
    lo, hi = np.quantile(boot, [q, 1 - q])
    widen = _widen(v.size, level)  # the small-sample correction
    return Interval(mean, float(mean - widen * (mean - lo)), float(mean + widen * (hi - mean)), int(v.size))


@cache
def _widen(n: int, level: float) -> float:
    from scipy.stats import norm, t

    q = (1 - level) / 2
    return float(t.ppf(1 - q, n - 1) / norm.ppf(1 - q))


def paired(a: dict, b: dict, level: float = LEVEL) -> Interval | None:
    """Interval of mean(a - b) over the keys (seeds) both have a finite value for."""
    keys = [
        k for k in a if k in b and a[k] is not None and b[k] is not None and math.isfinite(a[k]) and math.isfinite(b[k])
    ]
    return interval([a[k] - b[k] for k in keys], level)


# --------------------------------------------------------------------------
# trajectories
# --------------------------------------------------------------------------


def progress(forget: dict, original: dict, retrain: dict) -> float | None:
    """How far the forget pairs have gone from the original's level to the retrain's: per target task
    (O - U) / (O - R) on the primary metric (0 = untouched, 1 = at the retrain's level), and the least
    of them, so a point counts as forgotten only when every target task is. A task the original already
    scores at the retrain's level (O = R) has nothing to forget and is left out; None where a metric is
    missing or no task is left."""
    values = []
    for t, o in original.items():
        u, r = forget.get(t), retrain.get(t)
        if u is None or r is None:
            return None
        if o != r:
            values.append((o - u) / (o - r))
    return min(values) if values else None


def at_level(points: list[dict], level: float = 1.0, x: str = "progress") -> dict | None:
    """The trajectory at the first point where `x` reaches `level`, every other field interpolated
    linearly between the points before and after the crossing; None if it never does."""
    prev = None
    for p in points:
        if p.get(x) is None:
            continue
        if p[x] >= level:
            if prev is None or p[x] == prev[x]:
                return dict(p)
            w = (level - prev[x]) / (p[x] - prev[x])
            return {
                k: (
                    prev[k] + w * (p[k] - prev[k])
                    if isinstance(p.get(k), (int, float)) and isinstance(prev.get(k), (int, float)) and k != x
                    else p.get(k)
                )
                for k in p
            } | {x: level}
        prev = p
    return None

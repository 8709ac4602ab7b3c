"""Unlearning metrics (docs/design.md §6) as pure functions of evaluation results.

Inputs are what `evaluate` produces and run folders keep: `splits` = {split: {task: {metric: value}}}
(metrics.json) and `losses` = {split: [(key, task, loss)]} (losses.json). Nothing here reads files,
touches a model or talks to other ranks, so every number can be recomputed from a finished run.

* `mia_auc`: a loss-based membership-inference attack (Shokri et al., "Membership Inference Attacks
  against Machine Learning Models", S&P 2017; Yeom et al., "Privacy Risk in Machine Learning:
  Analyzing the Connection to Overfitting", CSF 2018, whose attack thresholds the loss), run the
  way unlearning evaluations use it (Kurmanji et al., "Towards Unbounded Machine Unlearning",
  NeurIPS 2023): fit on retain (members) vs val (non-members), score forget vs held-out val.
* `uis`: the Unlearning Impact Score of OrthoGrad (arXiv 2503.02312), per task and its mean.
* `gap_to_retrain`: distance to the gold standard, in percentage points of the primary metrics.
* `delta_m`: the multi-task Delta_m (Maninis et al., CVPR 2019; Vandenhende et al., TPAMI 2021).
* `cost_ratio`: unlearning wall time over retraining wall time.
"""

from __future__ import annotations

import math

import numpy as np

from mtu_dist.tasks import TASKS

MIA_SEED = 0  # one val split for every run and method, whatever the training seed
LOSS_FLOOR = 1e-6  # log(loss + floor): losses are >= 0 and an overfit model drives them to ~0
DELTA_M_SPLITS = ("val", "retain")  # what the unlearned model must keep: generalisation and the retained fit

# Each task's primary metric in percent: mIoU and delta<1.25 are fractions, within_30 is already a
# percentage (tasks.NormalMeter). The gap to retrain averages over tasks, so they must share a unit.
PRIMARY_PERCENT = {"seg": 100.0, "depth": 100.0, "normal": 1.0}


# --------------------------------------------------------------------------
# membership inference
# --------------------------------------------------------------------------


def loss_features(records, tasks: list[str]) -> tuple[list[str], np.ndarray]:
    """Instances x tasks: log(loss + LOSS_FLOOR) per instance and task; NaN where an instance has no
    loss for a task (the pair was not supervised in that split). Rows in sorted key order, so the
    result does not depend on the order ranks gathered the records in."""
    per_key: dict[str, dict[str, float]] = {}
    for key, task, loss in records:
        per_key.setdefault(key, {})[task] = loss
    keys = sorted(per_key)
    col = {t: j for j, t in enumerate(tasks)}
    x = np.full((len(keys), len(tasks)), np.nan)
    for i, k in enumerate(keys):
        for t, v in per_key[k].items():
            if t in col:
                x[i, col[t]] = math.log(max(v, 0.0) + LOSS_FLOOR)
    return keys, x


def split_val(keys: list[str], seed: int = MIA_SEED) -> tuple[list[str], list[str]]:
    """Val, split once by a seeded permutation of its sorted keys: (attack-training half, held-out half)."""
    keys = sorted(keys)
    order = np.random.default_rng(seed).permutation(len(keys))
    half = len(keys) // 2
    return [keys[i] for i in order[:half]], [keys[i] for i in order[half:]]


def attack_auc(
    member: np.ndarray, nonmember: np.ndarray, positive: np.ndarray, negative: np.ndarray, seed: int = MIA_SEED
) -> float | None:
    """Fit logistic regression on member (1) vs non-member (0) rows; ROC AUC of its scores on
    positive (1) vs negative (0) rows. None when a group is empty.

    Missing features (NaN) are filled with the column's median over the attack's training rows (a
    neutral value that leaks nothing from the scored rows); a column no training row has is
    dropped. Features are standardised on the training rows. Classes are weighted to balance, since
    the retain sample and the val half need not be the same size.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    if min(len(member), len(nonmember), len(positive), len(negative)) == 0:
        return None
    train = np.vstack([member, nonmember])
    keep = ~np.isnan(train).all(axis=0)
    if not keep.any():
        return None
    fill = np.nanmedian(train[:, keep], axis=0)
    prep = lambda a: np.where(np.isnan(a[:, keep]), fill, a[:, keep])  # noqa: E731
    scaler = StandardScaler().fit(prep(train))
    y = np.r_[np.ones(len(member)), np.zeros(len(nonmember))]
    clf = LogisticRegression(class_weight="balanced", random_state=seed, max_iter=1000)
    clf.fit(scaler.transform(prep(train)), y)
    queries = np.vstack([positive, negative])
    scores = clf.decision_function(scaler.transform(prep(queries)))
    return float(roc_auc_score(np.r_[np.ones(len(positive)), np.zeros(len(negative))], scores))


def mia_auc(losses: dict, tasks: list[str], target_tasks: list[str] | None = None, seed: int = MIA_SEED) -> dict:
    """The membership-inference AUC of one model on one forget request.

    Features: one column per task, the instance's loss on it. A forgotten instance's row joins its
    `forget` losses (target pairs) and `forget_kept` losses (partial setting: the kept tasks, still
    legitimately members); its missing tasks are filled as in `attack_auc`. The attack is fit on
    `retain` (members) vs one half of `val` (non-members) and scores `forget` instances (positive)
    vs the other half of `val`. 0.5 = the forget instances look like unseen data; the retrained
    model is the reference. With `target_tasks` (partial setting) the attack is also run on the
    target-task columns alone (`mia_auc_target`).
    """
    val_keys, val_x = loss_features(losses.get("val", []), tasks)
    ret_keys, ret_x = loss_features(losses.get("retain", []), tasks)
    _, fgt_x = loss_features(list(losses.get("forget", [])) + list(losses.get("forget_kept", [])), tasks)
    attack_half, heldout = split_val(val_keys, seed)
    row = {k: i for i, k in enumerate(val_keys)}
    non_x = val_x[[row[k] for k in attack_half]]
    held_x = val_x[[row[k] for k in heldout]]
    out = {
        "mia_auc": attack_auc(ret_x, non_x, fgt_x, held_x, seed),
        "mia_auc_target": None,
        "mia_counts": {
            "member": len(ret_keys),
            "nonmember": len(attack_half),
            "forget": len(fgt_x),
            "heldout": len(heldout),
        },
        "mia_seed": seed,
    }
    if target_tasks:
        cols = [tasks.index(t) for t in target_tasks if t in tasks]
        out["mia_auc_target"] = attack_auc(ret_x[:, cols], non_x[:, cols], fgt_x[:, cols], held_x[:, cols], seed)
    return out


# --------------------------------------------------------------------------
# metric-based scores
# --------------------------------------------------------------------------


def _primary(splits: dict, split: str, task: str) -> float | None:
    value = splits.get(split, {}).get(task, {}).get(TASKS[task].primary)
    return None if value is None or not math.isfinite(value) else float(value)


def _rel(a: float | None, b: float | None) -> float | None:
    """|a - b| / a, or None where undefined (a missing or zero reference)."""
    if a is None or b is None or a == 0:
        return None
    return abs(a - b) / abs(a)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def uis(original: dict, unlearned: dict, setting: str, target_tasks: list[str]) -> dict:
    """Unlearning Impact Score (OrthoGrad, arXiv 2503.02312; lower is better), on each task's
    primary metric m (higher is better; the terms are absolute relative changes, so a metric's
    orientation does not change them):

        UIS_t = 1/2 (|O_val - U_val| / O_val + |O_val - U_forget| / O_val)

    O = original, U = unlearned, both evaluated on the same request. A target task should fall to
    val level on its forget pairs and stay put on val. For the kept tasks of a partial request
    (tasks no entry targets) the forget pairs must not move, so the forget term becomes
    |O_forget - U_forget| / O_forget on the `forget_kept` split. In the full setting every task is a
    target. A task targeted by some entries and kept by others counts as a target. A term with a
    zero or missing reference makes its task None; the mean is over the defined tasks.
    Returns {"per_task": {task: value}, "mean": value}.
    """
    per_task = {}
    for t in original.get("val", {}):
        o_val, u_val = _primary(original, "val", t), _primary(unlearned, "val", t)
        if setting == "full" or t in target_tasks:
            forget_term = _rel(o_val, _primary(unlearned, "forget", t))
        else:
            forget_term = _rel(_primary(original, "forget_kept", t), _primary(unlearned, "forget_kept", t))
        val_term = _rel(o_val, u_val)
        per_task[t] = None if val_term is None or forget_term is None else 0.5 * (val_term + forget_term)
    return {"per_task": per_task, "mean": _mean(per_task.values())}


def gap_to_retrain(unlearned: dict, retrain: dict) -> dict:
    """Mean absolute difference to the retrained model over the primary metric of every task on
    every split both report, in percentage points (`PRIMARY_PERCENT`), and the per-split values.
    (The MIA AUC gap is reported beside it, in AUC units.) Lower is better; 0 = retrain."""
    per_split = {}
    for sp, tasks in unlearned.items():
        diffs = {
            t: abs(u - r) * PRIMARY_PERCENT[t]
            for t in tasks
            if (u := _primary(unlearned, sp, t)) is not None and (r := _primary(retrain, sp, t)) is not None
        }
        if diffs:
            per_split[sp] = diffs
    return {"mean": _mean([v for d in per_split.values() for v in d.values()]), "per_split": per_split}


def delta_m(original: dict, unlearned: dict, splits=DELTA_M_SPLITS) -> dict:
    """Multi-task Delta_m of the unlearned model vs the original, in percent, per split:

        Delta_m = 1/T sum_t 1/N_t sum_j (-1)^{l_j} (U_j - O_j) / O_j * 100

    over every metric j of task t with a known direction (`TASKS[t].higher_is_better`; l_j = 1 where
    lower is better). Computed on `val` (generalisation) and `retain` (the fit the request did not
    touch), the splits an unlearned model must preserve; the forget splits are meant to move and are
    scored by UIS. `mean` averages the splits. Higher is better; 0 = unchanged. A metric with a zero
    reference is skipped.
    """
    out = {}
    for sp in splits:
        per_task = []
        for t, o_mets in original.get(sp, {}).items():
            u_mets = unlearned.get(sp, {}).get(t, {})
            rel = [
                (1 if hib else -1) * (u_mets[k] - o_mets[k]) / abs(o_mets[k])
                for k, hib in TASKS[t].higher_is_better.items()
                if k in o_mets
                and k in u_mets
                and o_mets[k] != 0
                and math.isfinite(o_mets[k])
                and math.isfinite(u_mets[k])
            ]
            if rel:
                per_task.append(100.0 * float(np.mean(rel)))
        out[sp] = _mean(per_task)
    out["mean"] = _mean(out[sp] for sp in splits)
    return out


def cost_ratio(unlearn_s: float | None, retrain_s: float | None) -> float | None:
    """Unlearning wall time over the retrain's (both as recorded in metrics.json `time_s`)."""
    if unlearn_s is None or not retrain_s or retrain_s <= 0:
        return None
    return float(unlearn_s) / float(retrain_s)

"""The unlearning baselines: each one does what its paper says on a small case, every registered method
runs end to end through `mtu unlearn`, and pcgrad/orthograd give the same parameters on 1 and 2 real
gloo ranks in both reduction modes."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ROOT, accelerate_launch, run_mtu
from safetensors.torch import load_file

from mtu_dist.config import RunConfig, UnlearnConfig
from mtu_dist.methods import METHODS, build_method
from mtu_dist.methods.base import StepContext
from mtu_dist.methods.pcgrad import pcgrad_coefficients, pcgrad_orders
from mtu_dist.methods.random_label import random_targets
from mtu_dist.methods.salun import top_fraction_mask
from mtu_dist.methods.scrub import divergences
from mtu_dist.model import build_model
from mtu_dist.runner.objective import global_counts, normalised_losses
from mtu_dist.tasks import IGNORE_INDEX, TASKS

TASKS3 = ("seg", "depth", "normal")
C = 4
TINY = str(ROOT / "configs" / "tiny.yaml")
EXACT = dict(rtol=1e-10, atol=1e-12)  # float64 throughout the in-process checks


# ------------------------------------------------------------------ small in-process cases
def _model(seed=0):
    torch.manual_seed(seed)
    cfg = RunConfig().model.model_copy(update={"width": 8, "head_width": 8, "dtype": "float64"})
    return build_model(cfg, TASKS3, C)


def _batch(keys, seed, mask=None, h=8, w=12):
    g = torch.Generator().manual_seed(seed)
    n = len(keys)
    seg = torch.randint(0, C, (n, h, w), generator=g)
    seg[:, :2] = IGNORE_INDEX
    depth = torch.rand(n, 1, h, w, generator=g) + 0.5
    depth[..., :3] = 0
    normal = F.normalize(torch.randn(n, 3, h, w, generator=g), dim=1)
    normal[..., -2:, :] = 0
    return {
        "image": torch.rand(n, 3, h, w, generator=g),
        "seg": seg,
        "depth": depth,
        "normal": normal,
        "mask": torch.ones(n, len(TASKS3), dtype=torch.bool) if mask is None else mask,
        "valid": torch.ones(n, dtype=torch.bool),
        "key": list(keys),
    }


def _ctx(model, step=1, steps=10, targets=("seg", "normal"), alpha=0.5, record=None, **unlearn):
    cfg = UnlearnConfig(steps=steps, signal_engine="sequential", **unlearn)
    return StepContext(
        model=model,
        tasks=TASKS3,
        world=1,
        alpha=alpha,
        step=step,
        targets=targets,
        config=cfg,
        seed=3,
        num_classes=C,
        **({"record": record} if record else {}),
    )


def _flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _grad(loss, model):
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, model.parameters())]
    )


def _shared_mask(model):
    shared = {id(p) for p in model.shared_parameters()}
    return torch.cat([torch.full((p.numel(),), id(p) in shared) for p in model.parameters()])


def test_random_label_targets_are_random_classes_and_other_retain_instances():
    forget = _batch(
        ["d/train/0", "d/train/1", "d/train/2"],
        seed=0,
        mask=torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.bool),
    )
    forget["valid"][2] = False  # padding: no target
    # retain: instance 0's kept task (depth) only, as the retain stream gives it; 5 and 6 are full
    retain = _batch(
        ["d/train/0", "d/train/5", "d/train/6"],
        seed=1,
        mask=torch.tensor([[0, 1, 0], [1, 1, 1], [1, 0, 1]], dtype=torch.bool),
    )
    recorded = []
    ctx = _ctx(_model(), step=4, record=lambda b, role: recorded.append((b, role)))
    out = random_targets(ctx, forget, retain)
    # seg: every labelled pixel of a forget pair -> a valid class different from its label
    for b in (0, 1):
        lab, new = forget["seg"][b], out["seg"][b]
        labelled = lab != IGNORE_INDEX
        assert labelled.any() and ((new[labelled] >= 0) & (new[labelled] < C)).all()
        assert (new[labelled] != lab[labelled]).all() and (new[~labelled] == IGNORE_INDEX).all()
    assert torch.equal(out["seg"][2], forget["seg"][2])  # not a forget pair: untouched
    # maps: a whole retain map of ANOTHER instance whose same task is retain-supervised
    donors = {"depth": {"d/train/0": 0, "d/train/5": 1}, "normal": {"d/train/5": 1, "d/train/6": 2}}
    for t, b in (("normal", 0), ("depth", 1), ("normal", 1)):
        j = TASKS3.index(t)
        hits = [k for k, i in donors[t].items() if torch.equal(out[t][b], retain[t][i])]
        assert len(hits) == 1 and hits[0] != forget["key"][b] and retain["mask"][donors[t][hits[0]], j]
        assert out["mask"][b, j]
    assert not any(torch.equal(out["depth"][1], forget["depth"][i]) for i in range(3))
    # the lent pairs are recorded under role `target`: exactly the retain pairs used, no forget pair
    ((rec, role),) = recorded
    assert role == "target"
    used = {(rec["key"][i], TASKS3[j]) for i, j in rec["mask"].nonzero().tolist()}
    assert used <= {("d/train/0", "depth"), ("d/train/5", "depth"), ("d/train/5", "normal"), ("d/train/6", "normal")}
    assert len(used) >= 2
    # the seg relabelling is fixed per (seed, instance): the same at any step
    again = random_targets(_ctx(_model(), step=9), forget, retain)
    assert torch.equal(again["seg"][:2], out["seg"][:2])


def test_random_label_pair_without_donor_gets_no_target():
    forget = _batch(["d/train/0"], seed=0, mask=torch.tensor([[0, 1, 0]], dtype=torch.bool))
    retain = _batch(["d/train/0", "d/train/3"], seed=1, mask=torch.tensor([[0, 1, 1], [1, 0, 1]], dtype=torch.bool))
    out = random_targets(_ctx(_model()), forget, retain)  # the only depth-supervised retain sample is itself
    assert not out["mask"][0, 1]


def test_l1_sparse_objective_is_retain_loss_plus_l1_norm():
    model = _model()
    retain = _batch([f"d/train/{i}" for i in range(3)], seed=2)
    preds = model(retain["image"])
    sup = retain["mask"] & retain["valid"][:, None]
    by_hand = sum(TASKS[t].per_sample_loss(preds[t], retain[t])[sup[:, j]].mean() for j, t in enumerate(TASKS3))
    norm = sum(p.abs().sum() for p in model.parameters())
    for schedule, step, gamma in (("constant", 3, 1e-2), ("linear", 3, 1e-2 * (1 - 2 / 10))):
        method = build_method("l1_sparse", {"l1": 1e-2, "schedule": schedule})
        loss, parts = method.objective(_ctx(model, step=step, steps=10), None, retain)
        torch.testing.assert_close(loss, by_hand + gamma * norm, **EXACT)
        torch.testing.assert_close(parts["l1_penalty"], gamma * norm, **EXACT)


def test_salun_mask_keeps_top_fraction_and_masked_weights_do_not_move():
    scores = [torch.tensor([[5.0, 1.0], [3.0, 3.0]]), torch.tensor([0.5, 4.0, 2.0])]
    kept = top_fraction_mask(scores, 3 / 7)  # 3 of 7: the 5, the 4 and exactly one of the tied 3s
    assert sum(int(m.sum()) for m in kept) == 3 and kept[0][0, 0] and kept[1][1] and int(kept[0][1].sum()) == 1

    model = _model()
    forget = [_batch([f"d/train/{i}", f"d/train/{i + 1}"], seed=10 + i) for i in range(2)]
    retain = _batch([f"d/train/{i}" for i in range(5, 9)], seed=3)
    ctx = _ctx(model, targets=TASKS3)
    method = build_method("salun", {"fraction": 0.3, "saliency_batches": 2})
    logs = method.setup(ctx, None, iter(forget))
    # saliency = |grad of the forget loss| summed over the two batches, computed independently
    total = sum(sum(normalised_losses(model(b["image"]), b, TASKS3, global_counts(b, 1)).values()) for b in forget)
    saliency = _grad(total, model).abs()
    mask = torch.cat([m.reshape(-1) for m in method.masks])
    assert int(mask.sum()) == round(0.3 * mask.numel()) and abs(logs["saliency_kept"] - 0.3) < 1e-3
    assert saliency[mask].min() >= saliency[~mask].max()
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in (1, 2):
        method.step(_ctx(model, step=step, targets=TASKS3), forget[0], retain)
        opt.step()
        opt.zero_grad()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(after[~mask], before[~mask]) and (after[mask] != before[mask]).any()


def test_scrub_alternates_max_and_min_steps_and_keeps_the_teacher():
    model = _model()
    forget = _batch(["d/train/0", "d/train/1"], seed=4, mask=torch.tensor([[1, 0, 1]] * 2, dtype=torch.bool))
    retain = _batch([f"d/train/{i}" for i in range(5, 9)], seed=5)
    method = build_method("scrub", {"min_per_max": 1, "max_until": 0.5, "kd_weight": 1.0})
    method.setup(_ctx(model, steps=8), None, None)
    teacher = copy.deepcopy(method.teacher.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def forget_divergence():
        with torch.no_grad():
            return sum(
                divergences(model(forget["image"]), method.teacher(forget["image"]), forget, TASKS3, 1, 4.0).values()
            )

    rises = []
    for step in range(1, 9):
        ctx = _ctx(model, step=step, steps=8)
        kind, before = method.kind(ctx), forget_divergence()
        method.step(ctx, forget, retain)
        opt.step()
        opt.zero_grad()
        if kind == "max":
            rises.append(float(forget_divergence() - before))
    # a max step after every min step, within the first half of the budget; min steps only after it
    assert method.history == ["min", "max", "min", "max", "min", "min", "min", "min"]
    assert len(rises) == 2 and all(r > 0 for r in rises), rises  # each max step raised the forget divergence
    assert all(torch.equal(v, teacher[k]) for k, v in method.teacher.state_dict().items())
    assert not all(torch.equal(v, teacher[k]) for k, v in model.state_dict().items())
    other = build_method("scrub", {"min_per_max": 2, "max_until": 1.0})
    assert [other.kind(_ctx(model, step=s, steps=6)) for s in range(1, 7)] == ["min", "min", "max"] * 2


def _pcgrad_direct(vecs: torch.Tensor, orders) -> torch.Tensor:
    """Algorithm 1 of the PCGrad paper on explicit vectors (the reference for the Gram-only form)."""
    out = []
    for i, order in enumerate(orders):
        g = vecs[i].clone()
        for j in order:
            dot = g @ vecs[j]
            if dot < 0:
                g = g - dot / (vecs[j] @ vecs[j]) * vecs[j]
        out.append(g)
    return torch.stack(out)


def test_pcgrad_gram_form_equals_vector_surgery_and_removes_conflicts():
    gen = torch.Generator().manual_seed(0)
    for k in (2, 3, 5):
        for _trial in range(5):
            vecs = torch.randn(k, 40, generator=gen, dtype=torch.float64)
            vecs[1] = -0.7 * vecs[0] + 0.3 * vecs[1]  # at least one conflicting pair
            orders = pcgrad_orders(k, gen)
            coef, n = pcgrad_coefficients(vecs @ vecs.T, orders)
            direct = _pcgrad_direct(vecs, orders)
            torch.testing.assert_close(coef @ vecs, direct, **EXACT)
            assert n >= 1
            for i, order in enumerate(orders):  # right after its last projection, no conflict with that task
                assert direct[i] @ vecs[order[-1]] >= -1e-10
            if k == 2:  # the paper's two-task case: the projected pair conflicts with neither original
                assert direct[0] @ vecs[1] >= -1e-10 and direct[1] @ vecs[0] >= -1e-10
    aligned = torch.rand(4, 10, generator=gen, dtype=torch.float64)  # positive vectors: no conflict
    coef, n = pcgrad_coefficients(aligned @ aligned.T, pcgrad_orders(4, gen))
    assert n == 0 and torch.equal(coef, torch.eye(4, dtype=torch.float64))


def test_pcgrad_step_writes_the_surgery_of_the_task_gradients():
    model = _model()
    forget = _batch(["d/train/0", "d/train/1"], seed=6, mask=torch.tensor([[1, 0, 1]] * 2, dtype=torch.bool))
    retain = _batch([f"d/train/{i}" for i in range(5, 9)], seed=7)
    ctx = _ctx(model, step=2, alpha=0.3)
    method = build_method("pcgrad", {})
    method.setup(ctx, None, None)
    method.step(ctx, forget, retain)
    # reference: task gradients by autograd, Algorithm 1 on the shared coordinates, plain sum on the heads
    f = normalised_losses(model(forget["image"]), forget, TASKS3, global_counts(forget, 1))
    r = normalised_losses(model(retain["image"]), retain, TASKS3, global_counts(retain, 1))
    vecs = torch.stack(
        [-(1 - 0.3) * _grad(f[t], model) for t in ctx.targets] + [0.3 * _grad(r[u], model) for u in TASKS3]
    )
    orders = pcgrad_orders(5, torch.Generator().manual_seed(ctx.seed * 1_000_003 + ctx.step))
    shared = _shared_mask(model)
    expected = vecs.sum(0)
    expected[shared] = _pcgrad_direct(vecs[:, shared], orders).sum(0)
    torch.testing.assert_close(_flat_grads(model), expected, **EXACT)
    assert not torch.allclose(expected[shared], vecs[:, shared].sum(0))  # the surgery did something


def test_orthograd_forget_direction_is_orthogonal_to_every_retain_sample():
    model = _model()
    forget = _batch(["d/train/0", "d/train/1"], seed=8, mask=torch.tensor([[1, 0, 1]] * 2, dtype=torch.bool))
    retain = _batch(
        [f"d/train/{i}" for i in range(5, 9)],
        seed=9,
        mask=torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool),
    )
    alpha = 0.4
    ctx = _ctx(model, alpha=alpha)
    method = build_method("orthograd", {})
    method.setup(ctx, None, None)
    method.step(ctx, forget, retain)
    update = _flat_grads(model)
    # independently: each retain sample's own gradient (forwarded alone), the batch retain gradient
    per_sample = []
    for b in range(4):
        one = {k: v[b : b + 1] for k, v in retain.items()}
        preds = model(one["image"])
        per_sample.append(
            _grad(
                sum(TASKS[t].per_sample_loss(preds[t], one[t]).sum() * one["mask"][0, j] for j, t in enumerate(TASKS3)),
                model,
            )
        )
    r = normalised_losses(model(retain["image"]), retain, TASKS3, global_counts(retain, 1))
    f = normalised_losses(model(forget["image"]), forget, TASKS3, global_counts(forget, 1))
    g_r, g_f = _grad(sum(r.values()), model), _grad(f["seg"] + f["normal"], model)
    applied = (alpha * g_r - update) / (1 - alpha)  # the forget direction the step applied
    for g in per_sample:
        assert abs(F.cosine_similarity(applied, g, dim=0)) < 1e-6
        assert abs(F.cosine_similarity(g_f, g, dim=0)) > 1e-3  # ... which the raw forget gradient was not
    span = torch.stack(per_sample).T
    residual = g_f - span @ torch.linalg.lstsq(span, g_f).solution
    torch.testing.assert_close(applied, residual, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------ end to end, real processes
# float64, same global batches (1 rank x 2 workers == 2 ranks x 1 worker), in-sync check every step
EXACT_RUN = [
    "--set",
    "model.dtype=float64",
    "--set",
    "unlearn.steps=3",
    "--set",
    "unlearn.lr=0.05",
    "--set",
    "unlearn.signal_engine=sequential",
    "--set",
    "unlearn.check_sync=true",
    "--set",
    "tracking.enabled=false",
]
SCRIPT = ROOT / "tests" / "scripts" / "unlearn_many.py"


@pytest.fixture(scope="module")
def setup(tiny_root, tiny_original, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baselines")
    common = [
        "--config",
        TINY,
        "--set",
        f"data.root={tiny_root}",
        "--set",
        f"out={tmp / 'runs'}",
        "--tracking-uri",
        f"sqlite:///{tmp / 'mlflow.db'}",
    ]
    req = tmp / "partial.yaml"
    run_mtu(
        "forget",
        "make",
        "--dataset",
        tiny_root / "synth-indoor",
        "--fraction",
        0.2,
        "--setting",
        "partial",
        "--tasks",
        "seg",
        "normal",
        "--out",
        req,
        check=True,
    )
    unlearn = ["unlearn", *common, "--request", str(req), "--from", str(tiny_original), *EXACT_RUN]
    return tmp, unlearn, req, tiny_original


def _run_many(setup, runs: dict[str, list[str]], nproc: int) -> dict:
    """`mtu unlearn` once per entry (name -> extra args), all in one process per rank (start-up once)."""
    tmp, unlearn, _, _ = setup
    tag = "-".join(sorted(runs))[:40] + f"-{nproc}"
    spec, status = tmp / f"runs-{tag}.json", tmp / f"status-{tag}.json"
    spec.write_text(json.dumps([[*unlearn, "--name", name, *extra] for name, extra in runs.items()]))
    if nproc == 1:
        proc = subprocess.run(
            [sys.executable, SCRIPT, spec, status],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert status.is_file(), proc.stderr[-4000:]
    else:
        accelerate_launch([SCRIPT, spec, status], nproc=nproc, cwd=tmp)
    return {
        name: {**st, "final": tmp / "runs/synth-indoor" / name / "final"}
        for name, st in json.loads(status.read_text()).items()
    }


@pytest.fixture(scope="module")
def references(setup):
    """Every registered method, one process, default options (also the 1-rank equivalence references)."""
    return _run_many(setup, {m: ["--method", m, "--set", "data.workers=2"] for m in sorted(METHODS)}, nproc=1)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_end_to_end(setup, references, method):
    run = references[method]
    assert run["rc"] == 0, run.get("error")
    final, req = run["final"], setup[2]
    metrics = json.loads((final / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"forget", "forget_kept", "retain", "val"}
    assert metrics["stop_reason"] == "budget"
    forget_pairs = {f"{e['id']}|{t}" for e in yaml.safe_load(req.read_text())["entries"] for t in e["tasks"]}
    used = _ledger(final / "ledger.json")
    assert not (used.get("retain", set()) | used.get("target", set())) & forget_pairs  # no forget pair supervised
    if method in ("random_label", "salun"):  # the random map targets were lent by retain pairs
        assert used["target"]


def _ledger(path) -> dict[str, set[str]]:
    """ledger.json -> role -> {'instance|task'} (per-role document, or flat 'role|instance|task' counts)."""
    doc = json.loads(path.read_text())
    if "roles" in doc:
        return {role: set(r["keys"]) for role, r in doc["roles"].items()}
    out: dict[str, set[str]] = {}
    for key in doc:
        role, pair = key.split("|", 1)
        out.setdefault(role, set()).add(pair)
    return out


@pytest.mark.slow
def test_pcgrad_and_orthograd_agree_on_one_and_two_ranks_in_both_modes(setup, references):
    pairs = {
        f"{m}-2-{mode}": (m, ["--method", m, "--set", "data.workers=1", "--set", f"unlearn.reduction={mode}"])
        for m in ("pcgrad", "orthograd")
        for mode in ("replicated", "sharded")
    }
    runs = _run_many(setup, {name: extra for name, (_, extra) in pairs.items()}, nproc=2)
    original = load_file(setup[3] / "final/model.safetensors")
    for name, (method, _) in pairs.items():
        assert references[method]["rc"] == 0, references[method].get("error")
        ref = load_file(references[method]["final"] / "model.safetensors")
        got = load_file(runs[name]["final"] / "model.safetensors")
        assert max(float((ref[k] - original[k].double()).abs().max()) for k in ref) > 1e-4  # the runs moved
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], **EXACT, msg=lambda m, name=name, k=k: f"{name} {k}: {m}")

import math

import pytest
import torch
import torch.nn.functional as F

from mtu_dist.tasks import (
    ANGLE_BIN_DEG,
    TASKS,
    DepthMeter,
    Meter,
    NormalMeter,
    SegMeter,
    reduce_meters,
)

# tolerance for the histogram-based median: half a bin plus float noise
MEDIAN_TOL = ANGLE_BIN_DEG / 2 + 1e-6


def _deg_vec(deg: float) -> list[float]:
    """Unit vector in the x-y plane at ``deg`` degrees from +x."""
    r = math.radians(deg)
    return [math.cos(r), math.sin(r), 0.0]


def _normal_map(vectors: list[list[float]], h: int, w: int) -> torch.Tensor:
    """[1, 3, H, W] map from a row-major list of H*W 3-vectors."""
    t = torch.tensor(vectors, dtype=torch.float64)  # [H*W, 3]
    return t.T.reshape(1, 3, h, w)


def _assert_metrics_close(a: dict, b: dict, tol: float = 1e-9) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if math.isnan(a[k]):
            assert math.isnan(b[k]), k
        else:
            assert a[k] == pytest.approx(b[k], abs=tol), k


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------


def test_registry_consistent():
    assert set(TASKS) == {"seg", "depth", "normal"}
    assert TASKS["seg"].primary == "miou"
    assert TASKS["depth"].primary == "delta1"
    assert TASKS["normal"].primary == "within_30"
    for name, task in TASKS.items():
        assert task.name == name
        assert task.higher_is_better[task.primary] is True
        meter = task.new_meter(3)
        assert isinstance(meter, Meter)
        # every metric the meter reports has a direction, and vice versa
        assert set(meter.compute()) == set(task.higher_is_better)
    assert TASKS["depth"].higher_is_better["abs_err"] is False
    assert TASKS["depth"].higher_is_better["rel_err"] is False
    assert TASKS["normal"].higher_is_better["mean_angle"] is False
    assert TASKS["normal"].higher_is_better["median_angle"] is False


def test_valid_pixels():
    seg_t = torch.tensor([[[0, 255], [1, 1]], [[255, 255], [255, 255]]])
    assert TASKS["seg"].valid_pixels(seg_t).tolist() == [3, 0]
    depth_t = torch.tensor([[[[1.0, 0.0], [2.0, 0.0]]]])
    assert TASKS["depth"].valid_pixels(depth_t).tolist() == [2]
    normal_t = _normal_map([[1, 0, 0], [0, 0, 0], [0, 0, -1], [0, 0, 0]], 2, 2)
    assert TASKS["normal"].valid_pixels(normal_t).tolist() == [2]


# --------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------


def test_seg_loss_hand_computed():
    # sample 0 pixels (class0 logit, class1 logit) -> target:
    #   (2, 0) -> 0 : CE = log(1 + e^-2)
    #   (0, 0) -> 1 : CE = log 2
    #   (9,-9) -> 255 (ignored)
    #   (0, 1) -> 1 : CE = log(1 + e^-1)
    # sample 1: every pixel ignored -> loss 0
    logits0 = torch.tensor([[[2.0, 0.0], [9.0, 0.0]], [[0.0, 0.0], [-9.0, 1.0]]])
    pred = torch.stack([logits0, torch.randn(2, 2, 2)]).requires_grad_(True)
    target = torch.tensor([[[0, 1], [255, 1]], [[255, 255], [255, 255]]])

    loss = TASKS["seg"].per_sample_loss(pred, target)

    expected0 = (math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(-1))) / 3
    assert loss.shape == (2,)
    assert loss[0].item() == pytest.approx(expected0, rel=1e-6)
    assert loss[1].item() == 0.0
    # agrees with the library cross-entropy on the labelled sample
    ref = F.cross_entropy(pred[:1], target[:1], ignore_index=255)
    assert loss[0].item() == pytest.approx(ref.item(), rel=1e-6)

    loss.sum().backward()
    assert torch.isfinite(pred.grad).all()
    assert torch.all(pred.grad[1] == 0)
    assert torch.all(pred.grad[0, :, 1, 0] == 0)  # ignored pixel gets no gradient


def test_depth_loss_hand_computed():
    # sample 0: |1-1.5| + |3-2| + |4-4| over 3 valid pixels (one gt is 0) = 1.5 / 3
    # sample 1: all gt invalid -> 0
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[5.0, 6.0], [7.0, 8.0]]]], requires_grad=True)
    target = torch.tensor([[[[1.5, 0.0], [2.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])

    loss = TASKS["depth"].per_sample_loss(pred, target)

    assert loss.tolist() == pytest.approx([0.5, 0.0])
    loss.sum().backward()
    assert torch.isfinite(pred.grad).all()
    assert torch.all(pred.grad[1] == 0)
    assert pred.grad[0, 0, 0, 1].item() == 0.0  # invalid pixel


def test_normal_loss_hand_computed():
    # sample 0: cos = 1 (loss 0), cos = 0 (loss 1), invalid, cos = 0.5 (loss 0.5)
    #           -> mean over 3 valid = 1.5 / 3 = 0.5
    # sample 1: all target vectors zero -> 0
    pred0 = _normal_map([[1, 0, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0]], 2, 2)
    tgt0 = _normal_map([[1, 0, 0], [0, 1, 0], [0, 0, 0], _deg_vec(60)], 2, 2)
    pred1 = F.normalize(torch.randn(1, 3, 2, 2, dtype=torch.float64), dim=1)
    pred = torch.cat([pred0, pred1]).requires_grad_(True)
    target = torch.cat([tgt0, torch.zeros(1, 3, 2, 2, dtype=torch.float64)])

    loss = TASKS["normal"].per_sample_loss(pred, target)

    assert loss.tolist() == pytest.approx([0.5, 0.0], abs=1e-12)
    loss.sum().backward()
    assert torch.isfinite(pred.grad).all()
    assert torch.all(pred.grad[1] == 0)
    assert torch.all(pred.grad[0, :, 1, 0] == 0)


def test_losses_do_not_modify_inputs():
    torch.manual_seed(0)
    cases = {
        "seg": (torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))),
        "depth": (torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)),
        "normal": (F.normalize(torch.randn(2, 3, 4, 4), dim=1), F.normalize(torch.randn(2, 3, 4, 4), dim=1)),
    }
    cases["seg"][1][0, 0, 0] = 255
    for name, (pred, target) in cases.items():
        p0, t0 = pred.clone(), target.clone()
        TASKS[name].per_sample_loss(pred, target)
        assert torch.equal(pred, p0) and torch.equal(target, t0), name


# --------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------


def _seg_case():
    # 2-class, 2x3 map, one ignore pixel:
    #   target [[0, 0, 1], [1, 1, 255]]
    #   pred   [[0, 1, 1], [1, 0, 0]]
    # confusion (rows gt): gt0 -> [1, 1], gt1 -> [1, 2]
    # IoU0 = 1 / (2 + 2 - 1) = 1/3, IoU1 = 2 / (3 + 3 - 2) = 1/2 -> mIoU 5/12
    # pixel acc = 3 / 5
    target = torch.tensor([[[0, 0, 1], [1, 1, 255]]])
    labels = torch.tensor([[[0, 1, 1], [1, 0, 0]]])
    logits = F.one_hot(labels, 2).permute(0, 3, 1, 2).float()
    return logits, target


def test_seg_meter_hand_computed():
    logits, target = _seg_case()
    m = TASKS["seg"].new_meter(2)
    m.update(logits, target)
    assert m.confusion().tolist() == [[1.0, 1.0], [1.0, 2.0]]
    out = m.compute()
    assert out["miou"] == pytest.approx(5 / 12)
    assert out["pixel_acc"] == pytest.approx(3 / 5)


def test_seg_meter_skips_absent_classes():
    # a third class that never appears in target nor prediction has zero union
    logits, target = _seg_case()
    logits3 = torch.cat([logits, torch.full_like(logits[:, :1], -1.0)], dim=1)
    m = TASKS["seg"].new_meter(3)
    m.update(logits3, target)
    assert m.compute()["miou"] == pytest.approx(5 / 12)
    # labels may also be passed directly
    m2 = SegMeter(2)
    m2.update(logits.argmax(1), target)
    assert m2.compute()["miou"] == pytest.approx(5 / 12)


def test_depth_meter_hand_computed():
    # valid pixels (pred, gt): (1,1) (3,2) (4.5,5) (0,2); gt 0 pixels ignored
    # abs: 0, 1, 0.5, 2        -> 3.5 / 4 = 0.875
    # rel: 0, 0.5, 0.1, 1      -> 1.6 / 4 = 0.4
    # max ratio: 1, 1.5, 1.11, 2/eps -> delta1 = 2 / 4
    pred = torch.tensor([[[[1.0, 3.0, 4.5], [0.0, 7.0, 1.0]]]])
    gt = torch.tensor([[[[1.0, 2.0, 5.0], [2.0, 0.0, 0.0]]]])
    m = TASKS["depth"].new_meter(0)
    m.update(pred, gt)
    out = m.compute()
    assert out["abs_err"] == pytest.approx(0.875)
    assert out["rel_err"] == pytest.approx(0.4)
    assert out["delta1"] == pytest.approx(0.5)


def test_normal_meter_even_count():
    # angles 0, 10, 45, 90 and one invalid (zero) target
    # mean 145/4 = 36.25; median (10 + 45)/2 = 27.5; within 11.25/22.5/30: 2 of 4
    angles = [0, 10, 45, 90]
    pred = _normal_map([[1, 0, 0]] * 6, 2, 3)
    tgt = _normal_map([_deg_vec(a) for a in angles] + [[0, 0, 0], [0, 0, 0]], 2, 3)
    m = TASKS["normal"].new_meter(0)
    m.update(pred, tgt)
    out = m.compute()
    assert out["mean_angle"] == pytest.approx(36.25, abs=1e-6)
    assert out["median_angle"] == pytest.approx(27.5, abs=MEDIAN_TOL)
    assert out["within_11.25"] == pytest.approx(50.0)
    assert out["within_22.5"] == pytest.approx(50.0)
    assert out["within_30"] == pytest.approx(50.0)


def test_normal_meter_odd_count_float32():
    # angles 0, 10, 20, 25, 45 (float32 inputs): mean 20, median 20,
    # within 11.25: 2/5, within 22.5: 3/5, within 30: 4/5
    angles = [0, 10, 20, 25, 45]
    pred = _normal_map([[1, 0, 0]] * 6, 2, 3).float()
    tgt = _normal_map([_deg_vec(a) for a in angles] + [[0, 0, 0]], 2, 3).float()
    m = NormalMeter()
    m.update(pred, tgt)
    out = m.compute()
    assert out["mean_angle"] == pytest.approx(20.0, abs=1e-4)
    assert out["median_angle"] == pytest.approx(20.0, abs=MEDIAN_TOL + 1e-4)
    assert out["within_11.25"] == pytest.approx(40.0)
    assert out["within_22.5"] == pytest.approx(60.0)
    assert out["within_30"] == pytest.approx(80.0)


def test_empty_meters_report_nan():
    for name, task in TASKS.items():
        out = task.new_meter(2).compute()
        assert all(math.isnan(v) for v in out.values()), name


# --------------------------------------------------------------------------
# sample mask, state round trip, reduce_meters
# --------------------------------------------------------------------------


def _random_batch(name: str, b: int = 4, c: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if name == "seg":
        pred = torch.randn(b, c, 5, 6, generator=g)
        target = torch.randint(0, c, (b, 5, 6), generator=g)
        target[torch.rand(b, 5, 6, generator=g) < 0.2] = 255
    elif name == "depth":
        pred = torch.rand(b, 1, 5, 6, generator=g) * 5
        target = torch.rand(b, 1, 5, 6, generator=g) * 5 + 0.1
        target[torch.rand(b, 1, 5, 6, generator=g) < 0.2] = 0
    else:
        pred = F.normalize(torch.randn(b, 3, 5, 6, generator=g), dim=1)
        target = F.normalize(torch.randn(b, 3, 5, 6, generator=g), dim=1)
        target = target * (torch.rand(b, 1, 5, 6, generator=g) > 0.2)
    return pred, target


@pytest.mark.parametrize("name", ["seg", "depth", "normal"])
def test_sample_mask_excludes_samples(name):
    pred, target = _random_batch(name)
    mask = torch.tensor([True, False, True, False])
    masked = TASKS[name].new_meter(3)
    masked.update(pred, target, sample_mask=mask)
    subset = TASKS[name].new_meter(3)
    subset.update(pred[mask], target[mask])
    assert torch.equal(masked.state(), subset.state())
    # and the mask actually matters
    full = TASKS[name].new_meter(3)
    full.update(pred, target)
    assert not torch.equal(full.state(), masked.state())


@pytest.mark.parametrize("name", ["seg", "depth", "normal"])
def test_state_sum_round_trip(name):
    pred, target = _random_batch(name)
    full = TASKS[name].new_meter(3)
    full.update(pred, target)
    a, b = TASKS[name].new_meter(3), TASKS[name].new_meter(3)
    a.update(pred[:2], target[:2])
    b.update(pred[2:], target[2:])
    merged = TASKS[name].new_meter(3)
    merged.load_state(a.state() + b.state())  # what a SUM all_reduce does
    assert torch.allclose(merged.state(), full.state(), rtol=1e-12, atol=1e-12)
    _assert_metrics_close(merged.compute(), full.compute())


def test_load_state_rejects_wrong_size():
    with pytest.raises(ValueError):
        DepthMeter().load_state(torch.zeros(5, dtype=torch.float64))


def test_reduce_meters_one_collective_across_ranks():
    batches = {n: _random_batch(n, seed=i) for i, n in enumerate(TASKS)}
    full = {n: TASKS[n].new_meter(3) for n in TASKS}
    for n, (p, t) in batches.items():
        full[n].update(p, t)

    # two "ranks", each seeing half the batch; rank 1 builds its dict in another order
    rank0 = {n: TASKS[n].new_meter(3) for n in ["seg", "depth", "normal"]}
    rank1 = {n: TASKS[n].new_meter(3) for n in ["normal", "depth", "seg"]}
    for n, (p, t) in batches.items():
        rank0[n].update(p[:2], t[:2])
        rank1[n].update(p[2:], t[2:])

    captured = []
    reduce_meters(rank1, lambda t: captured.append(t.clone()))
    calls = []

    def fake_all_reduce(t):
        calls.append(t.dtype)
        t.add_(captured[0])

    reduce_meters(rank0, fake_all_reduce)
    assert calls == [torch.float64]
    for n in TASKS:
        _assert_metrics_close(rank0[n].compute(), full[n].compute())

    # without a collective the states are untouched
    before = {n: m.state() for n, m in rank1.items()}
    reduce_meters(rank1, None)
    assert all(torch.equal(before[n], rank1[n].state()) for n in rank1)


# --------------------------------------------------------------------------
# batched per-sample gradients
# --------------------------------------------------------------------------


def test_losses_compose_with_is_grads_batched():
    torch.manual_seed(0)
    b, c, k = 3, 2, 3
    model = torch.nn.Conv2d(2, c + 1 + 3, kernel_size=1).double()
    params = tuple(model.parameters())
    x = torch.randn(b, 2, 2, 2, dtype=torch.float64)
    seg_t = torch.tensor([[[0, 1], [255, 1]], [[1, 1], [0, 0]], [[255, 255], [255, 255]]])
    depth_t = torch.rand(b, 1, 2, 2, dtype=torch.float64) + 0.5
    depth_t[0, 0, 0, 0] = 0
    depth_t[1] = 0  # sample without valid depth
    normal_t = F.normalize(torch.randn(b, 3, 2, 2, dtype=torch.float64), dim=1)
    normal_t[2, :, 1, 1] = 0
    normal_t[0] = 0  # sample without valid normals

    out = model(x)
    preds = {"seg": out[:, :c], "depth": out[:, c : c + 1], "normal": F.normalize(out[:, c + 1 :], dim=1)}
    targets = {"seg": seg_t, "depth": depth_t, "normal": normal_t}
    losses = torch.cat([TASKS[n].per_sample_loss(preds[n], targets[n]) for n in TASKS])  # [3 * B]

    weights = torch.rand(k, losses.numel(), dtype=torch.float64)
    weights[0, :b] = 0  # e.g. a supervision mask switching off one task

    batched = torch.autograd.grad(losses, params, grad_outputs=weights, is_grads_batched=True, retain_graph=True)
    for i in range(k):
        seq = torch.autograd.grad((losses * weights[i]).sum(), params, retain_graph=True)
        for gb, gs in zip(batched, seq):
            assert torch.isfinite(gb[i]).all()
            assert torch.allclose(gb[i], gs, atol=1e-6, rtol=0)

"""Task dictionary for dense prediction (LibMTL style).

Each entry of :data:`TASKS` bundles, for one task, the per-sample loss, the
valid-pixel count, a metric accumulator factory, the primary metric and the
direction ("higher is better") of every reported metric.

Batch tensor conventions (shared by every module of the package):

* predictions
    - ``seg``:    logits, float ``[B, C, H, W]``
    - ``depth``:  float ``[B, 1, H, W]``
    - ``normal``: float ``[B, 3, H, W]``, already L2-normalised by the model
* targets
    - ``seg``:    int64 ``[B, H, W]``; ``255`` (or any label outside
      ``[0, C)``) is ignored
    - ``depth``:  float ``[B, 1, H, W]``; ``0`` marks an invalid pixel (any
      non-positive depth is treated as invalid)
    - ``normal``: float ``[B, 3, H, W]``; an all-zero vector marks an invalid
      pixel

Losses return one value per sample: the mean over that sample's valid pixels,
or 0 for a sample without any valid pixel. Callers weight samples with a
per-sample, per-task supervision mask and normalise by global counts across
data-parallel ranks, so batch means would be wrong here. The losses use no
in-place ops on inputs and no data-dependent Python control flow, so they
compose with ``torch.autograd.grad(..., is_grads_batched=True)``.

Meters keep all sufficient statistics in one flat float64 buffer. Every
statistic is a sum over pixels, so buffers from several ranks combine with a
single SUM ``all_reduce`` (see :func:`reduce_meters`).

Primary metrics follow the seed paper: mIoU for ``seg``, delta < 1.25 for
``depth`` and the percentage of pixels within 30 degrees for ``normal``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "DEPTH_EPS",
    "ANGLE_BIN_DEG",
    "Task",
    "Meter",
    "SegMeter",
    "DepthMeter",
    "NormalMeter",
    "TASKS",
    "reduce_meters",
]

IGNORE_INDEX = 255
# Predicted depth is clamped to this before forming pred/gt ratios for delta1,
# so a zero or negative prediction counts as a (large) miss instead of inf/NaN.
DEPTH_EPS = 1e-6
# Width of the angle histogram bins used for the median normal error.
# 180 / 0.05 = 3600 bins; the reported median is a bin centre, so it is exact
# to within half a bin (0.025 degrees).
ANGLE_BIN_DEG = 0.05
_ANGLE_BINS = int(round(180.0 / ANGLE_BIN_DEG))
_NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)


# --------------------------------------------------------------------------
# valid-pixel masks
# --------------------------------------------------------------------------


def _seg_valid(target: Tensor) -> Tensor:
    """[B, H, W] bool: pixels carrying a class label."""
    return target != IGNORE_INDEX


def _depth_valid(target: Tensor) -> Tensor:
    """[B, 1, H, W] bool: pixels with a measured (positive) depth."""
    return target > 0


def _normal_valid(target: Tensor) -> Tensor:
    """[B, H, W] bool: pixels whose ground-truth normal is not the zero vector."""
    return (target != 0).any(dim=1)


def _count(valid: Tensor) -> Tensor:
    """Per-sample number of valid pixels, [B] int64."""
    return valid.flatten(1).sum(dim=1)


# Module-level functions (not lambdas) keep TASKS picklable for spawned workers.
def seg_valid_pixels(target: Tensor) -> Tensor:
    return _count(_seg_valid(target))


def depth_valid_pixels(target: Tensor) -> Tensor:
    return _count(_depth_valid(target))


def normal_valid_pixels(target: Tensor) -> Tensor:
    return _count(_normal_valid(target))


def _masked_mean(per_pixel: Tensor, valid: Tensor) -> Tensor:
    """Per-sample mean over valid pixels; 0 for samples with none.

    ``torch.where`` (rather than multiplying by the mask) keeps garbage values
    in invalid pixels from leaking NaN/inf into the sum or the gradient.
    """
    summed = torch.where(valid, per_pixel, torch.zeros_like(per_pixel)).flatten(1).sum(dim=1)
    # clamp avoids 0/0 for empty samples without any Python branching
    return summed / _count(valid).clamp_min(1).to(summed.dtype)


# --------------------------------------------------------------------------
# per-sample losses
# --------------------------------------------------------------------------


def seg_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy ignoring ``IGNORE_INDEX``; [B] mean over labelled pixels.

    Written as log_softmax + gather instead of ``F.cross_entropy`` so the
    ignore label never reaches an indexing kernel and every op has a vmap
    batching rule (needed by ``is_grads_batched``).
    """
    valid = _seg_valid(target)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    logp = F.log_softmax(pred, dim=1)
    nll = -logp.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    return _masked_mean(nll, valid)


def depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    """L1 over valid depth pixels; [B]."""
    return _masked_mean((pred - target).abs(), _depth_valid(target))


def normal_loss(pred: Tensor, target: Tensor) -> Tensor:
    """1 - cosine similarity over valid normal pixels; [B].

    Both sides are re-normalised (cheap, and a no-op for unit inputs) so the
    loss is a true cosine distance even if the model output drifts from unit
    length; ``F.normalize`` clamps the norm, so zero vectors stay finite.
    """
    cos = (F.normalize(pred, dim=1) * F.normalize(target, dim=1)).sum(dim=1)
    return _masked_mean(1.0 - cos, _normal_valid(target))


# --------------------------------------------------------------------------
# meters
# --------------------------------------------------------------------------


def _sample_mask(sample_mask: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """[B] bool; all True when no mask is given."""
    if sample_mask is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    return sample_mask.to(device=device, dtype=torch.bool).reshape(batch)


class Meter:
    """Sum-reducible metric accumulator.

    All statistics live in one flat float64 buffer so that distributed callers
    can combine ranks with a single SUM ``all_reduce``. Statistics are computed
    on the prediction's device and added to the buffer on the meter's device
    (``device`` at construction, CPU by default).
    """

    def __init__(self, size: int, device: torch.device | str | None = None) -> None:
        self._state = torch.zeros(size, dtype=torch.float64, device=device)

    def update(self, pred: Tensor, target: Tensor, sample_mask: Tensor | None = None) -> None:
        """Accumulate a batch; samples whose ``sample_mask`` is False are skipped."""
        with torch.no_grad():
            smask = _sample_mask(sample_mask, target.shape[0], target.device)
            stats = self._batch_stats(pred.detach(), target, smask)
        self._state += stats.to(self._state)

    def state(self) -> Tensor:
        """Copy of the flat float64 statistics buffer."""
        return self._state.clone()

    def load_state(self, t: Tensor) -> None:
        """Replace the statistics with ``t`` (e.g. the all-reduced sum)."""
        if t.numel() != self._state.numel():
            raise ValueError(f"state has {t.numel()} elements, expected {self._state.numel()}")
        self._state = t.detach().reshape(-1).to(self._state).clone()

    def reset(self) -> None:
        self._state.zero_()

    def _batch_stats(self, pred: Tensor, target: Tensor, smask: Tensor) -> Tensor:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class SegMeter(Meter):
    """Dataset-level confusion matrix (rows = ground truth, cols = prediction).

    ``miou`` averages IoU over classes with non-zero union (present in the
    target or predicted on a labelled pixel); ``pixel_acc`` is the fraction of
    labelled pixels classified correctly. Both are NaN before any labelled
    pixel has been seen.
    """

    def __init__(self, num_classes: int, device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError("SegMeter needs num_classes >= 1")
        self.num_classes = num_classes
        super().__init__(num_classes * num_classes, device)

    def _batch_stats(self, pred: Tensor, target: Tensor, smask: Tensor) -> Tensor:
        c = self.num_classes
        # accept either logits [B,C,H,W] or already-decoded labels [B,H,W]
        labels = pred.argmax(dim=1) if pred.dim() == 4 else pred.long()
        target = target.long()  # e.g. uint8 targets would overflow target * c
        # labels outside [0, C) (255 included) are ignored
        valid = (target >= 0) & (target < c) & smask.view(-1, 1, 1)
        idx = target[valid] * c + labels[valid]
        return torch.bincount(idx, minlength=c * c).to(torch.float64)

    def confusion(self) -> Tensor:
        return self._state.view(self.num_classes, self.num_classes)

    def compute(self) -> dict[str, float]:
        conf = self.confusion()
        tp = conf.diagonal()
        union = conf.sum(0) + conf.sum(1) - tp
        present = union > 0
        miou = (tp[present] / union[present]).mean().item() if present.any() else math.nan
        total = conf.sum().item()
        acc = tp.sum().item() / total if total > 0 else math.nan
        return {"miou": miou, "pixel_acc": acc}


class DepthMeter(Meter):
    """Depth errors over valid pixels: ``abs_err``, ``rel_err``, ``delta1``.

    State: [n_valid, sum |p-g|, sum |p-g|/g, n(max(p/g, g/p) < 1.25)].
    ``delta1`` is a fraction in [0, 1]; predictions are clamped to
    ``DEPTH_EPS`` for the ratio only.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__(4, device)

    def _batch_stats(self, pred: Tensor, target: Tensor, smask: Tensor) -> Tensor:
        valid = _depth_valid(target) & smask.view(-1, 1, 1, 1)
        # float64 so long accumulations over many pixels stay exact enough
        p, g = pred.double()[valid], target.double()[valid]
        err = (p - g).abs()
        pc = p.clamp_min(DEPTH_EPS)
        ratio = torch.maximum(pc / g, g / pc)
        return torch.stack(
            [
                valid.sum().double(),
                err.sum(),
                (err / g).sum(),
                (ratio < 1.25).sum().double(),
            ]
        )

    def compute(self) -> dict[str, float]:
        n, s_abs, s_rel, n_d1 = self._state.tolist()
        if n == 0:
            return {"abs_err": math.nan, "rel_err": math.nan, "delta1": math.nan}
        return {"abs_err": s_abs / n, "rel_err": s_rel / n, "delta1": n_d1 / n}


class NormalMeter(Meter):
    """Angular error (degrees) between predicted and ground-truth normals.

    State: [n_valid, sum angle, n(<11.25), n(<22.5), n(<30), histogram].
    Mean and the ``within_*`` percentages are exact; the median is read off a
    histogram with ``ANGLE_BIN_DEG`` (0.05 degree) bins over [0, 180] and is
    accurate to half a bin (0.025 degrees). For an even count it averages the
    two middle values, like ``numpy.median``.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__(2 + len(_NORMAL_THRESHOLDS) + _ANGLE_BINS, device)

    def _batch_stats(self, pred: Tensor, target: Tensor, smask: Tensor) -> Tensor:
        valid = _normal_valid(target) & smask.view(-1, 1, 1)
        # float64: in float32 an exact match gives cos = 1 - 6e-8, i.e. ~0.02 deg
        cos = (F.normalize(pred.double(), dim=1) * F.normalize(target.double(), dim=1)).sum(1)
        ang = torch.rad2deg(torch.acos(cos[valid].clamp(-1.0, 1.0)))
        bins = (ang / ANGLE_BIN_DEG).long().clamp(0, _ANGLE_BINS - 1)
        head = [valid.sum().double(), ang.sum()]
        head += [(ang < t).sum().double() for t in _NORMAL_THRESHOLDS]
        hist = torch.bincount(bins, minlength=_ANGLE_BINS).double()
        return torch.cat([torch.stack(head), hist])

    def _median(self, hist: Tensor, n: float) -> float:
        cum = hist.cumsum(0)
        # 1-based ranks of the middle element(s); equal when n is odd
        ranks = torch.tensor([(n + 1) // 2, n // 2 + 1], dtype=cum.dtype, device=cum.device)
        idx = torch.searchsorted(cum, ranks)  # first bin whose cumulative count reaches rank
        return ((idx.double() + 0.5) * ANGLE_BIN_DEG).mean().item()

    def compute(self) -> dict[str, float]:
        k = len(_NORMAL_THRESHOLDS)
        head = self._state[: 2 + k].tolist()
        n, s_ang, within = head[0], head[1], head[2:]
        names = ["mean_angle", "median_angle"] + [f"within_{t:g}" for t in _NORMAL_THRESHOLDS]
        if n == 0:
            return dict.fromkeys(names, math.nan)
        values = [s_ang / n, self._median(self._state[2 + k :], n)]
        values += [100.0 * w / n for w in within]
        return dict(zip(names, values))


# --------------------------------------------------------------------------
# task dictionary
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    name: str
    per_sample_loss: Callable[[Tensor, Tensor], Tensor]
    valid_pixels: Callable[[Tensor], Tensor]
    new_meter: Callable[..., Meter]
    primary: str
    higher_is_better: dict[str, bool]
    # the label of the left-right mirrored image ([B, ...] -> [B, ...], width last)
    hflip: Callable[[Tensor], Tensor] = lambda target: target.flip(-1)


def _hflip_normal(target: Tensor) -> Tensor:
    """Camera-frame normals of the mirrored image: the x axis runs along the image width, so its
    component changes sign (an invalid all-zero pixel stays zero)."""
    out = target.flip(-1)
    return torch.cat([-out[:, :1], out[:, 1:]], 1)


def _new_seg_meter(num_classes: int, device: torch.device | str | None = None) -> Meter:
    return SegMeter(num_classes, device)


def _new_depth_meter(num_classes: int = 0, device: torch.device | str | None = None) -> Meter:
    return DepthMeter(device)


def _new_normal_meter(num_classes: int = 0, device: torch.device | str | None = None) -> Meter:
    return NormalMeter(device)


TASKS: dict[str, Task] = {
    "seg": Task(
        name="seg",
        per_sample_loss=seg_loss,
        valid_pixels=seg_valid_pixels,
        new_meter=_new_seg_meter,
        primary="miou",
        higher_is_better={"miou": True, "pixel_acc": True},
    ),
    "depth": Task(
        name="depth",
        per_sample_loss=depth_loss,
        valid_pixels=depth_valid_pixels,
        new_meter=_new_depth_meter,
        primary="delta1",
        higher_is_better={"abs_err": False, "rel_err": False, "delta1": True},
    ),
    "normal": Task(
        name="normal",
        per_sample_loss=normal_loss,
        valid_pixels=normal_valid_pixels,
        new_meter=_new_normal_meter,
        primary="within_30",
        hflip=_hflip_normal,
        higher_is_better={
            "mean_angle": False,
            "median_angle": False,
            "within_11.25": True,
            "within_22.5": True,
            "within_30": True,
        },
    ),
}


def reduce_meters(
    meters: dict[str, Meter],
    all_reduce: Callable[[Tensor], None] | None,
    device: torch.device | str | None = None,
) -> None:
    """Sum meter states across ranks with ONE in-place collective.

    States are concatenated in sorted key order so every rank lays out the
    buffer identically regardless of dict insertion order. ``device`` is where
    the buffer lives during the collective (e.g. the local CUDA device for
    NCCL); by default the first meter's device.
    """
    keys = sorted(meters)
    if not keys:
        return
    states = [meters[k].state() for k in keys]
    dev = torch.device(device) if device is not None else states[0].device
    flat = torch.cat([s.to(dev) for s in states])
    if all_reduce is not None:
        all_reduce(flat)
    for k, chunk in zip(keys, flat.split([s.numel() for s in states])):
        meters[k].load_state(chunk)

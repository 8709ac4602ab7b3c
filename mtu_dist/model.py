"""`MultiTaskModel`: a shared encoder and one light head per task (docs/design.md §3).

Normalisation is GroupNorm everywhere: per-sample statistics make a sample's output independent of
its batch-mates, so 1-rank and N-rank runs compute identical per-sample losses, and per-sample
gradient engines (vmap, is_grads_batched) need no special handling of running statistics.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mtu_dist.errors import UserError

OUT_CHANNELS = {"depth": 1, "normal": 3}  # seg: num_classes


def _block(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(inplace=True))


class ConvEncoder(nn.Module):
    """Small CPU-friendly encoder: features at 1/4 resolution."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.out_channels = 2 * w
        self.layers = nn.Sequential(
            _block(3, w), _block(w, w, 2), _block(w, 2 * w), _block(2 * w, 2 * w, 2), _block(2 * w, 2 * w)
        )

    def forward(self, x):
        return self.layers(x)


class ResNetEncoder(nn.Module):
    """torchvision ResNet (random init; dilated last stages -> 1/8 resolution) with GroupNorm."""

    def __init__(self, depth: int = 18, checkpoint: str | None = None):
        super().__init__()
        import torchvision

        ctor = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34, 50: torchvision.models.resnet50}
        if depth not in ctor:
            raise UserError(f"model.resnet_depth must be one of {sorted(ctor)} (got {depth})")
        dilate = [False, True, True] if depth == 50 else None  # basic blocks do not support dilation
        net = ctor[depth](
            weights=None,
            norm_layer=lambda c: nn.GroupNorm(32, c),
            **({"replace_stride_with_dilation": dilate} if dilate else {}),
        )
        if checkpoint:
            net.load_state_dict(_load_local_weights(checkpoint), strict=False)
        self.body = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        self.out_channels = 2048 if depth == 50 else 512

    def forward(self, x):
        return self.body(x)


def _load_local_weights(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: backbone checkpoint not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            weights = load_file(p)
        else:
            weights = torch.load(p, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as e:
        raise UserError(f"{p}: cannot load backbone weights ({type(e).__name__}: {e})") from None
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise UserError(f"{p}: backbone weights must be a state dict (parameter name -> tensor)")
    from mtu_dist.runner.checkpoint import refuse_non_finite

    refuse_non_finite(weights, p)
    return weights


class Head(nn.Module):
    def __init__(self, cin: int, cout: int, hidden: int = 32):
        super().__init__()
        self.body = _block(cin, hidden)
        self.out = nn.Conv2d(hidden, cout, 1)

    def forward(self, feats, size):
        return self.out(F.interpolate(self.body(feats), size=size, mode="bilinear", align_corners=False))


class MultiTaskModel(nn.Module):
    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.heads)

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return list(self.heads[task].parameters())

    def forward_heads(self, feats, size) -> dict[str, torch.Tensor]:
        out = {t: h(feats, size) for t, h in self.heads.items()}
        if "normal" in out:
            out["normal"] = F.normalize(out["normal"], dim=1, eps=1e-6)
        return out

    def forward(self, x) -> dict[str, torch.Tensor]:
        x = x.to(next(self.parameters()).dtype)  # data is float32; a float64 model gets float64 inputs
        return self.forward_heads(self.encoder(x), x.shape[-2:])


def build_model(cfg, tasks: tuple[str, ...], num_classes: int) -> MultiTaskModel:
    """`cfg` is the `model` section of the run config."""
    if cfg.arch == "conv":
        enc = ConvEncoder(cfg.width)
    else:
        enc = ResNetEncoder(cfg.resnet_depth, cfg.backbone_checkpoint)
    heads = {t: Head(enc.out_channels, num_classes if t == "seg" else OUT_CHANNELS[t], cfg.head_width) for t in tasks}
    return MultiTaskModel(enc, heads).to(getattr(torch, cfg.dtype))

"""`mtu data convert nyuv2|cityscapes SRC`: the preprocessed NYUv2 / Cityscapes of MTAN and LibMTL
to our shards.

Source layout: `SRC/{train,val}/{image,label,depth[,normal]}/N.npy`, channel-first float arrays:
NYUv2 3x288x384 with 13 classes, Cityscapes 3x128x256 with 7 classes (no normals). Label -1 means
ignore (-> 255); images in [0, 1] (or [0, 255]) -> uint8; depth 0 = invalid; normals are
re-normalised to unit length where non-zero. Every file is checked (shape, NaN/inf) and named in
the error if it is wrong.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from mtu_dist.data.write import DatasetLayout, write_dataset
from mtu_dist.errors import UserError

NYU_CLASSES = [
    "bed",
    "books",
    "ceiling",
    "chair",
    "floor",
    "furniture",
    "objects",
    "painting",
    "sofa",
    "table",
    "tv",
    "wall",
    "window",
]
CITY_CLASSES = ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
SOURCES = {
    "nyuv2": DatasetLayout("nyuv2", ("seg", "depth", "normal"), 13, NYU_CLASSES, (288, 384)),
    "cityscapes": DatasetLayout("cityscapes", ("seg", "depth"), 7, CITY_CLASSES, (128, 256)),
}
MODALITY = {"seg": "label", "depth": "depth", "normal": "normal"}


def _index_files(src: Path, split: str, modalities: list[str]) -> list[int]:
    numbers = None
    for mod in modalities:
        folder = src / split / mod
        if not folder.is_dir():
            raise UserError(f"{folder}: folder missing (expected {src}/{split}/{{{','.join(modalities)}}}/N.npy)")
        found = sorted(int(p.stem) for p in folder.glob("*.npy") if re.fullmatch(r"\d+", p.stem))
        if not found:
            raise UserError(f"{folder}: no N.npy files")
        if numbers is not None and found != numbers:
            raise UserError(
                f"{folder}: file numbers differ from {src / split / modalities[0]} "
                f"({len(found)} vs {len(numbers)} files)"
            )
        numbers = found
    return numbers


def _load(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:
        raise UserError(f"{path}: cannot read .npy ({type(e).__name__}: {e})") from None
    if a.ndim == len(shape) + 1 and a.shape[0] == 1:
        a = a[0]
    if a.shape != shape:
        raise UserError(f"{path}: shape {a.shape}, expected {shape}")
    if not np.isfinite(a).all():
        raise UserError(f"{path}: contains NaN or inf")
    return a


def _convert_sample(src: str, layout: DatasetLayout, numbers: dict[str, list[int]], split: str, index: int) -> dict:
    h, w = layout.resolution
    n = numbers[split][index]
    base = Path(src) / split
    img = _load(base / "image" / f"{n}.npy", (3, h, w)).astype(np.float32)
    scale = 255.0 if img.max() <= 1.5 else 1.0
    out = {
        "image": np.clip(img.transpose(1, 2, 0) * scale + 0.5, 0, 255).astype(np.uint8),
        "source": f"{layout.dataset}/{split}/image/{n}.npy",
    }
    label = _load(base / "label" / f"{n}.npy", (h, w))
    bad = (label != -1) & ((label < 0) | (label >= layout.num_classes))
    if bad.any():
        raise UserError(f"{base / 'label' / f'{n}.npy'}: labels must be -1 or in [0, {layout.num_classes})")
    out["seg"] = np.where(label == -1, 255, label).astype(np.uint8)
    depth = _load(base / "depth" / f"{n}.npy", (h, w)).astype(np.float32)
    if (depth < 0).any():
        raise UserError(f"{base / 'depth' / f'{n}.npy'}: negative depth")
    out["depth"] = depth
    if "normal" in layout.tasks:
        nrm = _load(base / "normal" / f"{n}.npy", (3, h, w)).astype(np.float32)
        length = np.sqrt((nrm**2).sum(0, keepdims=True))
        out["normal"] = np.where(length > 1e-6, nrm / np.maximum(length, 1e-6), 0).astype(np.float32)
    return out


def convert(
    kind: str,
    src: str | Path,
    out_root: str | Path,
    *,
    shard_size: int | None,
    workers: int,
    overwrite: bool,
    progress=print,
):
    if kind not in SOURCES:
        raise UserError(f"unknown source '{kind}' (expected one of {sorted(SOURCES)})")
    src, layout = Path(src), SOURCES[kind]
    if not src.is_dir():
        raise UserError(f"{src}: source folder not found")
    modalities = ["image"] + [MODALITY[t] for t in layout.tasks]
    splits = [s for s in ("train", "val") if (src / s).is_dir()]
    if "train" not in splits:
        raise UserError(f"{src}/train: folder missing")
    numbers = {s: _index_files(src, s, modalities) for s in splits}
    fn = functools.partial(_convert_sample, str(src), layout, numbers)
    return write_dataset(
        out_root,
        layout,
        {s: len(numbers[s]) for s in splits},
        fn,
        shard_size=shard_size,
        workers=workers,
        overwrite=overwrite,
        source={"converted_from": str(src.resolve()), "kind": kind},
        progress=progress,
    )

"""One sample on disk: the members of a shard entry, how they are encoded, decoded and checked.

Members (docs/design.md §2): `image.png` uint8 RGB, `seg.png` uint8 (255 = ignore), `depth.npy`
float32 HxW (0 = invalid), `normal.npy` float16/float32 3xHxW (all-zero = invalid), `meta.json`.
A task the dataset lacks has no member. Members are decoded in memory; nothing is ever extracted.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from mtu_dist.errors import UserError

TASK_MEMBERS = {"seg": "seg.png", "depth": "depth.npy", "normal": "normal.npy"}
SEG_IGNORE = 255


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encode_sample(sample: dict, tasks: tuple[str, ...], meta: dict) -> dict[str, bytes]:
    """Arrays -> member bytes (without the key)."""
    members = {"image.png": encode_png(sample["image"]), "meta.json": json.dumps(meta).encode()}
    if "seg" in tasks:
        members["seg.png"] = encode_png(sample["seg"])
    if "depth" in tasks:
        members["depth.npy"] = encode_npy(sample["depth"].astype(np.float32, copy=False))
    if "normal" in tasks:
        members["normal.npy"] = encode_npy(sample["normal"].astype(np.float16, copy=False))
    return members


def _decode_png(data: bytes, mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        if img.mode != mode:
            raise ValueError(f"PNG mode {img.mode}, expected {mode}")
        return np.array(img)


def _decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_sample(
    members: dict[str, bytes], tasks: tuple[str, ...], resolution: tuple[int, int], num_classes: int, where: str
) -> dict:
    """Member bytes -> checked numpy arrays. Raises UserError naming `where` (file: key) on any problem.

    Checked: every expected member present, shapes, dtypes, value ranges, and no NaN/inf, so that
    corrupt data is refused at load instead of poisoning a gradient step.
    """
    h, w = resolution
    expected = ["image.png", "meta.json"] + [TASK_MEMBERS[t] for t in tasks]
    missing = [m for m in expected if m not in members]
    if missing:
        raise UserError(f"{where}: missing member(s) {', '.join(missing)}")
    try:
        out = {"image": _decode_png(members["image.png"], "RGB"), "meta": json.loads(members["meta.json"])}
        if "seg" in tasks:
            out["seg"] = _decode_png(members["seg.png"], "L")
        if "depth" in tasks:
            out["depth"] = _decode_npy(members["depth.npy"])
        if "normal" in tasks:
            out["normal"] = _decode_npy(members["normal.npy"])
    except Exception as e:  # any decoder failure is a data problem, reported by location
        raise UserError(f"{where}: cannot decode member ({type(e).__name__}: {e})") from None
    _check(out, tasks, (h, w), num_classes, where)
    return out


def _check(s: dict, tasks, hw, num_classes: int, where: str) -> None:
    def fail(member, msg):
        raise UserError(f"{where}: {member}: {msg}")

    if s["image"].shape != (*hw, 3):
        fail("image.png", f"shape {s['image'].shape}, expected {(*hw, 3)}")
    if "seg" in tasks:
        seg = s["seg"]
        if seg.shape != hw:
            fail("seg.png", f"shape {seg.shape}, expected {hw}")
        bad = (seg >= num_classes) & (seg != SEG_IGNORE)
        if bad.any():
            fail("seg.png", f"label {int(seg[bad].max())} out of range [0, {num_classes}) and not {SEG_IGNORE}")
    if "depth" in tasks:
        d = s["depth"]
        if d.dtype != np.float32:
            fail("depth.npy", f"dtype {d.dtype}, expected float32")
        if d.shape != hw:
            fail("depth.npy", f"shape {d.shape}, expected {hw}")
        if not np.isfinite(d).all():
            fail("depth.npy", "contains NaN or inf")
        if (d < 0).any():
            fail("depth.npy", "negative depth (expected >= 0, 0 = invalid)")
    if "normal" in tasks:
        n = s["normal"]
        if n.dtype not in (np.float16, np.float32):
            fail("normal.npy", f"dtype {n.dtype}, expected float16 or float32")
        if n.shape != (3, *hw):
            fail("normal.npy", f"shape {n.shape}, expected {(3, *hw)}")
        n = n.astype(np.float32)
        if not np.isfinite(n).all():
            fail("normal.npy", "contains NaN or inf")
        norm = np.sqrt((n * n).sum(0))
        if (np.abs(norm[norm > 0] - 1) > 0.02).any():
            fail("normal.npy", "vectors must be unit length (or all-zero = invalid)")

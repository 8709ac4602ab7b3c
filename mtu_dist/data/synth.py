"""Procedural, ray-cast synthetic multi-task scenes (pure numpy).

Two benchmarks are generated on the fly, one sample per ``(seed, split, index)``:

``synth-indoor`` (NYUv2-like, tasks seg / depth / normal, 13 NYUv2-13 classes)
    A room box (floor, ceiling and four walls as planes) seen from inside, with
    windows and paintings as coplanar rectangles on the walls, a TV as a thin
    box on a wall, furniture built from boxes rotated about the vertical axis
    (bed, sofa, table, chairs, cabinets), rows/stacks of books (thin boxes) and
    "objects" (spheres and vertical cylinders: balls, vases, bins, lamps).
    Every camera ray hits the room, so depth and normals are valid everywhere.

``synth-street`` (Cityscapes-like, tasks seg / depth, 7 category classes)
    A road plane with sidewalks (``flat``), building blocks (``construction``),
    cars as boxes (``vehicle``), poles and signs (``object``), trees as a
    sphere on a cylinder (``nature``), pedestrians as a cylinder with a sphere
    head (``human``) and ``sky`` wherever no primitive is hit.

Rendering: every pixel's ray is intersected analytically with every primitive
whose screen-space bounding rectangle contains the pixel (vectorised over the
pixels, Python loop only over the tens of primitives); the nearest hit wins.
Depth and normals are analytic.  Surfaces get a per-instance procedural texture
(flat / checkerboard / stripes / value noise / window grid) and Lambertian
shading from a random directional light plus ambient, then small Gaussian pixel
noise is added.

Conventions
-----------
* Camera: pinhole, square pixels, horizontal field of view ``HFOV_DEG`` (60 deg).
  Pixel ``(u, v)`` (column, row; integer indices refer to pixel centres) looks
  along the camera-frame direction ``((u - cx) / fx, (v - cy) / fy, 1)`` with
  ``cx = (W - 1) / 2`` and ``cy = (H - 1) / 2``.  Back-projection of a depth
  ``z`` is therefore ``X = (u - cx) * z / fx``, ``Y = (v - cy) * z / fy``, ``Z = z``.
* Camera frame: x right, y down (image rows), z forward (optical axis).
* ``depth``: float32 metres, z-coordinate of the hit point in the camera frame
  (not the Euclidean ray length).  ``0`` marks invalid pixels: no hit (sky) or
  beyond ``SynthSpec.max_depth``.
* ``normal`` (indoor only): float32 ``[3, H, W]`` unit normals in the camera
  frame, oriented toward the camera (``n . ray < 0``); all-zero where invalid.
* ``seg``: uint8 class index, ``IGNORE_INDEX`` (255) on a small random subset of
  pixels and on a thin band on the far side of some depth discontinuities
  between different instances (a few percent of pixels at most).
* ``image``: uint8 RGB ``[H, W, 3]``.
* ``intrinsics``: ``(fx, fy, cx, cy)`` in pixels for the requested resolution.

Determinism
-----------
All randomness comes from ``np.random.default_rng([seed, SPLIT_ID[split], index])``.
The scene (layout, camera, colours, light) is drawn first and the per-pixel
noise last, so the same ``(seed, split, index)`` gives byte-identical outputs
independently of process, call order or other samples, and the same triple at
another resolution shows the same scene.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "HFOV_DEG",
    "IGNORE_INDEX",
    "SPECS",
    "SPLIT_ID",
    "SynthSpec",
    "render_sample",
]

IGNORE_INDEX = 255
HFOV_DEG = 60.0
SPLIT_ID: dict[str, int] = {"train": 0, "val": 1, "test": 2}

_EPS = 1e-6
_INF = np.inf


@dataclass(frozen=True)
class SynthSpec:
    """Static description of one synthetic benchmark."""

    name: str
    tasks: tuple[str, ...]
    class_names: tuple[str, ...]
    max_depth: float = field(default=10.0)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


INDOOR_CLASSES = (
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
)
STREET_CLASSES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")

SPECS: dict[str, SynthSpec] = {
    "synth-indoor": SynthSpec("synth-indoor", ("seg", "depth", "normal"), INDOOR_CLASSES, 12.0),
    "synth-street": SynthSpec("synth-street", ("seg", "depth"), STREET_CLASSES, 80.0),
}

_IC = {n: i for i, n in enumerate(INDOOR_CLASSES)}
_SC = {n: i for i, n in enumerate(STREET_CLASSES)}

# texture kinds
_T_FLAT, _T_CHECK, _T_STRIPE, _T_NOISE, _T_GRID, _T_ROAD = range(6)
# surface kinds (for deferred normals)
_S_PLANE, _S_SPHERE, _S_CYL = range(3)


# ----------------------------------------------------------------------------
# scene description
# ----------------------------------------------------------------------------
class _Scene:
    """Primitive lists plus per-instance appearance, filled by the builders."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.inst: list[tuple] = []
        self.boxes: list[tuple] = []  # cx, cy, cz, hx, hy, hz, yaw, inst
        self.spheres: list[tuple] = []  # cx, cy, cz, r, inst
        self.cyls: list[tuple] = []  # cx, cz, y0, y1, r, inst
        self.decals: list[tuple] = []  # room face, h0, h1, y0, y1, inst
        self.room: tuple | None = None  # (x1, y1, z1), inst_wall, inst_floor, inst_ceiling
        self.ground: int | None = None  # inst of the y=0 plane
        self.camera: tuple | None = None  # position (3,), yaw, pitch, roll
        self.light: np.ndarray | None = None  # unit vector toward the light
        self.ambient = 0.4
        self.diffuse = 0.6
        self.sky: tuple | None = None  # horizon rgb, zenith rgb
        self.fog = _INF

    def add_inst(
        self, cls, c1, c2=None, tex=_T_FLAT, scale=1.0, origin=(0.0, 0.0, 0.0), yaw=0.0, duty=0.5, emissive=False
    ) -> int:
        # colours are clipped to [0, 1] once, when the instance tables are built
        pa, pb, po, ps = self.rng.random(4).tolist()
        c2 = np.asarray(c1) * 0.6 if c2 is None else c2
        self.inst.append(
            (
                cls,
                c1,
                c2,
                tex,
                float(scale),
                pa,
                pb,
                float(duty),
                int(po < 0.5),
                tuple(float(o) for o in origin),
                float(yaw),
                bool(emissive),
                int(ps * 65536),
            )
        )
        return len(self.inst) - 1

    def add_box(self, center, half, yaw, inst):
        self.boxes.append((*map(float, center), *map(float, half), float(yaw), inst))

    def add_part(self, base, yaw, local, half, inst):
        """Box given in an object frame: ``base`` on the floor, rotated by ``yaw``."""
        c, s = math.cos(yaw), math.sin(yaw)
        lx, ly, lz = local
        self.add_box((base[0] + c * lx + s * lz, base[1] + ly, base[2] - s * lx + c * lz), half, yaw, inst)

    def add_sphere(self, center, r, inst):
        self.spheres.append((*map(float, center), float(r), inst))

    def add_cyl(self, cx, cz, y0, y1, r, inst):
        self.cyls.append((float(cx), float(cz), float(y0), float(y1), float(r), inst))


def _hsv(h, s, v):
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _rand_color(rng, s=(0.35, 0.9), v=(0.35, 0.95)):
    return _hsv(rng.random(), rng.uniform(*s), rng.uniform(*v))


def _jitter(rng, base, amt=0.15):
    return np.asarray(base) * rng.uniform(1 - amt, 1 + amt, 3)


def _gray(rng, lo, hi, tint=0.05):
    return rng.uniform(lo, hi) + rng.uniform(-tint, tint, 3)


def _wood(rng):
    return _jitter(rng, np.array([0.55, 0.37, 0.2]) * rng.uniform(0.6, 1.4), 0.12)


# ----------------------------------------------------------------------------
# indoor scenes
# ----------------------------------------------------------------------------
class _Floorplan:
    """Occupied footprints (circles on the floor), starting with a keep-out disc
    around the camera so that no primitive ever contains it."""

    def __init__(self, cam_xz):
        self.occ = [(cam_xz[0], cam_xz[1], 0.45)]

    def free(self, x, z, r, pad=0.02):
        return all(math.hypot(x - ox, z - oz) >= r + orr + pad for ox, oz, orr in self.occ)

    def take(self, x, z, r):
        self.occ.append((x, z, r))


def _wall_pose(rng, room_x, room_z, hx, hz, walls=(0, 1, 5), gap=0.02):
    """Place an object (half extents hx along its front, hz in depth) with its back
    against one of ``walls`` (room face ids), facing into the room."""
    w = walls[int(rng.integers(len(walls)))]
    if w in (0, 1):  # x = 0 or x = room_x; run along z
        if room_z < 2 * hx + 0.2:
            return None
        along = rng.uniform(hx + 0.05, room_z - hx - 0.05)
        if w == 0:
            return (hz + gap, along, math.pi / 2)
        return (room_x - hz - gap, along, -math.pi / 2)
    if room_x < 2 * hx + 0.2:
        return None
    along = rng.uniform(hx + 0.05, room_x - hx - 0.05)
    if w == 5:
        return (along, room_z - hz - gap, math.pi)
    return (along, hz + gap, 0.0)


def _build_indoor(rng: np.random.Generator) -> _Scene:
    sc = _Scene(rng)
    C = _IC
    rx, rz, ry = rng.uniform(3.2, 6.5), rng.uniform(3.5, 7.5), rng.uniform(2.4, 3.2)
    cam = np.array([rng.uniform(0.3, 0.7) * rx, rng.uniform(1.1, 1.8), rng.uniform(0.25, 1.0)])
    sc.camera = (cam, rng.uniform(-0.6, 0.6), math.radians(rng.uniform(-25, 0)), math.radians(rng.uniform(-3, 3)))
    el, az = math.radians(rng.uniform(35, 80)), rng.uniform(0, 2 * math.pi)
    sc.light = np.array([math.cos(el) * math.cos(az), math.sin(el), math.cos(el) * math.sin(az)])
    sc.ambient, sc.diffuse = rng.uniform(0.35, 0.55), rng.uniform(0.45, 0.75)

    # room surfaces
    wall_c = _gray(rng, 0.55, 0.92, 0.08)
    wall = sc.add_inst(
        C["wall"],
        wall_c,
        wall_c * rng.uniform(0.85, 0.95),
        tex=[_T_FLAT, _T_STRIPE, _T_NOISE][int(rng.integers(3))],
        scale=rng.uniform(0.3, 1.5),
        duty=0.5,
    )
    fl_c = _wood(rng) if rng.random() < 0.6 else _gray(rng, 0.3, 0.8)
    floor = sc.add_inst(
        C["floor"],
        fl_c,
        fl_c * rng.uniform(0.6, 0.85),
        tex=[_T_STRIPE, _T_CHECK, _T_NOISE][int(rng.integers(3))],
        scale=rng.uniform(0.15, 0.6),
        duty=0.85,
    )
    ceil = sc.add_inst(C["ceiling"], _gray(rng, 0.75, 0.97, 0.03), tex=_T_FLAT)
    sc.room = ((rx, ry, rz), wall, floor, ceil)

    plan = _Floorplan((cam[0], cam[2]))
    hosts: list[tuple] = []  # (x, z, top_y, hx, hz, yaw) surfaces for books/objects

    def place_wall(hx, hz, walls=(0, 1, 5)):
        for _ in range(12):
            pose = _wall_pose(rng, rx, rz, hx, hz, walls)
            if pose is not None and plan.free(pose[0], pose[1], math.hypot(hx, hz)):
                plan.take(pose[0], pose[1], math.hypot(hx, hz))
                return pose
        return None

    def place_free(hx, hz, margin=0.15):
        r = math.hypot(hx, hz)
        for _ in range(12):
            x, z = rng.uniform(r + margin, rx - r - margin), rng.uniform(r + margin, rz - r - margin)
            if r + margin < rx - r - margin and r + margin < rz - r - margin and plan.free(x, z, r):
                plan.take(x, z, r)
                return (x, z, rng.uniform(0, 2 * math.pi))
        return None

    # bed
    if rng.random() < 0.45:
        hx, hz, hb = rng.uniform(0.45, 0.9), rng.uniform(0.95, 1.05), rng.uniform(0.4, 0.6)
        pose = place_wall(hx, hz)
        if pose:
            x, z, a = pose
            base = (x, 0.0, z)
            cover = sc.add_inst(
                C["bed"],
                _rand_color(rng, (0.1, 0.6), (0.6, 0.95)),
                None,
                tex=[_T_FLAT, _T_STRIPE, _T_CHECK][int(rng.integers(3))],
                scale=rng.uniform(0.1, 0.4),
                origin=base,
                yaw=a,
            )
            head = sc.add_inst(C["bed"], _wood(rng), tex=_T_FLAT, origin=base, yaw=a)
            sc.add_part(base, a, (0, hb / 2, 0), (hx, hb / 2, hz), cover)
            hh = rng.uniform(0.45, 0.6)
            sc.add_part(base, a, (0, hh, -hz + 0.04), (hx + 0.03, hh, 0.04), head)
            sc.add_part(base, a, (0, hb + 0.06, -hz + 0.3), (hx * 0.75, 0.06, 0.16), cover)

    # sofa
    if rng.random() < 0.45:
        hx, hz = rng.uniform(0.8, 1.2), rng.uniform(0.4, 0.5)
        pose = place_wall(hx, hz)
        if pose:
            x, z, a = pose
            base = (x, 0.0, z)
            si = sc.add_inst(
                C["sofa"],
                _rand_color(rng, (0.2, 0.7), (0.3, 0.8)),
                None,
                tex=[_T_FLAT, _T_NOISE][int(rng.integers(2))],
                scale=0.15,
                origin=base,
                yaw=a,
            )
            sc.add_part(base, a, (0, 0.21, 0.05), (hx - 0.15, 0.21, hz - 0.05), si)
            sc.add_part(base, a, (0, 0.42, -hz + 0.1), (hx, 0.42, 0.1), si)
            for sx in (-1, 1):
                sc.add_part(base, a, (sx * (hx - 0.08), 0.3, 0), (0.08, 0.3, hz), si)

    # cabinets / shelves / wardrobes
    for _ in range(int(rng.integers(1, 3))):
        hx, hz, h = rng.uniform(0.3, 0.9), rng.uniform(0.18, 0.3), rng.uniform(0.5, 2.1)
        pose = place_wall(hx, hz)
        if pose:
            x, z, a = pose
            col = _wood(rng) if rng.random() < 0.6 else _gray(rng, 0.1, 0.95, 0.02)
            fi = sc.add_inst(
                C["furniture"],
                col,
                None,
                tex=[_T_FLAT, _T_GRID, _T_STRIPE][int(rng.integers(3))],
                scale=rng.uniform(0.25, 0.6),
                duty=0.9,
                origin=(x, 0, z),
                yaw=a,
            )
            sc.add_part((x, 0.0, z), a, (0, h / 2, 0), (hx, h / 2, hz), fi)
            if h < 1.4:
                hosts.append((x, z, h, hx, hz, a))

    # table with chairs
    table = None
    if rng.random() < 0.75:
        hx, hz, h = rng.uniform(0.4, 0.8), rng.uniform(0.35, 0.5), rng.uniform(0.7, 0.78)
        pose = place_free(hx, hz, margin=0.2)
        if pose:
            x, z, a = pose
            base = (x, 0.0, z)
            top_c = _wood(rng) if rng.random() < 0.7 else _gray(rng, 0.1, 0.95, 0.02)
            ti = sc.add_inst(
                C["table"],
                top_c,
                None,
                tex=[_T_FLAT, _T_STRIPE][int(rng.integers(2))],
                scale=0.1,
                duty=0.8,
                origin=base,
                yaw=a,
            )
            sc.add_part(base, a, (0, h - 0.02, 0), (hx, 0.02, hz), ti)
            for sx in (-1, 1):
                for sz in (-1, 1):
                    sc.add_part(
                        base,
                        a,
                        (sx * (hx - 0.05), (h - 0.04) / 2, sz * (hz - 0.05)),
                        (0.025, (h - 0.04) / 2, 0.025),
                        ti,
                    )
            hosts.append((x, z, h, hx, hz, a))
            table = (x, z, hx, hz, a)

    chair_c = _wood(rng) if rng.random() < 0.5 else _rand_color(rng)
    for _ in range(int(rng.integers(0, 4))):
        pose = None
        if table is not None:
            tx, tz, thx, thz, ta = table
            for _ in range(6):
                ang = rng.uniform(0, 2 * math.pi)
                d = max(thx, thz) + rng.uniform(0.3, 0.5)
                x, z = tx + d * math.cos(ang), tz + d * math.sin(ang)
                if 0.3 < x < rx - 0.3 and 0.3 < z < rz - 0.3 and plan.free(x, z, 0.32, pad=-0.1):
                    plan.take(x, z, 0.32)
                    # face the table: local +z toward (tx, tz)
                    pose = (x, z, math.atan2(tx - x, tz - z) + rng.uniform(-0.3, 0.3))
                    break
        if pose is None:
            pose = place_free(0.23, 0.23)
        if pose is None:
            continue
        x, z, a = pose
        base = (x, 0.0, z)
        ci = sc.add_inst(C["chair"], _jitter(rng, chair_c, 0.05), tex=_T_FLAT, origin=base, yaw=a)
        sh = rng.uniform(0.42, 0.48)
        sc.add_part(base, a, (0, sh - 0.025, 0), (0.23, 0.025, 0.23), ci)
        sc.add_part(base, a, (0, sh + 0.22, -0.21), (0.23, 0.22, 0.02), ci)
        for sx in (-1, 1):
            for sz in (-1, 1):
                sc.add_part(base, a, (sx * 0.2, (sh - 0.05) / 2, sz * 0.2), (0.02, (sh - 0.05) / 2, 0.02), ci)

    # TV on a wall
    if rng.random() < 0.6:
        hw = rng.uniform(0.4, 0.65)
        pose = _wall_pose(rng, rx, rz, hw, 0.03, walls=(0, 1, 5, 5), gap=0.01)
        if pose:
            x, z, a = pose
            yc = rng.uniform(1.0, 1.5)
            tvi = sc.add_inst(
                C["tv"],
                _gray(rng, 0.03, 0.12, 0.02),
                _gray(rng, 0.1, 0.2, 0.05),
                tex=_T_NOISE,
                scale=0.3,
                origin=(x, 0, z),
                yaw=a,
            )
            sc.add_part((x, 0.0, z), a, (0, yc, 0), (hw, hw * 0.58, 0.03), tvi)

    # books: rows on hosts, or a stack on the floor
    for _ in range(int(rng.integers(1, 3))):
        if hosts and rng.random() < 0.8:
            x, z, top, hx, hz, a = hosts[int(rng.integers(len(hosts)))]
            n = int(rng.integers(3, 8))
            thick = rng.uniform(0.02, 0.05, n)
            total = float(thick.sum())
            if total > 2 * hx - 0.05:
                continue
            lx = rng.uniform(-hx + 0.02, hx - 0.02 - total)
            lz = rng.uniform(-hz + 0.1, hz - 0.1) if hz > 0.12 else 0.0
            for k in range(n):
                bh, bd = rng.uniform(0.09, 0.14), rng.uniform(0.06, 0.09)
                bi = sc.add_inst(C["books"], _rand_color(rng), tex=_T_FLAT)
                sc.add_part((x, 0.0, z), a, (lx + thick[k] / 2, top + bh, lz), (thick[k] / 2 - 0.002, bh, bd), bi)
                lx += thick[k]
        else:
            pose = place_free(0.2, 0.15)
            if pose is None:
                continue
            x, z, a = pose
            y = 0.0
            for _k in range(int(rng.integers(2, 6))):
                th = rng.uniform(0.015, 0.04)
                bi = sc.add_inst(C["books"], _rand_color(rng), tex=_T_FLAT)
                sc.add_part(
                    (x, 0.0, z),
                    a + rng.uniform(-0.2, 0.2),
                    (0, y + th, 0),
                    (rng.uniform(0.1, 0.15), th, rng.uniform(0.07, 0.11)),
                    bi,
                )
                y += 2 * th

    # objects: spheres and vertical cylinders on hosts or the floor
    for _ in range(int(rng.integers(2, 6))):
        kind = rng.random()
        col = _rand_color(rng)
        oi = sc.add_inst(
            C["objects"],
            col,
            col * 0.5,
            tex=[_T_FLAT, _T_STRIPE, _T_NOISE][int(rng.integers(3))],
            scale=rng.uniform(0.03, 0.1),
        )
        if hosts and rng.random() < 0.6:
            x, z, top, hx, hz, a = hosts[int(rng.integers(len(hosts)))]
            lx, lz = rng.uniform(-hx + 0.08, hx - 0.08), rng.uniform(-hz + 0.06, hz - 0.06) if hz > 0.07 else 0.0
            ca, sa = math.cos(a), math.sin(a)
            px, pz = x + ca * lx + sa * lz, z - sa * lx + ca * lz
            if kind < 0.4:
                r = rng.uniform(0.04, min(0.12, hz))
                sc.add_sphere((px, top + r, pz), r, oi)
            else:
                r = rng.uniform(0.03, min(0.09, hz))
                sc.add_cyl(px, pz, top, top + rng.uniform(0.1, 0.35), r, oi)
            _set_origin(sc, oi, (px, top, pz))
        else:
            if kind < 0.4:
                r = rng.uniform(0.1, 0.3)
                pose = place_free(r, r, margin=0.02)
                if pose:
                    sc.add_sphere((pose[0], r, pose[1]), r, oi)
                    _set_origin(sc, oi, (pose[0], 0, pose[1]))
            elif kind < 0.75:
                r = rng.uniform(0.1, 0.22)
                pose = place_free(r, r, margin=0.02)
                if pose:
                    sc.add_cyl(pose[0], pose[1], 0.0, rng.uniform(0.25, 0.6), r, oi)
                    _set_origin(sc, oi, (pose[0], 0, pose[1]))
            else:  # floor lamp: pole + shade
                pose = place_free(0.2, 0.2, margin=0.02)
                if pose:
                    h = rng.uniform(1.2, 1.7)
                    sc.add_cyl(pose[0], pose[1], 0.0, h, 0.02, oi)
                    sc.add_cyl(pose[0], pose[1], h, h + 0.25, rng.uniform(0.12, 0.2), oi)
                    _set_origin(sc, oi, (pose[0], 0, pose[1]))

    # decals on the walls: windows and paintings
    def add_decal(cls_inst, w, hh, ylo, yhi):
        face = (0, 1, 5, 5, 4)[int(rng.integers(5))]
        span = rz if face in (0, 1) else rx
        if span < 2 * w + 0.2:
            return
        c = rng.uniform(w + 0.05, span - w - 0.05)
        yc = rng.uniform(ylo, yhi)
        if yc + hh > ry - 0.05 or yc - hh < 0.05:
            return
        sc.decals.append((face, c - w, c + w, yc - hh, yc + hh, cls_inst))

    for _ in range(int(rng.integers(0, 3))):
        sky = _jitter(rng, np.array([0.72, 0.84, 0.97]), 0.08)
        wi = sc.add_inst(
            C["window"],
            _gray(rng, 0.8, 0.98, 0.02),
            sky,
            tex=_T_GRID,
            scale=rng.uniform(0.35, 0.7),
            duty=0.92,
            emissive=True,
        )
        add_decal(wi, rng.uniform(0.4, 0.9), rng.uniform(0.45, 0.75), 1.2, 1.7)
    for _ in range(int(rng.integers(0, 4))):
        pi = sc.add_inst(
            C["painting"],
            _rand_color(rng, (0.5, 1.0), (0.4, 1.0)),
            _rand_color(rng, (0.5, 1.0), (0.3, 1.0)),
            tex=[_T_NOISE, _T_STRIPE, _T_CHECK][int(rng.integers(3))],
            scale=rng.uniform(0.05, 0.2),
        )
        add_decal(pi, rng.uniform(0.15, 0.5), rng.uniform(0.15, 0.4), 1.3, 1.8)
    return sc


def _set_origin(sc: _Scene, inst: int, origin):
    rec = list(sc.inst[inst])
    rec[9] = tuple(float(o) for o in origin)
    sc.inst[inst] = tuple(rec)


# ----------------------------------------------------------------------------
# street scenes
# ----------------------------------------------------------------------------
def _build_street(rng: np.random.Generator) -> _Scene:
    sc = _Scene(rng)
    C = _SC
    wr, ws = rng.uniform(3.5, 7.0), rng.uniform(1.8, 4.0)
    curb = 0.15
    cam = np.array([rng.uniform(-0.6, 0.6) * wr, rng.uniform(1.2, 1.9), 0.0])
    sc.camera = (cam, rng.uniform(-0.15, 0.15), math.radians(rng.uniform(-7, 2)), math.radians(rng.uniform(-2, 2)))
    el, az = math.radians(rng.uniform(20, 70)), rng.uniform(0, 2 * math.pi)
    sc.light = np.array([math.cos(el) * math.cos(az), math.sin(el), math.cos(el) * math.sin(az)])
    sc.ambient, sc.diffuse = rng.uniform(0.3, 0.5), rng.uniform(0.55, 0.85)
    horizon = _jitter(rng, np.array([0.78, 0.85, 0.92]), 0.08)
    zenith = _jitter(rng, np.array([0.35, 0.55, 0.85]), 0.15)
    sc.sky = (np.clip(horizon, 0.0, 1.0), np.clip(zenith, 0.0, 1.0))
    sc.fog = rng.uniform(150, 600)

    road = sc.add_inst(
        C["flat"],
        _gray(rng, 0.22, 0.42, 0.02),
        _gray(rng, 0.85, 0.97, 0.02),
        tex=_T_ROAD,
        scale=rng.uniform(0.5, 2.0),
        origin=(rng.uniform(-0.3, 0.3), 0, 0),
    )
    sc.ground = road
    walk_c = _gray(rng, 0.45, 0.7, 0.04)
    for side in (-1, 1):
        wi = sc.add_inst(C["flat"], walk_c, walk_c * 0.85, tex=_T_CHECK, scale=rng.uniform(0.3, 0.8))
        sc.add_box((side * (wr + ws / 2), curb / 2, 90.0), (ws / 2, curb / 2, 110.0), 0.0, wi)

    # buildings
    for side in (-1, 1):
        z = rng.uniform(-15, 0)
        while z < 140:
            length = rng.uniform(8, 25)
            if rng.random() < 0.15:
                if rng.random() < 0.5:  # hedge in the gap
                    hi = sc.add_inst(
                        C["nature"], _jitter(rng, np.array([0.2, 0.45, 0.15]), 0.2), None, tex=_T_NOISE, scale=0.3
                    )
                    x0 = wr + ws + 0.3
                    sc.add_box((side * (x0 + 0.6), 0.6, z + length / 2), (0.6, 0.6, length / 2 - 0.5), 0.0, hi)
                z += length + rng.uniform(0, 3)
                continue
            h, d, setback = rng.uniform(5, 30), rng.uniform(8, 16), rng.uniform(0, 3)
            x0 = wr + ws + setback
            col = _jitter(
                rng,
                [
                    np.array([0.75, 0.7, 0.62]),
                    np.array([0.6, 0.32, 0.25]),
                    np.array([0.6, 0.6, 0.62]),
                    np.array([0.85, 0.82, 0.75]),
                ][int(rng.integers(4))],
                0.15,
            )
            cx = side * (x0 + d / 2)
            bi = sc.add_inst(
                C["construction"],
                col,
                _jitter(rng, np.array([0.2, 0.25, 0.32]), 0.3),
                tex=_T_GRID,
                scale=rng.uniform(1.5, 3.5),
                duty=rng.uniform(0.35, 0.6),
                origin=(cx, 0.0, z),
            )
            sc.add_box((cx, h / 2, z + length / 2), (d / 2, h / 2, length / 2), 0.0, bi)
            z += length + rng.uniform(0, 1.5)
    if rng.random() < 0.3:  # street closed off by a far building
        zf = rng.uniform(60, 150)
        bi = sc.add_inst(
            C["construction"],
            _jitter(rng, np.array([0.7, 0.66, 0.6]), 0.2),
            _jitter(rng, np.array([0.2, 0.25, 0.32]), 0.3),
            tex=_T_GRID,
            scale=3.0,
            duty=0.5,
        )
        sc.add_box((0.0, 12.0, zf + 6), (wr + ws + 20, 12.0, 6.0), 0.0, bi)

    # cars
    slots: list[tuple[float, float]] = []
    for _ in range(int(rng.integers(2, 9))):
        lane = rng.random()
        if lane < 0.6:
            x = (1 if rng.random() < 0.5 else -1) * wr / 2 + rng.uniform(-0.3, 0.3)
        else:
            x = (1 if rng.random() < 0.5 else -1) * (wr - 1.1)
        zc = rng.uniform(5, 70)
        big = rng.random() < 0.2
        hl = rng.uniform(2.9, 3.8) if big else rng.uniform(1.9, 2.4)
        if abs(x - cam[0]) < 1.5 and zc - hl < 3.0:
            continue
        if any(abs(x - sx) < 2.0 and abs(zc - sz) < hl + 2.6 for sx, sz in slots):
            continue
        slots.append((x, zc))
        a = rng.uniform(-0.08, 0.08)
        base = (x, 0.0, zc)
        body = sc.add_inst(C["vehicle"], _rand_color(rng, (0.0, 0.8), (0.2, 0.9)), tex=_T_FLAT, origin=base, yaw=a)
        hw = rng.uniform(0.85, 1.0)
        if big:
            hh = rng.uniform(1.0, 1.4)
            sc.add_part(base, a, (0, 0.25 + hh, 0), (hw + 0.15, hh, hl), body)
        else:
            sc.add_part(base, a, (0, 0.55, 0), (hw, 0.35, hl), body)
            glass = sc.add_inst(C["vehicle"], _gray(rng, 0.08, 0.22, 0.04), tex=_T_FLAT)
            sc.add_part(base, a, (0, 1.15, -0.2), (hw - 0.1, 0.25, hl * 0.5), glass)

    # poles (with signs) and trees along the curbs
    pole_c = _gray(rng, 0.3, 0.6, 0.02)
    for side in (-1, 1):
        z = rng.uniform(2, 15)
        while z < 80:
            x = side * (wr + 0.4)
            pi_ = sc.add_inst(C["object"], _jitter(rng, pole_c, 0.1), tex=_T_FLAT)
            h = rng.uniform(3.5, 7.0)
            sc.add_cyl(x, z, curb, curb + h, rng.uniform(0.05, 0.1), pi_)
            if rng.random() < 0.6:
                si = sc.add_inst(
                    C["object"],
                    [
                        np.array([0.8, 0.1, 0.1]),
                        np.array([0.1, 0.25, 0.75]),
                        np.array([0.9, 0.8, 0.1]),
                        np.array([0.9, 0.9, 0.9]),
                    ][int(rng.integers(4))],
                    tex=_T_FLAT,
                )
                sc.add_box((x, curb + h - rng.uniform(0.5, 1.5), z - 0.12), (0.3, 0.3, 0.02), 0.0, si)
            z += rng.uniform(12, 30)
        if rng.random() < 0.75:
            z = rng.uniform(3, 15)
            while z < 90:
                x = side * (wr + ws * rng.uniform(0.45, 0.7))
                trunk = sc.add_inst(
                    C["nature"],
                    _jitter(rng, np.array([0.35, 0.25, 0.15]), 0.2),
                    tex=_T_NOISE,
                    scale=0.1,
                    origin=(x, 0, z),
                )
                crown = sc.add_inst(
                    C["nature"],
                    _jitter(rng, np.array([0.22, 0.45, 0.15]), 0.25),
                    _jitter(rng, np.array([0.12, 0.3, 0.08]), 0.25),
                    tex=_T_NOISE,
                    scale=rng.uniform(0.2, 0.5),
                    origin=(x, 0, z),
                )
                ht, rc = rng.uniform(2.0, 3.5), rng.uniform(1.2, 2.3)
                sc.add_cyl(x, z, curb, curb + ht, rng.uniform(0.12, 0.25), trunk)
                sc.add_sphere((x, curb + ht + 0.5 * rc, z), rc, crown)
                z += rng.uniform(8, 25)

    # pedestrians
    for _ in range(int(rng.integers(1, 7))):
        if rng.random() < 0.15:
            x, z, y0 = rng.uniform(-wr + 0.5, wr - 0.5), rng.uniform(6, 30), 0.0
            if abs(x - cam[0]) < 1.0 and z < 8:
                continue
        else:
            side = 1 if rng.random() < 0.5 else -1
            x, z, y0 = side * (wr + rng.uniform(0.3, ws - 0.3)), rng.uniform(3, 45), curb
        h, r = rng.uniform(1.3, 1.55), rng.uniform(0.17, 0.25)
        body = sc.add_inst(
            C["human"],
            _rand_color(rng, (0.1, 0.8), (0.15, 0.85)),
            None,
            tex=[_T_FLAT, _T_STRIPE][int(rng.integers(2))],
            scale=0.1,
            origin=(x, y0, z),
        )
        head = sc.add_inst(
            C["human"], _jitter(rng, np.array([0.85, 0.65, 0.5]) * rng.uniform(0.4, 1.0), 0.05), tex=_T_FLAT
        )
        sc.add_cyl(x, z, y0, y0 + h, r, body)
        sc.add_sphere((x, y0 + h + 0.12, z), 0.11, head)
    return sc


# ----------------------------------------------------------------------------
# camera and ray casting
# ----------------------------------------------------------------------------
def _camera_rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Camera-to-world rotation; world frame: x right, y up, z forward (left-handed)."""
    cr, sr = math.cos(roll), math.sin(roll)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cy, sy = math.cos(yaw), math.sin(yaw)
    rz = np.array([[cr, -sr, 0.0], [sr, cr, 0.0], [0.0, 0.0, 1.0]])
    flip = np.diag([1.0, -1.0, 1.0])  # camera y (down) -> world -y
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cp, sp], [0.0, -sp, cp]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    return ry @ rx @ flip @ rz


def _intrinsics(height: int, width: int) -> tuple[float, float, float, float]:
    f = (width / 2.0) / math.tan(math.radians(HFOV_DEG) / 2.0)
    return f, f, (width - 1) / 2.0, (height - 1) / 2.0


_BOX_CORNERS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)


def _screen_windows(corners, origin, rot, intr, height, width):
    """Pixel rectangles ``(v0, v1, u0, u1)`` containing the projection of each corner
    set, plus the smallest camera z of each set (a lower bound on the depth)."""
    fx, fy, cx, cy = intr
    cam = (corners - origin) @ rot  # [P, K, 3] camera coordinates
    z = cam[..., 2]
    zmin, zmax = z.min(1), z.max(1)
    zs = np.where(z > 1e-9, z, 1.0)
    u = fx * cam[..., 0] / zs + cx
    v = fy * cam[..., 1] / zs + cy
    u0 = np.clip(np.floor(u.min(1)), 0, width).astype(np.int64)
    u1 = np.clip(np.floor(u.max(1)) + 2, 0, width).astype(np.int64)
    v0 = np.clip(np.floor(v.min(1)), 0, height).astype(np.int64)
    v1 = np.clip(np.floor(v.max(1)) + 2, 0, height).astype(np.int64)
    straddle = zmin <= 1e-6
    u0[straddle], v0[straddle], u1[straddle], v1[straddle] = 0, 0, width, height
    behind = zmax <= 1e-6
    u1[behind], v1[behind] = 0, 0
    return np.stack([v0, v1, u0, u1], 1).tolist(), zmin.tolist()


class _Raster:
    """Z-buffer over per-pixel ray directions (world frame)."""

    def __init__(self, origin, rot, intr, height, width):
        fx, fy, cx, cy = intr
        dcx = (np.arange(width, dtype=np.float64) - cx) / fx
        dcy = (np.arange(height, dtype=np.float64) - cy) / fy
        # D = R @ (dcx, dcy, 1)
        self.dx = rot[0, 0] * dcx[None, :] + rot[0, 1] * dcy[:, None] + rot[0, 2]
        self.dy = rot[1, 0] * dcx[None, :] + rot[1, 1] * dcy[:, None] + rot[1, 2]
        self.dz = rot[2, 0] * dcx[None, :] + rot[2, 1] * dcy[:, None] + rot[2, 2]
        self.idx = 1.0 / self.dx
        self.idy = 1.0 / self.dy
        self.idz = 1.0 / self.dz
        self.dxz2 = self.dx * self.dx + self.dz * self.dz
        self.dd = self.dxz2 + self.dy * self.dy
        self.o = tuple(float(c) for c in origin)
        self.t = np.full((height, width), _INF)
        self.sid = np.full((height, width), -1, dtype=np.int64)

    # -- primitives ---------------------------------------------------------
    def room(self, size, base):
        ox, oy, oz = self.o
        ts, faces = [], []
        for o, d, inv, hi in (
            (ox, self.dx, self.idx, size[0]),
            (oy, self.dy, self.idy, size[1]),
            (oz, self.dz, self.idz, size[2]),
        ):
            pos = ~np.signbit(d)  # +0.0 -> max plane, -0.0 -> min plane; both give t = inf
            ts.append(np.where(pos, hi - o, -o) * inv)
            faces.append(pos)
        t = np.minimum(np.minimum(ts[0], ts[1]), ts[2])
        axis = np.where(ts[0] <= t, 0, np.where(ts[1] <= t, 1, 2))
        pos = np.where(axis == 0, faces[0], np.where(axis == 1, faces[1], faces[2]))
        self.t = t
        self.sid = base + 2 * axis + pos

    def ground(self, sid):
        t = -self.o[1] * self.idy
        m = self.dy < 0
        self.t = np.where(m, t, _INF)
        self.sid = np.where(m, sid, -1)

    def box(self, win, cx, cy, cz, hx, hy, hz, yaw, base):
        v0, v1, u0, u1 = win
        sl = (slice(v0, v1), slice(u0, u1))
        ox, oy, oz = self.o[0] - cx, self.o[1] - cy, self.o[2] - cz
        dy, idy = self.dy[sl], self.idy[sl]
        if yaw == 0.0:
            lox, loz = ox, oz
            dx, dz, idx, idz = self.dx[sl], self.dz[sl], self.idx[sl], self.idz[sl]
        else:
            ca, sa = math.cos(yaw), math.sin(yaw)
            lox, loz = ca * ox - sa * oz, sa * ox + ca * oz
            dx0, dz0 = self.dx[sl], self.dz[sl]
            dx = ca * dx0 - sa * dz0
            dz = sa * dx0 + ca * dz0
            idx, idz = 1.0 / dx, 1.0 / dz
        a1, a2 = (-hx - lox) * idx, (hx - lox) * idx
        b1, b2 = (-hy - oy) * idy, (hy - oy) * idy
        c1, c2 = (-hz - loz) * idz, (hz - loz) * idz
        tmx, tmy, tmz = np.minimum(a1, a2), np.minimum(b1, b2), np.minimum(c1, c2)
        tnear = np.maximum(np.maximum(tmx, tmy), tmz)
        tfar = np.minimum(np.minimum(np.maximum(a1, a2), np.maximum(b1, b2)), np.maximum(c1, c2))
        tz = self.t[sl]
        m = (tnear <= tfar) & (tnear > _EPS) & (tnear < tz)
        if not m.any():
            return
        tn = tnear[m]
        ax = np.where(tmx[m] >= tn, 0, np.where(tmy[m] >= tn, 1, 2))
        dsel = np.where(ax == 0, dx[m], np.where(ax == 1, dy[m], dz[m]))
        tz[m] = tn
        self.sid[sl][m] = base + 2 * ax + (dsel < 0)

    def sphere(self, win, cx, cy, cz, r, sid):
        v0, v1, u0, u1 = win
        sl = (slice(v0, v1), slice(u0, u1))
        ox, oy, oz = self.o[0] - cx, self.o[1] - cy, self.o[2] - cz
        c = ox * ox + oy * oy + oz * oz - r * r
        if c <= 0:
            return  # camera inside
        dd = self.dd[sl]
        b = ox * self.dx[sl] + oy * self.dy[sl] + oz * self.dz[sl]
        t = (-b - np.sqrt(b * b - dd * c)) / dd
        tz = self.t[sl]
        m = (t > _EPS) & (t < tz)
        if not m.any():
            return
        tz[m] = t[m]
        self.sid[sl][m] = sid

    def cylinder(self, win, cx, cz, y0, y1, r, base):
        v0, v1, u0, u1 = win
        sl = (slice(v0, v1), slice(u0, u1))
        ox, oy, oz = self.o[0] - cx, self.o[1], self.o[2] - cz
        c = ox * ox + oz * oz - r * r
        dx, dy, dz = self.dx[sl], self.dy[sl], self.dz[sl]
        tz = self.t[sl]
        sids = self.sid[sl]
        if c > 0:
            a = self.dxz2[sl]
            b = ox * dx + oz * dz
            t = (-b - np.sqrt(b * b - a * c)) / a
            y = oy + t * dy
            m = (t > _EPS) & (y >= y0) & (y <= y1) & (t < tz)
            if m.any():
                tz[m] = t[m]
                sids[m] = base
        if oy > y1 or oy < y0:
            yc, face = (y1, 1) if oy > y1 else (y0, 2)
            t = (yc - oy) * self.idy[sl]
            px, pz = ox + t * dx, oz + t * dz
            m = (t > _EPS) & (px * px + pz * pz <= r * r) & (t < tz)
            if m.any():
                tz[m] = t[m]
                sids[m] = base + face

    def decal(self, win, axis_h, h0, h1, y0, y1, wall_sid, sid):
        v0, v1, u0, u1 = win
        if v0 >= v1 or u0 >= u1:
            return
        sl = (slice(v0, v1), slice(u0, u1))
        sids = self.sid[sl]
        m = sids == wall_sid
        if not m.any():
            return
        t = self.t[sl]
        dh = self.dx[sl] if axis_h == 0 else self.dz[sl]
        ph = self.o[axis_h] + t * dh
        py = self.o[1] + t * self.dy[sl]
        m &= (ph >= h0) & (ph <= h1) & (py >= y0) & (py <= y1)
        sids[m] = sid


def _cast(sc: _Scene, rot, intr, height, width):
    """Ray-cast the scene.

    Returns the raster and per-surface tables ``(kind, inst, normal, centre, radius)``
    indexed by surface id; each table has one extra sentinel row at the end so that
    indexing with ``-1`` (no hit) is valid.
    """
    cam = sc.camera[0]
    ras = _Raster(cam, rot, intr, height, width)
    kinds, insts, normals, centres, radii = [], [], [], [], []
    n_surf = 0

    def add_group(kind, inst, normal, centre=None, radius=None):
        nonlocal n_surf
        m = len(kind)
        kinds.append(np.asarray(kind, dtype=np.int64))
        insts.append(np.asarray(inst, dtype=np.int64))
        normals.append(np.asarray(normal, dtype=np.float64).reshape(m, 3))
        centres.append(np.zeros((m, 3)) if centre is None else np.asarray(centre, dtype=np.float64).reshape(m, 3))
        radii.append(np.ones(m) if radius is None else np.asarray(radius, dtype=np.float64))
        first = n_surf
        n_surf += m
        return first

    room_base = -1
    room_normals = None
    if sc.room is not None:
        size, wall, floor, ceil = sc.room
        # face 2k: min plane of axis k (normal +e_k, inward), face 2k+1: max plane (normal -e_k)
        room_normals = np.repeat(np.eye(3), 2, axis=0) * np.array([1.0, -1.0] * 3)[:, None]
        room_base = add_group([_S_PLANE] * 6, [wall, wall, floor, ceil, wall, wall], room_normals)
        ras.room(size, room_base)
    if sc.ground is not None:
        ras.ground(add_group([_S_PLANE], [sc.ground], [0.0, 1.0, 0.0]))

    draws = []  # (depth lower bound, window, intersector, args)
    # boxes: 6 planar faces each, id = base + 2 * local_axis + (face on the + side)
    if sc.boxes:
        bx = np.array([b[:7] for b in sc.boxes])
        nb = len(bx)
        ca, sa = np.cos(bx[:, 6]), np.sin(bx[:, 6])
        loc = _BOX_CORNERS[None] * bx[:, None, 3:6]
        corners = (
            np.stack(
                [
                    ca[:, None] * loc[..., 0] + sa[:, None] * loc[..., 2],
                    loc[..., 1],
                    -sa[:, None] * loc[..., 0] + ca[:, None] * loc[..., 2],
                ],
                -1,
            )
            + bx[:, None, 0:3]
        )
        zero, one = np.zeros(nb), np.ones(nb)
        cols = np.stack(
            [np.stack([ca, zero, -sa], -1), np.stack([zero, one, zero], -1), np.stack([sa, zero, ca], -1)], 1
        )  # [P, 3 axes, 3] local axes in world
        face_n = np.stack([-cols, cols], 2).reshape(nb * 6, 3)
        first = add_group(np.zeros(nb * 6, dtype=np.int64), np.repeat([b[7] for b in sc.boxes], 6), face_n)
        wins, zmins = _screen_windows(corners, cam, rot, intr, height, width)
        for k, (b, win, zm) in enumerate(zip(sc.boxes, wins, zmins)):
            draws.append((zm, win, ras.box, (*b[:7], first + 6 * k)))
    # vertical cylinders: side (curved), top cap, bottom cap
    if sc.cyls:
        cy_ = np.array([c[:5] for c in sc.cyls])
        nc = len(cy_)
        lo = np.stack([cy_[:, 0] - cy_[:, 4], cy_[:, 2], cy_[:, 1] - cy_[:, 4]], 1)
        hi = np.stack([cy_[:, 0] + cy_[:, 4], cy_[:, 3], cy_[:, 1] + cy_[:, 4]], 1)
        corners = lo[:, None] + (_BOX_CORNERS[None] + 1) / 2 * (hi - lo)[:, None]
        cn = np.tile(np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]), (nc, 1))
        cc = np.repeat(np.stack([cy_[:, 0], np.zeros(nc), cy_[:, 1]], 1), 3, axis=0)
        first = add_group(
            np.tile([_S_CYL, _S_PLANE, _S_PLANE], nc),
            np.repeat([c[5] for c in sc.cyls], 3),
            cn,
            cc,
            np.repeat(cy_[:, 4], 3),
        )
        wins, zmins = _screen_windows(corners, cam, rot, intr, height, width)
        for k, (cyl, win, zm) in enumerate(zip(sc.cyls, wins, zmins)):
            draws.append((zm, win, ras.cylinder, (*cyl[:5], first + 3 * k)))
    # spheres
    if sc.spheres:
        sp = np.array([s[:4] for s in sc.spheres])
        corners = sp[:, None, :3] + _BOX_CORNERS[None] * sp[:, None, 3:4]
        first = add_group(
            np.full(len(sp), _S_SPHERE), [s[4] for s in sc.spheres], np.zeros((len(sp), 3)), sp[:, :3], sp[:, 3]
        )
        wins, zmins = _screen_windows(corners, cam, rot, intr, height, width)
        for k, (s, win, zm) in enumerate(zip(sc.spheres, wins, zmins)):
            draws.append((zm, win, ras.sphere, (*s[:4], first + k)))
    # near-to-far, skipping primitives that lie behind everything already drawn in their window
    draws.sort(key=lambda d: d[0])
    for zm, win, fn, args in draws:
        v0, v1, u0, u1 = win
        if v0 >= v1 or u0 >= u1:
            continue
        if zm > 0.0 and zm >= ras.t[v0:v1, u0:u1].max():
            continue
        fn(win, *args)
    # decals on room walls (coplanar; relabel visible wall pixels inside the rectangle)
    if sc.decals and sc.room is not None:
        size = sc.room[0]
        corners = []
        for face, h0, h1, y0, y1, _inst in sc.decals:
            k, pos = divmod(face, 2)
            wc = size[k] if pos else 0.0
            pts = [(wc, yy, hh) if k == 0 else (hh, yy, wc) for hh in (h0, h1) for yy in (y0, y1)]
            corners.append(pts + pts)
        faces = [d[0] for d in sc.decals]
        first = add_group(np.zeros(len(faces), dtype=np.int64), [d[5] for d in sc.decals], room_normals[faces])
        wins, _ = _screen_windows(np.array(corners), cam, rot, intr, height, width)
        for k, ((face, h0, h1, y0, y1, _inst), win) in enumerate(zip(sc.decals, wins)):
            ras.decal(win, 2 if face < 2 else 0, h0, h1, y0, y1, room_base + face, first + k)

    add_group([_S_PLANE], [-1], [0.0, 0.0, 0.0])  # sentinel for sid == -1
    tables = tuple(np.concatenate(x) for x in (kinds, insts, normals, centres, radii))
    return ras, tables


# ----------------------------------------------------------------------------
# texturing and shading
# ----------------------------------------------------------------------------
def _hash01(ix, iy, seed):
    h = (ix * 374761393 + iy * 668265263 + seed * 1442695041) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
    h ^= h >> 16
    return h.astype(np.float64) * (1.0 / 4294967296.0)


def _value_noise(a, b, seed):
    out = np.zeros_like(a)
    amp, tot = 1.0, 0.0
    for octave in range(2):
        fa, fb = np.floor(a), np.floor(b)
        ia, ib = fa.astype(np.int64), fb.astype(np.int64)
        ta, tb = a - fa, b - fb
        ta, tb = ta * ta * (3 - 2 * ta), tb * tb * (3 - 2 * tb)
        s = seed + 7919 * octave
        h00, h10 = _hash01(ia, ib, s), _hash01(ia + 1, ib, s)
        h01, h11 = _hash01(ia, ib + 1, s), _hash01(ia + 1, ib + 1, s)
        top = h00 + (h10 - h00) * ta
        bot = h01 + (h11 - h01) * ta
        out += amp * (top + (bot - top) * tb)
        tot += amp
        amp *= 0.5
        a, b = a * 2.0 + 0.37, b * 2.0 + 0.71
    return out / tot


def _albedo(inst, px, py, pz, nx, ny, nz, itab):
    """Per-pixel albedo [M, 3] from instance textures evaluated at world hits."""
    c1, c2, tex, scale, pha, phb, duty, orient, origin, iyaw, seed = itab
    ox, oy, oz = origin[inst, 0], origin[inst, 1], origin[inst, 2]
    ca, sa = np.cos(iyaw)[inst], np.sin(iyaw)[inst]
    rx, ry, rz = px - ox, py - oy, pz - oz
    lx, lz = ca * rx - sa * rz, sa * rx + ca * rz
    nlx, nlz = np.abs(ca * nx - sa * nz), np.abs(sa * nx + ca * nz)
    any_ = np.abs(ny)
    top = (any_ >= nlx) & (any_ >= nlz)
    side_x = ~top & (nlx >= nlz)
    ua = np.where(top | ~side_x, lx, lz)
    ub = np.where(top, lz, ry)
    s = scale[inst]
    a = ua / s + pha[inst]
    b = ub / s + phb[inst]
    o = orient[inst].astype(bool)
    a, b = np.where(o, b, a), np.where(o, a, b)
    t = tex[inst]
    pat = np.zeros_like(a)
    for kind in np.unique(t).tolist():
        if kind == _T_FLAT:
            continue
        m = t == kind
        am, bm = a[m], b[m]
        if kind == _T_CHECK:
            p = (np.floor(am) + np.floor(bm)) % 2
        elif kind == _T_STRIPE:
            p = ((am - np.floor(am)) >= duty[inst[m]]).astype(np.float64)
        elif kind == _T_NOISE:
            p = _value_noise(am, bm, seed[inst[m]])
        elif kind == _T_GRID:
            d = duty[inst[m]]
            p = (((am - np.floor(am)) < d) & ((bm - np.floor(bm)) < d)).astype(np.float64)
        else:  # road: asphalt noise plus a dashed centre line (metres, unscaled)
            n = _value_noise(am * 4.0, bm * 4.0, seed[inst[m]]) * 0.25
            line = (np.abs(ua[m]) < 0.08) & (np.mod(ub[m], 9.0) < 4.0)
            p = np.where(line, 1.0, n)
        pat[m] = p
    return c1[inst] + (c2[inst] - c1[inst]) * pat[:, None]


def _inst_tables(sc: _Scene):
    rec = sc.inst
    return (
        np.clip(np.array([r[1] for r in rec], dtype=np.float64).reshape(-1, 3), 0.0, 1.0),
        np.clip(np.array([r[2] for r in rec], dtype=np.float64).reshape(-1, 3), 0.0, 1.0),
        np.array([r[3] for r in rec], dtype=np.int64),
        np.array([r[4] for r in rec]),
        np.array([r[5] for r in rec]),
        np.array([r[6] for r in rec]),
        np.array([r[7] for r in rec]),
        np.array([r[8] for r in rec], dtype=np.int64),
        np.array([r[9] for r in rec]).reshape(-1, 3),
        np.array([r[10] for r in rec]),
        np.array([r[12] for r in rec], dtype=np.int64),
    )


# ----------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------
def render_sample(
    dataset: str, seed: int, split: str, index: int, height: int, width: int, return_ids: bool = False
) -> dict:
    """Render one sample of ``dataset`` (see module docstring for conventions).

    Returns a dict with ``image`` (uint8 [H, W, 3]), ``seg`` (uint8 [H, W], 255 =
    ignore), ``depth`` (float32 [H, W], metres, 0 = invalid), ``normal`` (float32
    [3, H, W], indoor only) and ``intrinsics`` ``(fx, fy, cx, cy)``.  With
    ``return_ids=True`` it also returns ``ids`` (int32 [H, W], one id per
    analytic surface -- each planar face of a box, each room plane, each cap and
    curved side -- ``-1`` where nothing is hit) and ``planar`` (bool [H, W],
    True where the hit surface is a plane).
    """
    if dataset not in SPECS:
        raise KeyError(f"unknown synthetic dataset {dataset!r}; expected one of {sorted(SPECS)}")
    if split not in SPLIT_ID:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_ID)}")
    height, width = int(height), int(width)
    if height < 2 or width < 2:
        raise ValueError(f"height and width must be >= 2, got {height}x{width}")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _render(dataset, seed, split, index, height, width, return_ids)


def _render(dataset, seed, split, index, height, width, return_ids):
    spec = SPECS[dataset]
    rng = np.random.default_rng([int(seed), SPLIT_ID[split], int(index)])
    indoor = dataset == "synth-indoor"
    sc = _build_indoor(rng) if indoor else _build_street(rng)
    # scene-level randomness that must precede the per-pixel draws
    exposure = rng.uniform(0.85, 1.15)
    noise_sigma = rng.uniform(1.0, 3.5)
    p_rand_ignore = rng.uniform(0.0005, 0.004)
    p_band = rng.uniform(0.3, 0.8)

    intr = _intrinsics(height, width)
    cam, yaw, pitch, roll = sc.camera
    rot = _camera_rotation(yaw, pitch, roll)
    ras, (skind, sinst, snorm, scent, srad) = _cast(sc, rot, intr, height, width)
    itab = _inst_tables(sc)
    icls = np.array([r[0] for r in sc.inst], dtype=np.int64)
    iemis = np.array([r[11] for r in sc.inst], dtype=bool)

    t, sid = ras.t, ras.sid
    hit = sid >= 0
    t_hit = np.where(hit, t, 0.0)
    px = cam[0] + t_hit * ras.dx
    py = cam[1] + t_hit * ras.dy
    pz = cam[2] + t_hit * ras.dz

    # analytic world normals (deferred per surface kind)
    kind = skind[sid]
    nw = snorm[sid]  # [H, W, 3]
    curved = kind != _S_PLANE
    if curved.any():
        sc_c = scent[sid[curved]]
        inv_r = 1.0 / srad[sid[curved]]
        cyl = kind[curved] == _S_CYL
        cxn = (px[curved] - sc_c[:, 0]) * inv_r
        cyn = np.where(cyl, 0.0, (py[curved] - sc_c[:, 1]) * inv_r)
        czn = (pz[curved] - sc_c[:, 2]) * inv_r
        nn = np.sqrt(cxn * cxn + cyn * cyn + czn * czn)
        nw[curved] = np.stack([cxn, cyn, czn], -1) / nn[:, None]
    facing = nw[..., 0] * ras.dx + nw[..., 1] * ras.dy + nw[..., 2] * ras.dz
    nw[facing > 0] *= -1.0

    inst = sinst[sid]
    seg = np.where(hit, icls[inst], _SC["sky"] if not indoor else 0).astype(np.int64)

    # shading
    img = np.zeros((height, width, 3))
    hi = np.flatnonzero(hit.ravel())
    if hi.size:
        ii = inst.ravel()[hi]
        nxh, nyh, nzh = (nw[..., k].ravel()[hi] for k in range(3))
        alb = _albedo(ii, px.ravel()[hi], py.ravel()[hi], pz.ravel()[hi], nxh, nyh, nzh, itab)
        lam = np.maximum(0.0, nxh * sc.light[0] + nyh * sc.light[1] + nzh * sc.light[2])
        shade = np.where(iemis[ii], 1.0, sc.ambient + sc.diffuse * lam)
        col = alb * shade[:, None]
        if sc.sky is not None and np.isfinite(sc.fog):
            dist = t.ravel()[hi] * np.sqrt(ras.dd.ravel()[hi])
            f = np.exp(-dist / sc.fog)[:, None]
            col = col * f + sc.sky[0] * (1.0 - f)
        img.reshape(-1, 3)[hi] = col
    if sc.sky is not None and not hit.all():
        mi = np.flatnonzero(~hit.ravel())
        elev = np.clip(ras.dy.ravel()[mi] / np.sqrt(ras.dd.ravel()[mi]), 0.0, 1.0) ** 0.6
        horizon, zenith = sc.sky
        img.reshape(-1, 3)[mi] = horizon + (zenith - horizon) * elev[:, None]

    # depth / normals outputs
    valid = hit & (t <= spec.max_depth)
    depth = np.where(valid, t, 0.0).astype(np.float32)

    # ignore labels: thin band on the far side of depth jumps between instances + random pixels
    u = rng.random((height, width))
    ign = u < p_rand_ignore
    band = np.zeros((height, width), dtype=bool)
    ti = np.where(valid, t, _INF)
    for axis in (0, 1):
        a = [slice(None), slice(None)]
        b = [slice(None), slice(None)]
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        a, b = tuple(a), tuple(b)
        diff = (inst[a] != inst[b]) & valid[a] & valid[b]
        far_a = diff & (ti[a] > 1.05 * ti[b])
        far_b = diff & (ti[b] > 1.05 * ti[a])
        band[a] |= far_a
        band[b] |= far_b
    # the band is one pixel wide at any resolution: thin it out at low resolution so the
    # ignored fraction stays roughly resolution independent
    ign |= band & (u > 1.0 - p_band * min(1.0, max(height, width) / 256.0))
    seg[ign] = IGNORE_INDEX
    seg = seg.astype(np.uint8)

    img = img * (255.0 * exposure)
    img += rng.standard_normal((height, width, 3), dtype=np.float32) * noise_sigma
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    out = {"image": image, "seg": seg, "depth": depth, "intrinsics": tuple(float(v) for v in intr)}
    if "normal" in spec.tasks:
        ncam = nw @ rot  # world -> camera: R^T n, as row vectors
        ncam[~valid] = 0.0
        out["normal"] = np.ascontiguousarray(ncam.transpose(2, 0, 1)).astype(np.float32)
    if return_ids:
        out["ids"] = sid.astype(np.int32)
        out["planar"] = hit & (kind == _S_PLANE)
    return out

"""The sweep grid file: a base run config plus the axes of a scaling study, and the cells it expands to.

    name: scaling                       # the parent MLflow run's name; default output folder sweeps/<name>
    config: [default.yaml]              # base run config files, relative to this grid file
    set: [unlearn.steps=40]             # --set overrides applied to every cell
    dataset: synth-indoor
    launcher: cpu                       # cpu | gpu | deepspeed_zero1 | deepspeed_zero2 | torchrun | <accelerate>.yaml
    axes:
      world_size: [1, 2, 4]
      train_size: [384, 1536]           # data size: one synthetic dataset per size (see `synth`), or `data_roots`
      forget_fraction: [0.01, 0.05, 0.1]
      method: [neggrad_plus, iamu]

Cells: one *train* cell per (train size, world size) — the throughput/step-time measurement, and the
one at `original_world_size` (default: the smallest world size) is also the original model every
unlearning cell of that data size starts from, so world sizes are compared from the same θ₀ — and one
*unlearn* cell per (train size, forget fraction, method, world size). `throughput: false` keeps only
the train cells that provide originals. `retrain: true` adds a *retrain* cell (the gold standard) per
(train size, forget fraction) at `original_world_size`, and every unlearning cell is scored against it
(`mtu unlearn --retrain`: gap to retrain, cost ratio).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mtu_dist.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Axes(_Strict):
    world_size: list[int] = Field([1], min_length=1)
    train_size: list[int] = Field(min_length=1)
    forget_fraction: list[float] = Field(min_length=1)
    method: list[str] = Field(min_length=1)


class SynthSpec(_Strict):
    """How the synthetic dataset of each train size is generated (`mtu data synth` flags)."""

    val: int = Field(128, ge=1)
    height: int = Field(48, ge=8)
    width: int = Field(64, ge=8)
    shard_size: int | None = Field(None, ge=1)  # None: the default layout (reader slots up to 8 ranks x 2 workers fit)
    seed: int = 0
    workers: int = Field(0, ge=0)  # writer processes; 0 = every core


class Grid(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    config: list[str] = []
    set: list[str] = []
    dataset: str = "synth-indoor"
    data_roots: dict[int, str] = {}  # train size -> existing root holding `dataset`; other sizes are synthesized
    synth: SynthSpec = SynthSpec()
    setting: Literal["full", "partial"] = "full"
    tasks: list[str] | None = None  # target tasks of a partial request
    request_seed: int = 0
    launcher: str = "cpu"
    throughput: bool = True  # a train cell at every world size, not only the originals'
    retrain: bool = False  # a retrain cell per (train size, forget fraction); unlearn cells score against it
    original_world_size: int | None = None
    tracking_uri: str | None = None
    axes: Axes


@dataclass(frozen=True)
class Cell:
    kind: Literal["train", "retrain", "unlearn"]
    world_size: int
    train_size: int
    forget_fraction: float | None = None
    method: str | None = None

    @property
    def name(self) -> str:
        if self.kind == "train":
            return f"train-n{self.train_size}-w{self.world_size}"
        return f"{self.method}-n{self.train_size}-f{self.forget_fraction:g}-w{self.world_size}"

    @property
    def tags(self) -> dict[str, str]:
        """What `mtu compare` groups by; set on the cell's MLflow run."""
        return {
            f"mtu.sweep.{k}": str(v)
            for k, v in (
                ("kind", self.kind),
                ("cell", self.name),
                ("world_size", self.world_size),
                ("train_size", self.train_size),
                ("forget_fraction", self.forget_fraction),
                ("method", self.method),
            )
            if v is not None
        }


def load_grid(path: str | Path) -> tuple[Grid, Path]:
    """Parse and validate a grid file; every problem names the file and the field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read grid ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a grid file must be a mapping (name, config, axes, ...)")
    try:
        grid = Grid.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            problems.append(f"field '{where}': {'unknown field' if err['type'] == 'extra_forbidden' else err['msg']}")
        raise UserError(f"{path}: invalid grid: " + "; ".join(problems)) from None
    _check_axes(grid, path)
    return grid, path.resolve().parent


def _check_axes(grid: Grid, path: Path) -> None:
    from mtu_dist.methods import METHODS

    a = grid.axes
    rules = [
        ("axes.world_size", [w for w in a.world_size if w < 1], "positive integers"),
        ("axes.train_size", [n for n in a.train_size if n < 1], "positive integers"),
        ("axes.forget_fraction", [f for f in a.forget_fraction if not 0 < f < 1], "fractions in (0, 1)"),
        (
            "axes.method",
            [m for m in a.method if m not in METHODS],
            f"registered methods ({', '.join(sorted(METHODS))})",
        ),
    ]
    for field, bad, expected in rules:
        if bad:
            raise UserError(f"{path}: field '{field}': {bad} not allowed, expected {expected}")
    for field, values in (
        ("axes.world_size", a.world_size),
        ("axes.train_size", a.train_size),
        ("axes.forget_fraction", a.forget_fraction),
        ("axes.method", a.method),
    ):
        if len(set(values)) != len(values):
            raise UserError(f"{path}: field '{field}': duplicate values in {values}")
    if grid.original_world_size is not None and grid.original_world_size not in a.world_size:
        raise UserError(
            f"{path}: field 'original_world_size': {grid.original_world_size} is not in axes.world_size {a.world_size}"
        )
    if grid.setting == "partial" and not grid.tasks:
        raise UserError(f"{path}: field 'tasks': a partial-task sweep needs its target tasks (e.g. [seg])")


def original_world_size(grid: Grid) -> int:
    return grid.original_world_size or min(grid.axes.world_size)


def plan(grid: Grid) -> list[Cell]:
    """Every cell in the order it runs: per data size the original, then its other train cells; the
    retrain references; then unlearning."""
    a, w0 = grid.axes, original_world_size(grid)
    train_ws = sorted(a.world_size, key=lambda w: w != w0) if grid.throughput else [w0]
    cells = [Cell("train", w, n) for n in a.train_size for w in train_ws]
    if grid.retrain:
        cells += [Cell("retrain", w0, n, f, "retrain") for n in a.train_size for f in a.forget_fraction]
    cells += [
        Cell("unlearn", w, n, f, m)
        for n in a.train_size
        for f in a.forget_fraction
        for m in a.method
        for w in a.world_size
    ]
    return cells

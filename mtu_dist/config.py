"""One typed config schema for every command (pydantic, unknown fields rejected).

A run's config is: defaults <- YAML file(s) given with `--config` <- `--set section.field=value`
overrides (values parsed as YAML scalars). The resolved config is saved next to every run's outputs
and logged to MLflow. Method-specific knobs live under `unlearn.options` and are validated by the
method's own schema (see `mtu_dist/methods`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from mtu_dist.errors import UserError


class Strict(BaseModel):
    """Strict where coercion would hide a mistake (`epochs: true` is not 1 epoch, `epochs: 2.5` or `2.0`
    is not an integer, `lr: .inf` is no step size), lenient where YAML 1.1 itself is ambiguous: it
    reads `1e-3` as a string, which must stay a valid float. Method options are held to it too."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_silent_coercion(cls, value, info):
        kinds = _scalar_kinds(cls.model_fields[info.field_name].annotation)
        if bool in kinds:
            if not isinstance(value, bool) and value is not None:
                raise PydanticCustomError("strict_bool", "expected true or false, got {value}", {"value": repr(value)})
        elif isinstance(value, bool) and kinds & {int, float}:
            raise PydanticCustomError(
                "strict_number", "expected a number, got the boolean {value}", {"value": repr(value)}
            )
        elif isinstance(value, float) and int in kinds and float not in kinds:
            raise PydanticCustomError("strict_int", "expected an integer, got {value}", {"value": repr(value)})
        return value


class Section(Strict):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _scalar_kinds(annotation) -> set:
    """The scalar types a field's annotation admits (`float | None` -> {float, NoneType})."""
    args = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return {a for a in args if a in (bool, int, float, str)}


class DataConfig(Section):
    dataset: str = "synth-indoor"  # dataset name under root, or a dataset folder
    root: str = "data_shards"
    workers: int = Field(1, ge=0)  # loader worker processes per rank
    shuffle_buffer: int = Field(64, ge=0)


class ModelConfig(Section):
    arch: Literal["conv", "resnet"] = "conv"  # conv: small CPU model; resnet: torchvision backbone for GPUs
    width: int = Field(32, ge=8)
    head_width: int = Field(32, ge=8)
    resnet_depth: int = 18
    backbone_checkpoint: str | None = None  # local weights only; nothing is downloaded
    dtype: Literal["float32", "float64"] = "float32"  # float64: exact equivalence checks


class TrainConfig(Section):
    epochs: int = Field(12, ge=1)
    global_batch: int = Field(16, ge=1)  # split evenly over ranks
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float = Field(5.0, gt=0)
    checkpoint_every: int = Field(0, ge=0)  # steps; 0 = once per epoch
    keep_checkpoints: int = Field(2, ge=1)


class UnlearnConfig(Section):
    method: str = "neggrad_plus"
    steps: int = Field(40, ge=1)  # step budget
    lr: float = Field(
        1e-2, gt=0
    )  # SGD step size (measured on the synthetic default: 1e-2 moves the forget pairs in tens of steps)
    optimizer: Literal["sgd", "adam"] = (
        "sgd"  # sgd keeps the update in the projected directions; adam rescales per coordinate
    )
    momentum: float = Field(0.0, ge=0, lt=1)
    # step size at step t: lr * lr_growth**(t - 1). Above 1 it ramps up until the stop rule ends the run, so a
    # step size below a method's reaching edge still reaches the target, at the gentlest step that does
    lr_growth: float = Field(1.0, ge=1, le=2)
    forget_batch: int = Field(8, ge=1)  # global forget batch
    retain_batch: int = Field(16, ge=1)  # global retain batch
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the retain term: alpha*retain - (1-alpha)*forget
    stop_band: float | None = None  # a task is done when its forget-pair primary metric <= original val + band
    stop_drop: float | None = Field(
        None, gt=0, lt=1
    )  # ... or has fallen by this fraction (equal-forgetting comparisons)
    stop_at: dict[str, float] | None = (
        None  # ... or is at or below this level per task (e.g. the retrain's, for equal forgetting)
    )
    diverge_factor: float = Field(20.0, gt=1)  # loss or grad norm above factor x its first value = divergence
    check_sync: bool = False  # every step: compare a parameter checksum across ranks (one tiny all_gather)
    checkpoint_every: int = Field(10, ge=0)  # steps between resume points (`mtu unlearn --resume`); 0 = none
    keep_checkpoints: int = Field(2, ge=1)
    signal_engine: Literal["auto", "sequential", "batched"] = "auto"  # per-task gradient signals (auto: measured)
    reduction: Literal["replicated", "sharded"] = "replicated"  # the distributed gradient step's mode
    trajectory_every: int = Field(
        0, ge=0
    )  # steps between trajectory points (forget and collateral on fixed subsets); 0 = none
    trajectory_sample: int = Field(64, ge=1)  # retain and val instances in the trajectory's fixed subsets
    options: dict[str, Any] = {}  # method-specific knobs, validated by the method


class EvalConfig(Section):
    batch: int = Field(32, ge=1)
    retain_sample: int = Field(64, ge=1)  # fixed retain sample (first N retain instances in manifest order)


class TrackingConfig(Section):
    uri: str | None = None  # default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str | None = None  # default: the dataset name
    enabled: bool = True


class RunConfig(Section):
    seed: int = 0
    out: str = "runs"
    deterministic: bool = True
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    unlearn: UnlearnConfig = UnlearnConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _leaves(tree: dict, prefix: tuple = ()):
    """Every field path a config file sets (a section's path where it sets no fields)."""
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, prefix + (str(k),))
        else:
            yield prefix + (str(k),)


def _apply_override(tree: dict, item: str) -> tuple:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.field=value")
    path, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    *parents, leaf = path.strip().split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {item!r}: '{p}' is not a section")
    node[leaf] = value
    return tuple(p.strip() for p in (*parents, leaf))


def load_config(
    files: list[str] | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> RunConfig:
    tree: dict = copy.deepcopy(base or {})  # overrides write into nested sections: never into the caller's
    origins: dict[tuple, str] = {}  # field path -> where its value came from (the last writer wins, as in the merge)
    for f in files or []:
        try:
            loaded = yaml.safe_load(Path(f).read_text()) or {}
        except OSError as e:
            raise UserError(f"{f}: cannot read config ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise UserError(f"{f}: not valid YAML ({e})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{f}: a config file must be a mapping of sections")
        tree = _merge(tree, loaded)
        origins |= {path: str(f) for path in _leaves(loaded)}
    for item in overrides or []:
        origins[_apply_override(tree, item)] = f"--set {item!r}"
    return validate(tree, source=", ".join(map(str, files or [])) or "config", origins=origins)


def validate(tree: dict, source: str = "config", origins: dict[tuple, str] | None = None) -> RunConfig:
    """The typed config; an error names each bad field and where its value came from (`origins`: field
    path -> the file or `--set` item that set it; `source` for the rest)."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        by_source: dict[str, list[str]] = {}
        for err in e.errors():
            loc = tuple(str(p) for p in err["loc"])
            field = ".".join(loc)
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            where = next((origins[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in (origins or {})), source)
            by_source.setdefault(where, []).append(f"field '{field}': {msg}")
        raise UserError(
            "; ".join(f"{where}: invalid config: " + "; ".join(problems) for where, problems in by_source.items())
        ) from None


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

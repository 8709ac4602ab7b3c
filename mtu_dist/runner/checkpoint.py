"""Checkpoints: safetensors for tensors, a small JSON for the rest, written atomically and verified.

A checkpoint is a folder `step-NNNNNNN/` holding `model.safetensors`, optionally `optim.safetensors`,
and `state.json` (step, epoch, resolved config, dataset layout and the sha256 of every tensor file). The
torch RNG state travels with the optimizer state; data order is a pure function of (seed, epoch), so
no other RNG state is needed to resume bit-identically. It is written to a temporary folder and renamed
into place, so a crash leaves
either the old checkpoint or the new one, never a torn one; a torn or tampered checkpoint fails its
checksum on load, and `latest_checkpoint` falls back to the previous good one. Nothing is unpickled.
A write that fails (full disk, unwritable folder) removes its temporary folder and names the
checkpoint; the previous checkpoints are untouched. `check_resumable` refuses to continue a run under
a different config, world size, request or origin model: that would silently change its result.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtu_dist.errors import UserError
from mtu_dist.utils.fileio import sha256_file

TENSOR_FILES = ("model.safetensors", "optim.safetensors")


def _optim_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    flat = {
        f"state.{i}.{name}": v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
        for i, st in sd["state"].items()
        for name, v in st.items()
    }
    return flat, sd["param_groups"]


def _optim_from_flat(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict] = {}
    for key, v in flat.items():
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


# config sections that may change between a crash and `--resume` without changing the result
RESUME_FREE = ("tracking", "out", "data.root")
# run info that must match
RESUME_SAME = ("dataset", "data_sha256", "world_size", "deepspeed_stage", "request_sha256", "origin_sha256")
RECORDED_SINCE = ("data_sha256",)  # compared only where the checkpoint records it (older ones do not)


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    *,
    step: int,
    epoch: int,
    config: dict,
    info: dict,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    try:
        _write(folder, tmp, model, step=step, epoch=epoch, config=config, info=info, optimizer=optimizer)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{folder}: could not write checkpoint ({e}); earlier checkpoints are untouched") from None
    return folder


def _write(folder: Path, tmp: Path, model, *, step, epoch, config, info, optimizer) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp / "model.safetensors")
    meta = {"step": step, "epoch": epoch, "config": config, **info}
    if optimizer is not None:
        flat, groups = _optim_to_flat(optimizer)
        flat["rng.torch"] = torch.get_rng_state()
        save_file(flat, tmp / "optim.safetensors")
        meta["optim_param_groups"] = groups
    meta["sha256"] = {f: sha256_file(tmp / f) for f in TENSOR_FILES if (tmp / f).exists()}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    for f in tmp.iterdir():  # durable before it becomes visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def read_state(folder: str | Path) -> dict:
    """state.json of a checkpoint, with every tensor file's checksum verified."""
    folder = Path(folder)
    if (folder / "final" / "state.json").is_file():  # a run folder: take its final model
        folder = folder / "final"
    path = folder / "state.json"
    if not path.is_file():
        raise UserError(f"{folder}: not a checkpoint (no state.json)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: corrupt checkpoint metadata (not valid JSON)") from None
    sums = meta.get("sha256") if isinstance(meta, dict) else None
    if not isinstance(sums, dict) or not all(k in TENSOR_FILES and isinstance(v, str) for k, v in sums.items()):
        raise UserError(
            f"{path}: corrupt checkpoint metadata (expected an object whose 'sha256' maps "
            f"{' / '.join(TENSOR_FILES)} to checksums)"
        )
    for name, digest in sums.items():
        f = folder / name
        if not f.is_file():
            raise UserError(f"{f}: checkpoint file missing")
        if sha256_file(f) != digest:
            raise UserError(f"{f}: checksum mismatch (torn or modified checkpoint)")
    if "model.safetensors" not in meta.get("sha256", {}):
        raise UserError(f"{folder}: checkpoint lists no model.safetensors")
    meta["_folder"] = str(folder)
    return meta


def load_checkpoint(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    meta = read_state(folder)
    folder = Path(meta["_folder"])
    try:
        tensors = load_file(folder / "model.safetensors")
        refuse_non_finite(tensors, folder / "model.safetensors")
        model.load_state_dict(tensors)
    except SafetensorError as e:  # not a safetensors file at all (never unpickled, whatever it holds)
        raise UserError(f"{folder}/model.safetensors: not a safetensors file ({str(e).splitlines()[0]})") from None
    except (RuntimeError, OSError, ValueError) as e:
        raise UserError(f"{folder}/model.safetensors: does not fit this model ({str(e).splitlines()[0]})") from None
    if optimizer is not None:
        if not (folder / "optim.safetensors").is_file():  # written under ZeRO-1/2 (distributed/stepper.py)
            raise UserError(
                f"{folder}: holds no optimizer state (under DeepSpeed ZeRO-1/2 a stateful optimizer's "
                "state is partitioned over the ranks and not checkpointed), so the run cannot continue "
                "exactly; start anew with --overwrite"
            )
        flat = load_file(folder / "optim.safetensors")
        refuse_non_finite(flat, folder / "optim.safetensors")
        torch.set_rng_state(flat.pop("rng.torch"))
        _optim_from_flat(optimizer, flat, meta["optim_param_groups"])
    return meta


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first floating tensor holding NaN or inf, by name (None: all finite)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def refuse_non_finite(tensors: dict[str, torch.Tensor], where) -> None:
    """Checksums prove a file is unchanged, not that it is usable: a NaN/inf model poisons every step
    and metric that follows, so it is refused where it is loaded."""
    name = non_finite(tensors)
    if name is not None:
        raise UserError(f"{where}: tensor '{name}' holds NaN or inf; a model that is not finite cannot be used")


def check_model_file(meta: dict) -> None:
    """Before a command writes anything: the checkpoint's model file (read_state `meta`) loads and is finite."""
    path = Path(meta["_folder"]) / "model.safetensors"
    try:
        tensors = load_file(path)
    except SafetensorError as e:
        raise UserError(f"{path}: not a safetensors file ({str(e).splitlines()[0]})") from None
    refuse_non_finite(tensors, path)


def check_resumable(meta: dict, config: dict, info: dict) -> None:
    """A run may only continue from `meta` (a checkpoint's state.json) under the same config (except
    `RESUME_FREE`), world size, data, request and origin: anything else gives another result."""
    where = meta["_folder"]
    for key in RESUME_SAME:
        if key in RECORDED_SINCE and key not in meta:
            continue
        if meta.get(key) != info.get(key):
            raise UserError(
                f"{where}: written with {key} = {meta.get(key)!r}, this run has {info.get(key)!r}; "
                "resume under the same launcher/request/origin, or start anew with --overwrite"
            )
    then, now = _flat(meta.get("config", {})), _flat(config)
    changed = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k) and not k.startswith(RESUME_FREE))
    if changed:
        shown = ", ".join(f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise UserError(
            f"{where}: the config changed since this checkpoint ({shown}); resume with the config "
            "it was written with, or start anew with --overwrite"
        )


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """Newest checkpoint that passes its checksums; torn ones are skipped (and reported)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    for folder in sorted(ckpt_dir.glob("step-*"), reverse=True):
        try:
            read_state(folder)
            return folder
        except UserError as e:
            print(f"mtu: skipping checkpoint: {e}")
    return None


def prune(ckpt_dir: Path, keep: int) -> None:
    for folder in sorted(ckpt_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)

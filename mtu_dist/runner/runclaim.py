"""A run folder belongs to one live run: rank 0 holds `<run>/.lock` for the run's life (released by the OS
when the process ends, however it ends), so two runs into one folder cannot both write it, `--overwrite`
or not. The verdict is rank 0's and every rank gets it, so no rank waits alone in a collective."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mtu_dist.errors import UserError
from mtu_dist.utils.fileio import ensure_writable_dir
from mtu_dist.utils.locks import Held, release, try_lock

LOCK = ".lock"
_HELD: dict[str, int] = {}  # run folder -> lock descriptor held by this process


def claim_run_dir(acc, run_dir: Path, *, may_exist: bool) -> bool:
    """Claim `run_dir` for this run (creating it); True when this run created it. Raises UserError on every
    rank when the folder is held by another run, or appeared since every rank checked it."""
    verdict, created = None, False
    if acc.is_main_process:
        try:
            created = _claim(run_dir, may_exist)
        except UserError as e:
            verdict = str(e)
    verdict = _from_rank0(acc, verdict)
    if verdict:
        raise UserError(verdict)
    return created


def _claim(run_dir: Path, may_exist: bool) -> bool:
    existed = run_dir.exists()
    if existed and not may_exist:  # another run made it since it was checked
        raise UserError(f"{run_dir}: run folder exists; pass --resume to continue it or --overwrite to redo it")
    ensure_writable_dir(run_dir)
    release_run_dir(run_dir)  # an earlier command of this process that stopped before releasing it
    before = (run_dir / LOCK).read_text(errors="replace") if (run_dir / LOCK).is_file() else ""
    try:
        fd = try_lock(run_dir / LOCK)
    except Held as e:
        raise UserError(
            f"{run_dir}: run folder is in use by another run ({e.holder}); wait for it to end or pass another --name"
        ) from None
    _HELD[str(run_dir.resolve())] = fd
    _PREVIOUS[str(run_dir.resolve())] = before
    _remove_torn_writes(run_dir)
    return not existed


_PREVIOUS: dict[str, str] = {}  # run folder -> what its lock file said before this run took it


def record_mlflow_run(run_dir: Path, tracker) -> None:
    """Note the run's MLflow run in its lock file, and end the previous holder's if it is still RUNNING: that
    holder is gone (we hold its lock), killed too hard to end it itself (SIGKILL, a lost node)."""
    key = str(run_dir.resolve())
    fd = _HELD.get(key)
    if fd is None or not tracker.enabled:
        return
    for line in _PREVIOUS.pop(key, "").splitlines():
        if line.startswith(f"mlflow {tracker.uri} "):
            _end_if_running(tracker.client, line.rsplit(" ", 1)[1])
    os.pwrite(fd, f"mlflow {tracker.uri} {tracker.run_id}\n".encode(), os.fstat(fd).st_size)


def _end_if_running(client, run_id: str) -> None:
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
    except Exception:  # noqa: BLE001 - a run deleted since, or a store that moved: nothing to end
        pass


def _forget_in_forked_child() -> None:
    """A forked child (a data loader worker) shares the run's lock. Outliving a rank killed outright, it
    would keep the folder "in use" and refuse the resume. Closing its descriptor, never unlocking (the lock
    is shared with the parent), leaves the lock to the parent alone."""
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_forked_child)


def release_run_dir(run_dir: Path) -> None:
    release(_HELD.pop(str(run_dir.resolve()), None))


def release_all() -> None:
    for key in list(_HELD):
        release(_HELD.pop(key))


def _remove_torn_writes(run_dir: Path) -> None:
    """Checkpoint temporaries of a killed earlier run in this folder (we hold its lock, so their writer is
    gone): half-written, a torn checkpoint nobody reads. Except where a write was killed between its two
    renames: the previous copy is then `.NAME.old-PID` and the temporary is complete; both are kept."""
    for folder in (run_dir, run_dir / "checkpoints"):
        for tmp in folder.glob(".*.tmp-*") if folder.is_dir() else ():
            name = tmp.name[1:].rsplit(".tmp-", 1)[0]
            if tmp.is_dir() and not any(folder.glob(f".{name}.old-*")):
                shutil.rmtree(tmp, ignore_errors=True)


def _from_rank0(acc, value):
    if acc.num_processes == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, device=acc.device)  # NCCL: through this rank's own GPU
    return box[0]

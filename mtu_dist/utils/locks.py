"""Inter-process locks on lock files (`fcntl.flock`): held for a process's life, released by the OS when
it dies however it dies (SIGKILL included), so a lock that can be taken proves its last holder is gone.

A lock file holds one line naming its holder (pid, host, start time, command), for the error message
of whoever finds it taken. Lock files are never deleted: deleting one that another process is about to
lock would let two processes hold "the" lock on two different files.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from mtu_dist.errors import UserError


class Held(Exception):
    """The lock is held by a live process; `holder` is what it wrote into the lock file."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def holder_line() -> str:
    cmd = " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:2]])
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}, {cmd}"


def try_lock(path: str | Path, *, record: bool = True) -> int:
    """Take the exclusive lock on `path` (created if absent) without waiting; returns its descriptor, to
    keep open for as long as the lock must be held. Raises Held naming the holder if it is taken."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"{path}: cannot create lock file ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd).split("\n")[0]  # the holder line; what follows is the holder's own notes
        os.close(fd)
        raise Held(holder or "another process") from None
    if record:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (holder_line() + "\n").encode(), 0)
    return fd


def wait_lock(path: str | Path) -> int:
    """Take the exclusive lock on `path`, waiting for its holder (for short critical sections)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""


OWNER = ".owner.lock"  # inside a staging folder: locked by the process that writes it


def make_staging(path: Path) -> int:
    """Create the staging folder `path` and lock it as ours; returns the lock to release when done."""
    path.mkdir()
    return try_lock(path / OWNER)


def remove_stale(folder: Path, pattern: str) -> list[Path]:
    """Remove the staging folders in `folder` matching `pattern` whose writer is gone: their owner lock can
    be taken (its holder died, even by SIGKILL), or, for a folder without one, the pid its name ends with
    no longer runs on this host. Folders of live writers (here or on another host) are left alone."""
    removed = []
    for p in sorted(folder.glob(pattern)) if folder.is_dir() else []:
        if p.is_dir() and _writer_gone(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _writer_gone(p: Path) -> bool:
    lock = p / OWNER
    if lock.is_file():
        try:
            fd = try_lock(lock, record=False)
        except (Held, UserError):
            return False
        release(fd)  # about to be removed with its folder
        return True
    # no owner lock: an older writer's folder, or one made a moment ago whose lock is not there yet
    pid = p.name.rsplit("-", 1)[-1]
    if not pid.isdigit() or time.time() - p.stat().st_mtime < 60:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False

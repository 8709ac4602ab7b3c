"""How a command ends whatever stops it: SIGTERM (a launcher stopping the other ranks, `kill`, a batch
system) and SIGHUP become an exception like Ctrl-C's KeyboardInterrupt, so `finally` blocks run, staging
folders are removed and MLflow runs end KILLED instead of staying RUNNING; worker processes leave
interrupts to their parent, which stops them and prints the one line."""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import contextmanager


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived. A BaseException, like KeyboardInterrupt: `except Exception` must not
    swallow it."""


def _raise(signum, _frame):
    raise Terminated(signal.Signals(signum).name)


def raise_on_termination() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)


def quiet_worker(*close_fds: int) -> None:
    """Pool initializer: Ctrl-C reaches the whole process group, but only the parent reacts (it stops the
    workers with SIGTERM, which ends them silently); a worker printing its own traceback would bury the
    one line that says what happened. `close_fds`: the parent's lock files, which a forked worker shares
    and, outliving a parent killed outright, would keep locked."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    for fd in close_fds:
        os.close(fd)


@contextmanager
def signals_ignored():
    """For the few lines that record how a command ended: a second Ctrl-C must not cut them short."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_child(argv: list, *, grace_s: float = 60, **kwargs) -> int:
    """subprocess.run for a child that records runs (a sweep cell under its launcher), except on an
    interrupt: subprocess.run would SIGKILL it at once, leaving its MLflow runs RUNNING and a launcher's
    ranks orphaned. Here the child gets the signal (SIGTERM, or SIGINT for Ctrl-C unless the terminal
    already sent it to the whole group) and `grace_s` to end cleanly before it is killed."""
    proc = subprocess.Popen(argv, **kwargs)
    try:
        return proc.wait()
    except BaseException as e:
        with signals_ignored():
            if not (isinstance(e, KeyboardInterrupt) and _ends_within(proc, 5)):
                proc.send_signal(signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM)
                if not _ends_within(proc, grace_s):
                    proc.kill()
                    proc.wait()
        raise


def _ends_within(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False

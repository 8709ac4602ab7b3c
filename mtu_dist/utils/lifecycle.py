"""How a command ends whatever stops it: SIGTERM (a launcher stopping the other ranks, `kill`, a batch
system) and SIGHUP become an exception like Ctrl-C's KeyboardInterrupt, so `finally` blocks run, staging
folders are removed and MLflow runs end KILLED instead of staying RUNNING; worker processes leave
interrupts to their parent, which stops them and prints the one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived. A BaseException, like KeyboardInterrupt: `except Exception` must not
    swallow it."""


def _raise(signum, _frame):
    raise Terminated(signal.Signals(signum).name)


def raise_on_termination() -> None:
    """SIGTERM and SIGHUP raise Terminated; and a stop that Python drops is sent again (`_resend_dropped`)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)
    sys.unraisablehook = _resend_dropped


def _resend_dropped(unraisable, _default=sys.__unraisablehook__) -> None:
    """A stop landing in a finalizer or a weakref callback (the garbage collector runs them at any line) is
    printed and dropped by Python, and the command would go on as if it had never been stopped. Send the
    signal again instead, from another thread, so that it arrives after the finalizer has returned (and
    again, should it land in another one)."""
    exc = unraisable.exc_value
    if isinstance(exc, KeyboardInterrupt):
        sig = signal.SIGINT
    elif isinstance(exc, Terminated) and exc.args and exc.args[0] in signal.Signals.__members__:
        sig = signal.Signals[exc.args[0]]
    else:
        _default(unraisable)
        return
    timer = threading.Timer(0.01, os.kill, (os.getpid(), sig))
    timer.daemon = True
    timer.start()


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


def quiet_loader_worker(_worker_id: int) -> None:
    """DataLoader worker_init_fn: as `quiet_worker`. It also replaces the recording handlers a worker
    forked inside `signals_deferred` inherits, so the parent's SIGTERM at shutdown still ends it."""
    quiet_worker()


@contextmanager
def signals_deferred():
    """Ctrl-C, SIGTERM and SIGHUP arriving inside are delivered on leaving. For constructors that an
    interrupt half-way leaves broken: torch's multi-worker DataLoader iterator, stopped before its
    `_shutdown` attribute exists, prints a traceback from its __del__ under the one line that says what
    happened. Only the main thread has signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {s: signal.signal(s, lambda signum, _frame: caught.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in dict.fromkeys(caught):  # once each, in arrival order: the handlers raise as they would have
            signal.raise_signal(s)


@contextmanager
def signals_ignored():
    """For the few lines that record how a command ended: a second Ctrl-C must not cut them short."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
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

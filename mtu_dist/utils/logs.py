"""What reaches the terminal: progress bars and the libraries' log lines (`mtu -q`, `mtu -v`).

mtu itself speaks through `print` (results, notes) and UserError (one line); `logging` is the libraries'
channel. By default their INFO and DEBUG lines are hidden, so MLflow's database set-up lines (and alembic's
migrations) never land in the middle of a progress bar; `-v` shows INFO, `-vv` DEBUG. `-q` also turns the
progress bars off. Warnings and errors are shown in every mode.

The choice travels in the environment (MTU_QUIET, MTU_VERBOSE), so ranks a launcher starts and commands a
sweep starts inherit it.
"""

from __future__ import annotations

import logging
import os
import sys

QUIET_ENV, VERBOSE_ENV = "MTU_QUIET", "MTU_VERBOSE"

# loggers that a library sets to WARNING itself (MLflow: "alembic" at import); their INFO needs asking for
_MIGRATIONS = ("alembic.runtime.migration",)


def quiet() -> bool:
    """`mtu -q`: no progress bars."""
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


def verbosity() -> int:
    """0 by default, 1 for `-v` (the libraries' INFO lines), 2 for `-vv` (DEBUG)."""
    try:
        return max(0, int(os.environ.get(VERBOSE_ENV, "0") or 0))
    except ValueError:
        return 0


def progress_bar(iterable=None, *, total: int | None = None, desc: str, main: bool | None = None, **kwargs):
    """A tqdm bar on stderr, as the training loop draws it; off on ranks other than 0 and under `-q`.
    `main` None: rank 0 of a launch (RANK), or a process no launcher started."""
    from tqdm import tqdm

    if main is None:
        main = os.environ.get("RANK", "0") == "0"
    return tqdm(
        iterable, total=total, desc=desc, disable=not main or quiet(), leave=False, dynamic_ncols=True, **kwargs
    )


def configure(*, quiet_flag: bool = False, verbose: int = 0) -> None:
    """Once per process, before any library is imported (some log while they are). Flags given on this
    command line win over what a parent command passed down in the environment."""
    if quiet_flag or verbose:
        _export(QUIET_ENV, "1" if quiet_flag else None)
        _export(VERBOSE_ENV, str(verbose) if verbose else None)
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity(), logging.DEBUG)
    if level > logging.INFO:
        # whoever's logger, and whatever level a library set on it at import (MLflow sets its own to INFO)
        logging.disable(logging.INFO)
    else:
        logging.disable(logging.NOTSET)
        logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for name in _MIGRATIONS:
            logging.getLogger(name).setLevel(level)
    # DeepSpeed makes its logger (printing to stdout) when first imported, mid-run; a filter set on it now stays
    logging.getLogger("DeepSpeed").addFilter(_accelerator_detection)


def _accelerator_detection(record: logging.LogRecord) -> bool:
    """DeepSpeed warns which accelerator it detected ("Setting accelerator to CPU ...") on every run that
    imports it: information, shown with -v only."""
    return record.filename != "real_accelerator.py" or verbosity() > 0


def _export(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value

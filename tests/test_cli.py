"""The command line teaches: every option shows its help and default, every command has examples that parse,
the method lists come from the registry, and what reaches the terminal follows -q / -v."""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_mtu

from mtu_dist.cli import build_parser
from mtu_dist.utils import logs

SKIPPED = (argparse._HelpAction, argparse._SubParsersAction)


def parsers(parser: argparse.ArgumentParser | None = None, name: str = "mtu"):
    """(name, parser) for `mtu` and every command and sub-command under it."""
    parser = parser or build_parser()
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def squeezed(text: str) -> str:
    return "".join(text.split())  # help text is wrapped wherever the terminal width says


def in_required_group(parser, action) -> bool:
    return any(g.required and action in g._group_actions for g in parser._mutually_exclusive_groups)


def shown(default) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, list):
        return " ".join(map(str, default))
    return str(default)


@pytest.mark.parametrize("name", [n for n, _ in parsers()])
def test_every_option_has_help_and_its_default(name):
    parser = dict(parsers())[name]
    page = squeezed(parser.format_help())
    for action in parser._actions:
        if isinstance(action, SKIPPED) or action.default is argparse.SUPPRESS:
            continue
        label = action.option_strings or action.dest
        assert action.help, f"{name} {label}: no help"
        text = parser._get_formatter()._expand_help(action)
        assert squeezed(text) in page, f"{name} {label}: {text!r} not in the help page"
        if not action.option_strings:
            continue  # a positional argument: given every time, no default
        if action.required:
            assert "(required)" in text, f"{name} {label}: {text!r}"
        elif in_required_group(parser, action):
            assert "is required" in text, f"{name} {label}: {text!r}"
        else:
            assert "(default: " in text, f"{name} {label}: no default in {text!r}"
            if "(default" not in action.help:  # not worded by hand: the value itself
                assert f"(default: {shown(action.default)})" in text, f"{name} {label}: {text!r}"


@pytest.mark.parametrize("name", [n for n, _ in parsers()])
def test_every_command_has_examples_that_parse(name):
    parser = dict(parsers())[name]
    assert parser.epilog and parser.epilog.startswith("examples:"), f"{name}: no examples"
    lines = [line.strip() for line in parser.epilog.splitlines()[1:] if line.strip()]
    assert 1 <= len(lines) <= 3, f"{name}: {lines}"
    for line in lines:
        for command in line.split("&&"):
            argv = shlex.split(command)
            assert argv[0] == "mtu", line
            args = build_parser().parse_args(argv[1:])  # an example that does not parse exits here
            assert callable(args.func)
            words = [w for w in argv if not w.startswith("-")]  # leaves the top-level flags (-q) out
            if name != "mtu":  # a command's examples run that command
                assert words[: len(name.split())] == name.split(), line


def test_method_choices_are_the_registry():
    from mtu_dist.methods import METHODS

    subs = dict(parsers())
    for name, option in (("mtu unlearn", "--method"), ("mtu tune", "--methods")):
        action = next(a for a in subs[name]._actions if option in a.option_strings)
        assert list(action.choices) == list(METHODS)
        assert ", ".join(METHODS) in " ".join(subs[name].format_help().split())


def test_top_level_help_does_not_import_torch():
    code = (
        "import sys; from mtu_dist.cli import build_parser; build_parser().format_help(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)


def test_unknown_method_is_one_line():
    proc = run_mtu("unlearn", "--method", "nosuch", "--request", "r.yaml", "--from", "nowhere", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("mtu: error: unknown method 'nosuch' (available: finetune, "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_version():
    proc = run_mtu("--version", check=True)
    assert proc.stdout == f"mtu {importlib.metadata.version('mtu_dist')}\n"


def _synth(out: Path, *flags, env=None):
    return run_mtu(
        *flags,
        "data",
        "synth",
        "--datasets",
        "synth-indoor",
        "--out",
        out,
        "--train",
        16,
        "--val",
        8,
        "--height",
        8,
        "--width",
        8,
        "--shard-size",
        4,
        "--workers",
        2,
        env=env,
        check=True,
        timeout=120,
    )


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_quiet_leaves_out_the_progress_bars(tmp_path):
    loud = _synth(tmp_path / "loud")
    assert "synth-indoor/train:" in loud.stderr and "shard/s" in loud.stderr, loud.stderr
    quiet = _synth(tmp_path / "quiet", "-q")
    inherited = _synth(tmp_path / "inherited", env={logs.QUIET_ENV: "1"})  # as a launched rank gets it
    for proc in (quiet, inherited):
        assert proc.stderr == ""
        assert "synth-indoor: tasks seg, depth, normal" in proc.stdout  # the result stays
        assert set(proc.stdout.splitlines()) <= set(loud.stdout.splitlines())
    assert _digests(tmp_path / "quiet") == _digests(tmp_path / "loud") == _digests(tmp_path / "inherited")


def test_deepspeed_accelerator_line_hidden_unless_verbose():
    record = logging.LogRecord(
        "DeepSpeed",
        logging.WARNING,
        "/x/deepspeed/accelerator/real_accelerator.py",
        213,
        "Setting accelerator to CPU.",
        None,
        None,
    )
    other = logging.LogRecord(
        "DeepSpeed", logging.WARNING, "/x/deepspeed/runtime/engine.py", 1, "a real warning", None, None
    )
    env = {k: v for k, v in os.environ.items() if k != logs.VERBOSE_ENV}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "environ", env)
        assert not logs._accelerator_detection(record) and logs._accelerator_detection(other)
        env[logs.VERBOSE_ENV] = "1"
        assert logs._accelerator_detection(record)


@pytest.mark.slow
def test_deepspeed_accelerator_line_from_the_real_library():
    code = (
        "from mtu_dist.utils.logs import configure; configure()\n"
        "from deepspeed.accelerator import get_accelerator; get_accelerator()"
    )
    for verbose, shown in (("", False), ("1", True)):
        env = {**os.environ, logs.VERBOSE_ENV: verbose, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True
        )
        assert ("Setting accelerator" in proc.stdout + proc.stderr) == shown, proc.stdout + proc.stderr


@pytest.mark.slow
def test_mlflow_database_lines_only_with_verbose(tmp_path):
    """A new sqlite store is created (MLflow's tables, alembic's migrations) before the unknown experiment
    is reported: the cheapest command that opens one."""
    for flags, shown in (((), False), (("-v",), True)):
        db = tmp_path / f"mlflow{len(flags)}.db"
        proc = run_mtu(
            *flags, "compare", "--experiment", "nope", "--tracking-uri", f"sqlite:///{db}", cwd=tmp_path, timeout=300
        )
        assert proc.returncode == 2 and "no such experiment" in proc.stderr, proc.stderr
        for needle in ("INFO mlflow.store.db.utils", "INFO alembic.runtime.migration"):
            assert (needle in proc.stderr) == shown, proc.stderr

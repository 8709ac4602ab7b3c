"""The tree is lint-clean and formatted: ruff, configured in pyproject.toml, over every Python file."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

RUFF = [sys.executable, "-m", "ruff"]


def test_ruff_lint_passes():
    p = subprocess.run([*RUFF, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def test_ruff_format_is_clean():
    p = subprocess.run(
        [*RUFF, "format", "--check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def test_ruff_sees_a_violation(tmp_path):
    """The check can fail: the same configuration rejects an unused import and an unformatted line."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx=1\n")
    cfg = ["--config", str(ROOT / "pyproject.toml")]
    lint = subprocess.run([*RUFF, "check", "--no-cache", *cfg, str(bad)], capture_output=True, text=True)
    fmt = subprocess.run([*RUFF, "format", "--check", "--no-cache", *cfg, str(bad)], capture_output=True, text=True)
    assert lint.returncode == 1 and "F401" in lint.stdout
    assert fmt.returncode == 1

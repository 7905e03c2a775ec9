"""The repository passes ruff (lint + import order) with the configuration in pyproject.toml."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_clean():
    if shutil.which("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e .[test])")
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "megatron_rcm", "kernels", "tools", "tests", "examples"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

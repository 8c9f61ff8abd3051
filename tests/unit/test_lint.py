"""The code passes the project's ruff configuration (pyproject.toml [tool.ruff]): no undefined names,
no unused imports or variables, no syntax or statement errors."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_ruff_passes():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "lowvram_ft", "tests", "scripts"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

"""The demo (`make run`) refuses wrong paths before it starts anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "infra" / "local" / "demo.py"


@pytest.mark.parametrize("flag", ["--checkpoint", "--tag-list", "--thresholds"])
def test_a_missing_path_is_refused_at_once(flag, tmp_path):
    missing = tmp_path / "nope.pth"
    done = subprocess.run([sys.executable, str(DEMO), flag, str(missing), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert done.returncode == 2
    message = " ".join(done.stderr.split())  # whatever box the terminal width draws
    assert f"Invalid value for {flag}: {missing} does not exist" in message
    assert "== stack" not in done.stdout  # nothing was started

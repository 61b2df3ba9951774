"""The import rules in pyproject.toml ([tool.importlinter]) hold, and `lint-imports` does catch a breach."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={"PATH": str(LINT.parent), "PYTHONPATH": str(cwd), "HOME": str(cwd)},
    )


def test_the_project_keeps_its_import_rules():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """The three packages and the contracts, copied: a breach is planted in the copy, never in the tree."""
    for package in ("jobs", "workers", "ramplus_core"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize(
    ("where", "line", "contract"),
    [
        ("ramplus_core/_probe.py", "import workers.settings\n", "Arrows point down"),
        ("ramplus_core/_probe.py", "import kafka\n", "ramplus_core is model code"),
        ("workers/vocab/_probe.py", "from workers.stream import fleet\n", "workers: each subsystem"),
        ("workers/errors_probe.py", "", None),  # a harmless new module breaks nothing
    ],
    ids=["core-imports-workers", "core-imports-kafka", "vocab-imports-stream", "harmless"],
)
def test_a_planted_breach_fails_the_check_and_names_its_contract(project_copy, where, line, contract):
    (project_copy / where).write_text(line)
    done = lint(project_copy)
    if contract is None:
        assert done.returncode == 0, done.stdout + done.stderr
        return
    assert done.returncode != 0
    broken = done.stdout[done.stdout.index("Broken contracts"):]
    assert contract in broken and "_probe" in broken, done.stdout


def test_the_readme_layout_names_every_package_and_only_real_ones():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    block = layout[layout.index("```") + 3:]
    block = block[:block.index("```")]
    named = set(re.findall(r"^  (\w+)/ ", block, re.MULTILINE))  # the indented entries: workers' packages
    packages = {p.parent.name for p in (ROOT / "workers").glob("*/__init__.py")}
    assert named == packages
    for top in ("cli.py", "cli_errors.py", "settings.py", "schemas.py", "errors.py", "logs.py", "metrics.py"):
        assert (ROOT / "workers" / top).exists() and top in block
    assert set((ROOT / "workers").glob("*.py")) - {ROOT / "workers" / t for t in ("__init__.py", "cli.py", "cli_errors.py", "settings.py", "schemas.py", "errors.py", "logs.py", "metrics.py")} == set()

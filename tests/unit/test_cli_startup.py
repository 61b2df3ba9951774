"""The command line answers at once (issue 17): `ramplus --help` and every command's `--help` import no
torch, timm, Ray, Kafka, boto3 or Redis; those are imported inside the commands that use them."""

from __future__ import annotations

import json
import subprocess
import sys
import time

HEAVY = ("torch", "timm", "open_clip", "ray", "kafka", "boto3", "botocore", "redis", "PIL", "numpy", "pyarrow", "httpx")
COMMANDS = [[], ["tag"], ["serve"], ["produce"], ["settings"], ["samples"], ["weights"], ["weights", "fetch"], ["weights", "list"],
            ["vocab"], ["vocab", "activate"], ["vocab", "build"], ["vocab", "publish"], ["data"]]

PROBE = """
import json, sys
from workers.cli import app
for args in json.loads(sys.argv[1]):
    try:
        app([*args, "--help"], standalone_mode=False)
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)), file=sys.stderr)
"""


def test_no_help_imports_a_heavy_module():
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(COMMANDS)], capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout and done.stdout.count("Usage:") == len(COMMANDS)  # each help was printed
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []


def best_of(code: str, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
        times.append(time.perf_counter() - started)
    return min(times)


def test_importing_the_cli_costs_about_what_its_small_libraries_cost():
    """A ratio, not a timer: the CLI's import against typer + structlog + pydantic-settings, the libraries it
    needs to print help, in the same test. Importing torch alone is many times that."""
    floor = best_of("import typer, structlog, pydantic_settings")
    cli = best_of("import workers.cli")
    assert cli < 2.0 * floor + 0.2, (cli, floor)

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


def test_help_at_80_columns_shows_every_option_and_env_var_whole():
    import typer.main
    from typer.testing import CliRunner

    from workers.cli import app

    # Duck-typed: typer builds its commands on its own copy of click's classes.
    def walk(command, path: list[str]):  # noqa: ANN001
        yield path, command
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                yield from walk(sub, [*path, name])

    runner = CliRunner()
    checked = 0
    for path, command in walk(typer.main.get_command(app), []):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert result.exit_code == 0, (path, result.output)
        assert "…" not in result.output and max(map(len, result.output.splitlines())) <= 80, path
        words = set(result.output.replace("[env var:", " ").replace("/", " ").split())
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden:
                for name in [*param.opts, *param.secondary_opts]:
                    assert name in result.output, (path, name)
                    checked += 1
                envvars = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
                for env in envvars if param.show_envvar else ():
                    assert any(env in w for w in words), (path, env)
    assert checked > 50  # every command's options were looked at

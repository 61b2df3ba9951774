"""Every command the README shows exists, with every option it shows: `--help` of each, walked from the text."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from workers.cli import app

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text().replace("\\\n", " ")  # continued lines as one command
_END = re.compile(r"`|#|&&|\||\)|\]|\"|\n|;|,")


def shown(prefix: str) -> list[str]:
    """Each place the README runs `prefix ...`: the text up to the end of its code span, line or comment."""
    out = []
    for match in re.finditer(re.escape(prefix), README):
        rest = README[match.end():]
        end = _END.search(rest)
        out.append(rest[: end.start() if end else len(rest)].strip())
    return out


def flags(text: str) -> set[str]:
    return {f.split("=")[0] for f in re.findall(r"(?<![\w-])--[a-z][\w-]*", text)}


def is_group(command: object) -> bool:
    return hasattr(command, "commands")  # typer's own (vendored) click: no isinstance against click.Group


def resolve(words: list[str]) -> tuple[object, list[str]]:
    command = typer.main.get_command(app)
    path: list[str] = []
    for word in words:
        if is_group(command) and word in command.commands:
            command = command.commands[word]
            path.append(word)
        else:
            break
    return command, path


def options(command) -> set[str]:  # noqa: ANN001
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")} | {"--help"}


RAMPLUS = sorted({s for s in shown("ramplus ") if s and re.match(r"[a-z]", s)})


def test_the_readme_shows_ramplus_commands():
    assert len(RAMPLUS) >= 15, RAMPLUS  # the walk below sees what the README shows


def problems(line: str) -> list[str]:
    """What is wrong with `ramplus <line>` as the CLI stands (nothing: an empty list)."""
    command, path = resolve(line.split())
    if not path:
        return [f"`ramplus {line}`: no such command"]
    if is_group(command):  # the README naming a group (`ramplus vocab`): it exists, and its --help works
        rest = line.split()[len(path):]
        return [f"`ramplus {line}`: {' '.join(path)} has no command {rest[0]!r}"] if rest else []
    unknown = flags(line) - options(command)
    return [f"`ramplus {line}`: {' '.join(path)} has no {sorted(unknown)}"] if unknown else []


@pytest.mark.parametrize("line", RAMPLUS)
def test_each_ramplus_command_and_option_in_the_readme_exists(line):
    assert problems(line) == []
    path = resolve(line.split())[1]
    help_text = CliRunner().invoke(app, [*path, "--help"])
    assert help_text.exit_code == 0, help_text.output


def test_the_walk_does_catch_what_the_cli_lacks():
    assert problems("serve --replicas 2") == []
    assert problems("serve --no-such-flag") and problems("vocab promote x") and problems("nonsense")


@pytest.mark.parametrize("script", ["jobs/retrain.py", "jobs/backfill.py", "infra/local/stack.py"])
def test_each_script_the_readme_runs_takes_the_options_it_shows(script):
    uses = shown(f"{script} ")
    assert uses, f"the README does not run {script}"
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for use in uses:
        unknown = {f for f in flags(use) if f not in done.stdout}
        assert not unknown, f"`{script} {use}`: --help does not know {sorted(unknown)}"


def test_make_says_what_it_installs_and_starts_before_it_does():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("setup:", "test:"):
        recipe = makefile.split("\n" + target, 1)[1].split("\n\n", 1)[0].splitlines()[1:]
        assert recipe[0].strip().startswith("@echo "), (target, recipe)  # before the minutes of silence, not after

"""Retrain RAM++ on the Ray cluster the fleet runs on.

    ray job submit --working-dir . -- python jobs/retrain.py --config retrain.toml

The settings file holds a `[train]` section (see README "Retraining") plus the usual `[s3]`/`[fetch]`;
environment variables (`RAMPLUS_TRAIN__EPOCHS=...`) override it. Submitting the same `run_name` again
resumes from its last checkpoint in `train.storage_path`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def main(
    config: Annotated[Optional[Path], typer.Option(help="TOML/JSON settings with a [train] section.")] = None,
    version: Annotated[Optional[str], typer.Option(help="Artifact version (default: a UTC timestamp).")] = None,
) -> None:
    from workers.logs import configure_logging
    from workers.train.retrain import run
    from workers.settings import Settings

    configure_logging()
    try:
        settings = Settings.load(config)
        result = run(settings, version=version)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(json.dumps({"artifact": result.artifact, "checkpoint": result.checkpoint_path, "metrics": result.metrics}, default=str))


if __name__ == "__main__":
    typer.run(main)

"""Tag every image under an S3 prefix with the fleet's model, resumably.

    ray job submit --working-dir . -- python jobs/backfill.py \\
        --input s3://photos/2026/ --output s3://ramplus-results/backfill/ [--vocab NAME[@VERSION]] [--checkpoint ...]

Options override the `[backfill]` section of `--config` (and RAMPLUS_BACKFILL__* variables); the model,
S3, Redis and fetch limits come from the same settings as the fleet's. Results land under
<output>/<model>-<fingerprint>/<vocab>@<version>/: a rerun with the same model and vocabulary version
skips the shards already written. Exit status: 0 done, 2 bad arguments, 130 interrupted (rerun to finish).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/backfill.py` from a working dir


def main(
    input: Annotated[Optional[str], typer.Option("--input", help="s3://bucket/prefix of the images.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="s3://bucket/prefix/ for results and error reports.")] = None,
    vocab: Annotated[Optional[str], typer.Option(help="NAME or NAME@VERSION from the Redis store (default: the model's own).")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="Official .pth, our model directory or an s3:// artifact.")] = None,
    include: Annotated[Optional[list[str]], typer.Option(help="Glob on keys relative to the prefix (repeatable).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="Glob of keys to leave out (repeatable).")] = None,
    max_bytes: Annotated[Optional[int], typer.Option(help="Larger objects are reported, not read.")] = None,
    shard_size: Annotated[Optional[int], typer.Option(help="Average images per result shard.")] = None,
    format: Annotated[Optional[str], typer.Option("--format", help="jsonl or parquet.")] = None,
    replicas: Annotated[Optional[int], typer.Option(help="Tagging actors (default: one per GPU, else 1).")] = None,
    decode_tasks: Annotated[Optional[int], typer.Option(help="Concurrent fetch + decode tasks.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML/JSON settings (fleet sections plus [backfill]).")] = None,
    progress: Annotated[bool, typer.Option(help="Progress bars on stderr.")] = True,
) -> None:
    from pydantic import ValidationError

    from workers.backfill.run import BackfillInterrupted, run_backfill
    from workers.logs import configure_logging
    from workers.settings import Settings

    configure_logging()
    given = {
        "input": input, "output": output, "vocab": vocab, "include": include, "exclude": exclude, "max_bytes": max_bytes,
        "shard_size": shard_size, "format": format, "replicas": replicas, "decode_tasks": decode_tasks,
    }
    try:
        settings = Settings.load(config).with_overrides(
            model__checkpoint=checkpoint, **{f"backfill__{k}": v for k, v in given.items()},
        )
        summary = run_backfill(settings, progress=progress)
    except BackfillInterrupted as exc:
        typer.echo(exc.summary.model_dump_json(), err=False)
        typer.echo(f"interrupted: {exc}", err=True)
        raise typer.Exit(130) from exc
    except (ValueError, FileNotFoundError, ValidationError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(summary.model_dump_json())


if __name__ == "__main__":
    typer.run(main)

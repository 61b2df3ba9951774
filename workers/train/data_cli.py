"""`ramplus data ...`: datasets for training and demos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Datasets: a synthetic image-tag-text set for tests and demos.")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def synth(
    out: Annotated[str, typer.Argument(help="Folder, or s3://bucket/prefix/ (endpoint from settings s3.endpoint_url).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images.")] = 1000,
    seed: Annotated[int, typer.Option(help="Dataset seed; image i depends only on (seed, i).")] = 0,
    size: Annotated[int, typer.Option(min=32, max=2048, help="Image side in pixels.")] = 128,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of images in the val split.")] = 0.2,
    generator: Annotated[int, typer.Option(help="Generator version: 2 (1-2 objects, circle/ring/bar) or 1 (1-4 objects, 5 rotated shapes).")] = 2,
    colours: Annotated[Optional[str], typer.Option(help="Comma-separated object colours to draw from (default: all).")] = None,
    config: Annotated[Optional[Path], typer.Option(envvar="RAMPLUS_CONFIG", help="TOML or JSON settings file (for S3).")] = None,
    create_bucket: Annotated[bool, typer.Option(help="Create the S3 bucket if it does not exist.")] = False,
) -> None:
    """Write coloured shapes on textured backgrounds with tags, captions and tag descriptions, plus a manifest."""
    from workers.logs import configure_logging

    configure_logging(level="WARNING")
    from botocore.exceptions import BotoCoreError, ClientError

    from ramplus_core.errors import RamPlusError
    from workers.train.synth_data import write_dataset

    s3 = None
    if out.startswith("s3://"):
        from pydantic import ValidationError

        from workers.settings import Settings

        try:
            s3 = Settings.load(config).s3
        except (ValidationError, FileNotFoundError, ValueError) as exc:
            _fail(f"bad settings: {exc}")
    try:
        if s3 is not None and create_bucket:
            from workers.io.s3 import ensure_bucket, s3_client

            ensure_bucket(s3_client(s3), out[len("s3://"):].split("/", 1)[0])
        summary = write_dataset(
            out, n=n, seed=seed, size=size, val_fraction=val_fraction, s3=s3, version=generator,
            colours=[c.strip() for c in colours.split(",") if c.strip()] if colours is not None else None,
        )
    except (RamPlusError, ValueError, OSError) as exc:
        _fail(str(exc))
    except (BotoCoreError, ClientError) as exc:
        _fail(f"writing to {out} failed: {type(exc).__name__}: {exc}")
    typer.echo(f"wrote {summary.n} images ({summary.train} train, {summary.val} val) and {summary.manifest}")

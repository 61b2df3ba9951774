"""The `ramplus` command line."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Optional
from urllib.parse import unquote, urlparse

import typer

from workers.logs import configure_logging
from workers.cli_errors import ExplainedErrors
from workers.io.local_files import image_files

app = typer.Typer(
    cls=ExplainedErrors, no_args_is_help=True, add_completion=False, help="RAM++ open-set image tagging.",
    rich_markup_mode=None,  # click's plain help wraps long option names and env vars; rich's tables cut them at 80 columns
    pretty_exceptions_show_locals=False,  # a traceback (--debug) must never print settings or secrets held in locals
)
weights_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Official checkpoints: fetch and verify.")
app.add_typer(weights_app, name="weights")


def _vocab_app() -> typer.Typer:
    from workers.vocab.cli import app as vocab_app

    return vocab_app


app.add_typer(_vocab_app(), name="vocab")


def _data_app() -> typer.Typer:
    from workers.train.data_cli import app as data_app

    return data_app


app.add_typer(_data_app(), name="data")


@app.callback()
def _settings_scheme(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", envvar="RAMPLUS_DEBUG", help="Show the traceback of a failure, not one line.")] = False,
) -> None:
    """RAM++ open-set image tagging."""
    from workers.settings import refuse_retired_env

    ctx.meta["ramplus.debug"] = debug
    try:
        refuse_retired_env()
    except ValueError as exc:
        _fail(str(exc))



def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def iter_image_paths(inputs: list[str]) -> Iterator[Path]:
    """Files as given, folders walked recursively for image suffixes, `file://` URIs as paths."""
    for item in inputs:
        if "://" in item:
            uri = urlparse(item)
            if uri.scheme != "file":
                _fail(f"{item}: `ramplus tag` reads local files and file:// URIs only (got {uri.scheme}://)")
            item = unquote(uri.path)
        path = Path(item)
        if path.is_dir():
            yield from image_files(path)
        else:
            yield path  # a missing file is reported per image, not as a crash


@app.command()
def tag(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or file:// URIs.")],
    checkpoint: Annotated[
        Optional[str], typer.Option(envvar="RAMPLUS_MODEL__CHECKPOINT", help="Official .pth, our model directory, or an s3:// artifact.")
    ] = None,
    vocab: Annotated[Optional[Path], typer.Option(help="Vocabulary file (.safetensors); default: the checkpoint's own.")] = None,
    tag_list: Annotated[Optional[Path], typer.Option(envvar="RAMPLUS_MODEL__TAG_LIST", help="Official tag list (ram_tag_list.txt) for an official checkpoint.")] = None,
    thresholds: Annotated[Optional[Path], typer.Option(envvar="RAMPLUS_MODEL__THRESHOLDS", help="Official per-tag thresholds (ram_tag_list_threshold.txt).")] = None,
    threshold: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="One threshold for every tag.")] = None,
    top_k: Annotated[Optional[int], typer.Option(min=1, help="At most this many tags per image.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    all_scores: Annotated[bool, typer.Option(help="Include every tag's score (JSON only).")] = False,
    variant: Annotated[Optional[str], typer.Option(help="swin_l or swin_b; inferred when omitted.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="224 or 384; inferred when omitted.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32, bf16 or fp16 weights.")] = "fp32",
    trust_checkpoint: Annotated[bool, typer.Option(help="Allow full unpickling of a checkpoint you trust.")] = False,
    max_pixels: Annotated[int, typer.Option(min=1)] = 64_000_000,
    max_bytes: Annotated[int, typer.Option(min=1)] = 50 * 1024 * 1024,
    fast: Annotated[bool, typer.Option(
        "--fast/--exact", help="--fast: the fleet's batched resize on the device (GPU speed; not bit-identical, "
        "README 'Preprocessing'); --exact: the official transform.",
    )] = False,
    compile_model: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the image encoder for a few batch sizes (pays off on a GPU for many images).",
    )] = False,
    decode: Annotated[str, typer.Option(
        envvar="RAMPLUS_MODEL__DECODE", help="With --fast: where JPEGs are decoded (auto = with the batch on a GPU, cpu, gpu).",
    )] = "auto",
) -> None:
    """Tag local images with RAM++ and print a table or JSON lines.

    Exit status: 0 all tagged, 1 some images could not be read (reported per image), 2 nothing could run.
    """
    configure_logging(level="WARNING")
    from ramplus_core import RamPlusError, Vocabulary, load_checkpoint
    from ramplus_core.registry import OFFICIAL_WEIGHTS_HELP

    if checkpoint is None:
        _fail(f"no checkpoint given. {OFFICIAL_WEIGHTS_HELP}")
    paths = list(iter_image_paths(inputs))
    if not paths:
        _fail("no images found in " + ", ".join(inputs))
    try:
        from workers.settings import Settings, batch_buckets
        from workers.stream.engine import TaggingEngine
        from workers.train.artifacts import ArtifactError, resolve_checkpoint

        try:
            local = resolve_checkpoint(checkpoint, Settings.load().s3)
        except ArtifactError as exc:
            _fail(str(exc))
        model = load_checkpoint(
            local, variant, image_size, vocabulary=Vocabulary.load(vocab) if vocab else None,
            tag_list=tag_list, thresholds=thresholds, trust_pickle=trust_checkpoint,
        )
        # The fleet's engine: the same decode -> batch -> model -> selection path as a replica and the backfill.
        engine = TaggingEngine(
            model, device=device, precision=precision, fast=fast, max_bytes=max_bytes, max_pixels=max_pixels,
            threshold=threshold, top_k=top_k, all_scores=all_scores, decode=decode,
            compile_buckets=batch_buckets(batch_size) if compile_model else None,
        )
    except (RamPlusError, ValueError) as exc:
        _fail(str(exc))
    failures = sum(_print_tags(engine, paths, batch_size, as_json=as_json))
    if failures:
        raise typer.Exit(1)


def _read_image(engine: Any, path: Path) -> Any:
    """What the engine's decode gives for a file, or the InputError that says why not (never raises)."""
    from workers.errors import ErrorKind, InputError

    try:
        size = path.stat().st_size
        if size > engine.decoder.max_bytes:  # refused before reading, as the fleet refuses a huge object
            return InputError(ErrorKind.TOO_LARGE, f"{path}: {size} bytes exceeds the {engine.decoder.max_bytes}-byte limit")
        data = path.read_bytes()
    except FileNotFoundError:
        return InputError(ErrorKind.NOT_FOUND, f"{path}: no such file")
    except OSError as exc:
        return InputError(ErrorKind.FETCH, f"{path}: cannot read ({exc.strerror or exc})")
    try:
        return engine.decode(data, str(path))
    except InputError as exc:
        return exc


def _print_tags(engine: Any, paths: list[Path], batch_size: int, *, as_json: bool) -> Iterator[bool]:
    """Tags each batch while threads read and decode the next one; yields, per image, whether it failed."""
    from workers.errors import InputError

    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="ramplus-read") as pool:
        pending = [pool.submit(_read_image, engine, p) for p in batches[0]]
        for n, batch in enumerate(batches):
            decoded = [f.result() for f in pending]
            pending = [pool.submit(_read_image, engine, p) for p in batches[n + 1]] if n + 1 < len(batches) else []
            good = [i for i, d in enumerate(decoded) if not isinstance(d, InputError)]
            tagged = engine.infer([decoded[i] for i in good]) if good else []
            for i, result in zip(good, tagged):
                decoded[i] = result
            for path, result in zip(batch, decoded):
                if isinstance(result, InputError):
                    if as_json:
                        typer.echo(json.dumps({"path": str(path), "error": {"kind": result.kind.value, "message": str(result)}}))
                    else:
                        typer.echo(f"skipped {result}", err=True)  # the message starts with the path
                    yield True
                    continue
                if as_json:
                    line = {"path": str(path), "tags": [{"tag": n, "score": v} for n, v in zip(result.names, result.values)],
                            "vocab": result.vocab, "model": engine.model_id}
                    if result.scores is not None:
                        line["scores"] = result.scores
                    typer.echo(json.dumps(line))
                else:
                    typer.echo(f"{path}\t" + (", ".join(f"{n} ({v:.2f})" for n, v in zip(result.names, result.values)) or "-"))
                yield False


def _settings(config: Optional[Path], **overrides: object):
    from pydantic import ValidationError

    from workers.settings import Settings

    try:
        return Settings.load(config).with_overrides(**overrides)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        _fail(f"bad settings: {exc}")


@app.command()
def serve(
    config: Annotated[Optional[Path], typer.Option(envvar="RAMPLUS_CONFIG", help="TOML or JSON settings file.")] = None,
    replicas: Annotated[Optional[int], typer.Option(min=1, help="Replica actors (default from settings).")] = None,
    min_replicas: Annotated[Optional[int], typer.Option(min=1, help="Lag scaling: fewest replicas (with --max-replicas).")] = None,
    max_replicas: Annotated[Optional[int], typer.Option(min=1, help="Lag scaling: most replicas (never more than partitions).")] = None,
    gpus_per_replica: Annotated[Optional[float], typer.Option(min=0.0)] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Join this Ray cluster (default: start a local one).")] = None,
    create_topics: Annotated[bool, typer.Option(help="Create the request and dead-letter topics if missing.")] = True,
) -> None:
    """Run the streaming fleet: Kafka -> RAM++ replicas on Ray -> S3, until SIGTERM or Ctrl-C.

    The first SIGTERM or Ctrl-C drains (finish what was polled, write, commit), stops the replicas, leaves
    the consumer group and exits 0; a second one exits at once.
    """
    configure_logging()
    settings = _settings(config, fleet__replicas=replicas, fleet__min_replicas=min_replicas, fleet__max_replicas=max_replicas,
                         fleet__gpus_per_replica=gpus_per_replica, fleet__ray_address=ray_address)
    if settings.model.checkpoint is None:
        from ramplus_core.registry import OFFICIAL_WEIGHTS_HELP

        _fail(f"no checkpoint configured (RAMPLUS_MODEL__CHECKPOINT or [model] checkpoint). {OFFICIAL_WEIGHTS_HELP}")
    from workers.errors import CodecUnavailable
    from workers.stream.fleet import Fleet, ReplicaStartFailed, ensure_topics
    from workers.stream.kafka_codecs import check_codecs
    from workers.stream.shutdown import ShutdownSignals

    try:  # here first, so that a missing codec package is one line and not a replica failing to start
        check_codecs()
    except CodecUnavailable as exc:
        _fail(str(exc))

    signals = ShutdownSignals()
    signals.install()
    if create_topics:
        try:
            ensure_topics(settings)
        except Exception as exc:
            _fail(f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {type(exc).__name__}: {exc}")
    fleet, failed = Fleet(settings), ""
    try:
        fleet.connect()
        signals.install()  # ray.init replaced SIGTERM's handler with one that aborts the process
        try:
            started = fleet.start(stop=signals.stop)
        except ReplicaStartFailed as exc:
            failed, started = str(exc), False
        if started:
            f = settings.fleet
            size = f"{len(fleet.actors)} replica(s)" + (f", scaling {f.min_replicas}..{f.max_replicas} by lag" if f.scales else "")
            typer.echo(f"serving {settings.kafka.topic} with {size}; metrics on :{f.metrics_port}", err=True)
            fleet.serve_forever(signals.stop)
    finally:
        fleet.stop()
    if failed:
        _fail(failed)
    if signals.received:
        typer.echo(f"stopped on {signals.received}: drained, committed, left the group", err=True)


@app.command()
def produce(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (recursive), s3://bucket/prefix/ or URIs.")],
    config: Annotated[Optional[Path], typer.Option(envvar="RAMPLUS_CONFIG", help="TOML or JSON settings file.")] = None,
    topic: Annotated[Optional[str], typer.Option(help="Default: settings kafka.topic.")] = None,
    vocab: Annotated[Optional[str], typer.Option(help="name or name@version for these requests.")] = None,
    id_prefix: Annotated[str, typer.Option(help="Prefix for the ids (sha256 of the URI).")] = "",
) -> None:
    """Publish one tag request per image URI to the topic; prints how many."""
    configure_logging(level="WARNING")
    from workers.stream.producer import iter_uris, make_producer, publish

    settings = _settings(config, kafka__topic=topic)
    s3 = None
    if any(i.startswith("s3://") for i in inputs):
        from workers.io.s3 import s3_client

        s3 = s3_client(settings.s3)
    try:
        uris = list(iter_uris(inputs, s3=s3))
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if not uris:
        _fail("nothing to publish: no images in " + ", ".join(inputs))
    try:
        producer = make_producer(settings.kafka)
        count = publish(producer, settings.kafka.topic, uris, vocab=vocab, id_prefix=id_prefix)
        producer.close()
    except Exception as exc:
        _fail(f"publishing to {settings.kafka.bootstrap_servers} failed: {type(exc).__name__}: {exc}")
    typer.echo(f"published {count} requests to {settings.kafka.topic}")


@app.command("settings")
def settings_cmd(
    show: Annotated[bool, typer.Option("--show", help="Print the effective settings as JSON instead of the table.")] = False,
    config: Annotated[Optional[Path], typer.Option(envvar="RAMPLUS_CONFIG", help="TOML or JSON settings file.")] = None,
) -> None:
    """The fleet's settings: a table of every RAMPLUS_ variable, or (--show) the effective values."""
    from workers.settings import settings_table

    if show:
        typer.echo(_settings(config).model_dump_json(indent=2))
    else:
        typer.echo(settings_table(), nl=False)


@app.command()
def samples(directory: Annotated[Path, typer.Argument(help="Where to write the JPEGs.")] = Path("var/photos")) -> None:
    """Write the real photos that ship with scikit-image (a cat, coffee, a rocket, ...) as JPEGs."""
    from workers.io.samples import sample_photos

    try:
        photos = sample_photos()
    except ImportError:
        _fail("scikit-image is not installed: pip install scikit-image (or the package's [dev] extra)")
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in photos.items():
        (directory / f"{name}.jpg").write_bytes(data)
    typer.echo(f"wrote {len(photos)} photos to {directory}")


@weights_app.command("fetch")
def weights_fetch(
    name: Annotated[str, typer.Argument(help="Registry name.")] = "ram_plus_swin_large_14m",
    cache_dir: Annotated[Optional[Path], typer.Option(help="Default: <model.cache_dir>/checkpoints (RAMPLUS_MODEL__CACHE_DIR, ~/.cache/ramplus).")] = None,
    url: Annotated[Optional[str], typer.Option(help="A mirror of the same file (checked against the registry's sha256).")] = None,
) -> None:
    """Download (or resume) a known checkpoint and verify its sha256; prints its path."""
    configure_logging(level="WARNING")
    from ramplus_core import RamPlusError
    from workers.io.download import fetch_checkpoint

    try:
        path = fetch_checkpoint(name, cache_dir=cache_dir, url=url, progress=sys.stderr.isatty())
    except RamPlusError as exc:
        _fail(str(exc))
    except Exception as exc:  # network errors after retries
        _fail(f"download failed: {type(exc).__name__}: {exc}")
    typer.echo(str(path))


@weights_app.command("list")
def weights_list() -> None:
    """Known checkpoints with their size and sha256."""
    from ramplus_core.registry import KNOWN_CHECKPOINTS

    for c in KNOWN_CHECKPOINTS.values():
        typer.echo(f"{c.name}\t{c.config}\t{c.size} bytes\tsha256 {c.sha256}\n  {c.description}\n  {c.url}")


if __name__ == "__main__":
    app()

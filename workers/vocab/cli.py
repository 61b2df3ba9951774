"""`ramplus vocab ...`: build vocabularies and manage their versions in Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Vocabularies: build, publish to Redis, activate, roll back.")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


RedisUrl = Annotated[Optional[str], typer.Option(envvar="RAMPLUS_REDIS__URL", help="Default: settings redis.url.")]


def _store(redis_url: str | None):
    import redis

    from workers.settings import Settings
    from workers.vocab.store import VocabStore

    url = redis_url or Settings.load().redis.url
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=30)
    try:
        client.ping()
    except Exception as exc:
        _fail(f"cannot reach Redis at {url.split('@')[-1]}: {type(exc).__name__}: {exc}")
    return VocabStore(client)


def _run(action):  # noqa: ANN001, ANN202
    from ramplus_core import RamPlusError

    try:
        return action()
    except (RamPlusError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))


def _local_copy(location: str) -> Path:
    """A local path for `location`; an s3:// object (endpoint from the settings) is downloaded first."""
    if not location.startswith("s3://"):
        return Path(location)
    import tempfile

    from workers.io.s3 import S3UriError, parse_s3_uri, s3_client
    from workers.settings import Settings

    try:
        bucket, key = parse_s3_uri(location, key_required=True)
    except S3UriError as exc:
        _fail(f"{location}: {exc}")
    target = Path(tempfile.mkdtemp(prefix="ramplus-vocab-")) / (key.rsplit("/", 1)[-1] or "descriptions.json")
    try:
        s3_client(Settings.load().s3).download_file(bucket, key, str(target))
    except Exception as exc:  # noqa: BLE001 - one clear line, whatever botocore raised
        _fail(f"cannot read {location}: {type(exc).__name__}: {exc}")
    return target


@app.command()
def build(
    out: Annotated[Path, typer.Argument(help="Vocabulary file to write (.safetensors).")],
    name: Annotated[str, typer.Option(help="Vocabulary name.")],
    version: Annotated[str, typer.Option(help="Version label.")] = "1",
    tags: Annotated[Optional[Path], typer.Option(help="Tag list, one per line (template 'a photo of a {tag}.').")] = None,
    descriptions: Annotated[Optional[str], typer.Option(help="Descriptions JSON: a list of {tag: [descriptions]}; a path or s3://bucket/key.")] = None,
    llm: Annotated[bool, typer.Option(help="Ask the LLM (RAMPLUS_LLM__*) for descriptions of --tags.")] = False,
    text_encoder: Annotated[str, typer.Option(help="open_clip model.")] = "ViT-B-16",
    text_weights: Annotated[Optional[str], typer.Option(envvar="RAMPLUS_TRAIN__TEXT_WEIGHTS", help="'openai' or a local weights file; 'none' = random (tests only).")] = "openai",
    threshold: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.68,
) -> None:
    """Embed tags and/or descriptions with the CLIP text encoder into a vocabulary file."""
    from ramplus_core import Vocabulary
    from ramplus_core.descriptions import load_descriptions
    from workers.vocab.describe import from_settings
    from ramplus_core.text_encoder import TextEncoder
    from ramplus_core.vocabulary import TAG_TEMPLATE, read_tag_list

    if tags is None and descriptions is None:
        _fail("give --tags, --descriptions or both")

    def make() -> Vocabulary:
        weights = None if text_weights in (None, "none") else text_weights
        encoder = TextEncoder(text_encoder, weights)
        encoder_id = f"{text_encoder}/{weights or 'random'}"
        items = load_descriptions(_local_copy(descriptions)) if descriptions else []
        known = {next(iter(item)) for item in items}
        missing = [t for t in read_tag_list(tags) if t not in known] if tags is not None else []
        if missing and llm:
            items += from_settings().describe_many(missing, progress=True)
        elif missing:  # bare tags: the template alone, as the official open-set path does without descriptions
            items += [{t: [TAG_TEMPLATE.format(tag=t)]} for t in missing]
        return Vocabulary.from_descriptions(
            items, encoder.encode, text_encoder=encoder_id, name=name, version=version, thresholds=threshold
        )

    vocabulary = _run(make)
    vocabulary.save(out)
    typer.echo(f"wrote {vocabulary.ref}: {len(vocabulary)} tags to {out}")


@app.command()
def publish(
    path: Annotated[Path, typer.Argument(help="Vocabulary file (.safetensors).")],
    name: Annotated[Optional[str], typer.Option(help="Default: the file's name.")] = None,
    version: Annotated[Optional[str], typer.Option(help="Default: the file's version.")] = None,
    dtype: Annotated[str, typer.Option(help="float16 (default, half the memory) or float32.")] = "float16",
    activate: Annotated[bool, typer.Option(help="Also make it the active version.")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """Store a new immutable version (never an overwrite)."""
    from ramplus_core import Vocabulary

    store = _store(redis_url)
    vocabulary = _run(lambda: Vocabulary.load(path))
    ref = _run(lambda: store.publish(vocabulary, name=name, version=version, dtype=dtype))
    typer.echo(f"published {ref}")
    if activate:
        n, v = ref.split("@")
        _run(lambda: store.activate(n, v))
        typer.echo(f"activated {ref}")


def _canary_report(ref: str, store, *, top: int = 20):  # noqa: ANN001, ANN202
    """The canary report of `ref` from its lines in S3 (settings s3.*) and the tag lists in Redis."""
    from workers.settings import Settings
    from workers.vocab.canary_results import S3CanarySink
    from workers.vocab.canary import CanaryLine, CanaryReport
    from workers.vocab.store import parse_ref

    name, version = parse_ref(ref)
    rows = S3CanarySink(Settings.load().s3).read(ref)
    lines = sorted((CanaryLine.model_validate(r) for r in rows), key=lambda line: str(line.ts))

    def tags_of(v: str | None) -> list[str] | None:
        try:
            return list(store.show(name, v)["metadata"]["tags"]) if v else None
        except Exception:  # noqa: BLE001 - deleted since: the report falls back to the tags that fired
            return None

    actives = {line.active for line in lines}
    active_tags = tags_of(parse_ref(next(iter(actives))).version) if len(actives) == 1 else None
    return CanaryReport.of(ref, lines, canary_tags=tags_of(version), active_tags=active_tags, top=top)


@app.command()
def activate(
    name: str,
    version: str,
    min_agreement: Annotated[Optional[float], typer.Option(
        min=0.0, max=1.0, envvar="RAMPLUS_REDIS__CANARY_MIN_AGREEMENT",
        help="Refuse unless the version's canary agreed at least this much on average (default: settings).")] = None,
    force: Annotated[bool, typer.Option(help="Activate even when the canary gate refuses.")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """Make NAME@VERSION the active version; every replica following NAME switches between two batches.

    If the version ran as a canary, its report is shown first; with a minimum agreement set, a version
    whose canary agreed less (or that never ran as one) is refused unless --force."""
    from workers.vocab.canary import CanaryControl

    store = _store(redis_url)
    control = CanaryControl(store)
    ref = f"{name}@{version}"
    report = None
    if min_agreement is not None or control.was_canaried(name, version):
        try:
            report = _canary_report(ref, store, top=10)
        except Exception as exc:  # noqa: BLE001 - S3 away or not configured: say so, the gate decides below
            typer.echo(f"canary results of {ref} unavailable: {type(exc).__name__}: {exc}", err=True)
    if report is not None and report.images:
        typer.echo(report.text())
    if min_agreement is not None:
        mean = report.agreement_mean if report is not None else None
        if mean is None or mean < min_agreement:
            why = "no canary results" if mean is None else f"canary agreement {mean:.3f} < {min_agreement}"
            if not force:
                _fail(f"not activating {ref}: {why} (run `ramplus vocab canary {ref}` first, or --force)")
            typer.echo(f"activating {ref} despite {why} (--force)", err=True)
    previous = _run(lambda: store.activate(name, version))
    canary = control.get(name)
    if canary is not None and canary.version == version:
        control.stop(name)  # active now: nothing left to compare it with
        typer.echo(f"stopped the canary of {ref}")
    typer.echo(f"activated {ref}" + (f" (was {previous})" if previous else ""))


@app.command()
def canary(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION to score alongside the active version (NAME with --stop).")],
    fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of requests scored by the canary too.")] = 0.05,
    stop: Annotated[bool, typer.Option("--stop", help="Stop NAME's canary.")] = False,
    dim: Annotated[int, typer.Option(help="The model's text dimension (512 for every RAM++ model).")] = 512,
    redis_url: RedisUrl = None,
) -> None:
    """Score a share of live requests with a candidate version too; its results go under s3.canary_prefix.

    The candidate is loaded and checked here first: one that cannot load is refused and nothing changes."""
    from workers.vocab.canary import CanaryControl
    from workers.vocab.store import parse_ref

    store = _store(redis_url)
    control = CanaryControl(store)
    if stop:
        name = _run(lambda: parse_ref(ref)).name
        stopped = control.stop(name)
        typer.echo(f"stopped the canary {name}@{stopped.version}" if stopped else f"{name} had no canary")
        return
    if fraction <= 0:
        _fail("--fraction must be above 0 (use --stop to stop a canary)")
    config = _run(lambda: control.start(ref, fraction, dim=dim))
    typer.echo(f"canary {ref} at fraction {config.fraction}: replicas following {ref.split('@')[0]} score it within a poll interval")


@app.command("canary-report")
def canary_report(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION of the canary.")],
    top: Annotated[int, typer.Option(min=1, help="Tags listed per section.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="The report as JSON.")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """Compare a canary with the active version on the requests it scored (from its results in S3)."""
    from ramplus_core import RamPlusError

    store = _store(redis_url)
    try:
        report = _canary_report(ref, store, top=top)
    except RamPlusError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - S3 away or refusing: one clear line, not a traceback
        _fail(f"cannot read the canary results of {ref} (settings s3.*): {type(exc).__name__}: {exc}")
    typer.echo(report.model_dump_json(indent=2) if as_json else report.text())


@app.command()
def rollback(name: str, redis_url: RedisUrl = None) -> None:
    """Re-activate the previously active version."""
    store = _store(redis_url)
    version = _run(lambda: store.rollback(name))
    typer.echo(f"rolled back {name} to {version}")


@app.command("list")
def list_(name: Annotated[Optional[str], typer.Argument()] = None, redis_url: RedisUrl = None) -> None:
    """Vocabulary names, or NAME's versions (* = active)."""
    store = _store(redis_url)
    if name is None:
        for n in store.names():
            typer.echo(f"{n}\tactive={store.active_version(n) or '-'}\tversions={len(store.versions(n))}")
        return
    active = store.active_version(name)
    for v in store.versions(name):
        typer.echo(("* " if v == active else "  ") + f"{name}@{v}")


@app.command()
def show(name: str, version: Annotated[Optional[str], typer.Argument()] = None, redis_url: RedisUrl = None) -> None:
    """A version's metadata as JSON (default: the active version)."""
    store = _store(redis_url)
    info = _run(lambda: store.show(name, version))
    info["metadata"] = {k: v for k, v in info["metadata"].items() if k != "tags"} | {"num_tags": len(info["metadata"]["tags"])}
    typer.echo(json.dumps(info, indent=2, default=str))


@app.command()
def delete(name: str, version: str, redis_url: RedisUrl = None) -> None:
    """Delete an inactive version."""
    store = _store(redis_url)
    _run(lambda: store.delete(name, version))
    typer.echo(f"deleted {name}@{version}")


@app.command("import-official")
def import_official(
    checkpoint: Annotated[Path, typer.Argument(help="Official ram_plus_swin_large_14m.pth.")],
    tag_list: Annotated[Path, typer.Option(help="ram_tag_list.txt")],
    thresholds: Annotated[Optional[Path], typer.Option(help="ram_tag_list_threshold.txt")] = None,
    name: str = "ram-official",
    version: str = "1",
    trust_checkpoint: Annotated[bool, typer.Option(help="Allow full unpickling of a checkpoint you trust.")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """Publish the official closed-set vocabulary (the checkpoint's label_embed + tag and threshold files)."""
    from ramplus_core import import_official_vocabulary

    store = _store(redis_url)
    vocabulary = _run(lambda: import_official_vocabulary(checkpoint, tag_list, thresholds, trust_pickle=trust_checkpoint))
    ref = _run(lambda: store.publish(vocabulary, name=name, version=version))
    typer.echo(f"published {ref}: {len(vocabulary)} tags")

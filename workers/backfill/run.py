"""Bulk backfill: tag every image under an S3 prefix with the fleet's model code, resumably.

The driver plans (`workers.backfill.plan`), then runs one Ray Data pipeline over what is not done yet:

    listed objects -> fetch + decode (CPU tasks, a thread pool each) -> tag (an actor pool, one replica per GPU)
                   -> the driver, which writes each shard when its last image arrives

The decode tasks and the replicas run exactly the fleet's code (`ImageDecoder`, `TaggingEngine`), so a
result line here is the fleet's result line for the same image, model and vocabulary. Unreadable objects
become lines of the shard's error report, never a failed job. A shard's result object is written after
its error report and is the only thing a rerun looks at: an interrupted job loses the shards in flight,
nothing else.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
import torch
from pydantic import BaseModel, Field

from ramplus_core import RamPlus
from workers.backfill.plan import (
    ERRORS,
    RESULTS,
    ListedObject,
    Selection,
    Shard,
    existing_shards,
    list_objects,
    plan_shards,
    require_bucket,
    run_prefix,
    select,
    split_s3_prefix,
    transient_error_count,
)
from workers.stream.engine import ImageDecoder, TaggingEngine
from workers.errors import ErrorKind, InputError, SourceUnavailable
from workers.schemas import TagResult, utc_now
from workers.settings import FetchSettings, Settings

log = structlog.get_logger("ramplus.backfill")


class BackfillError(BaseModel):
    """One line of a shard's error report."""

    uri: str
    kind: ErrorKind
    message: str
    size: int
    etag: str = ""
    ts: datetime = Field(default_factory=utc_now)


class BackfillSummary(BaseModel):
    """What a run did; printed at the end and written next to the shards as `summary.json`."""

    input: str
    output: str = Field(description="The run's folder: <output>/<model>-<fingerprint>/<vocab>/")
    model: str
    fingerprint: str
    vocab: str
    complete: bool = False
    listed: int = 0
    selected: int = 0
    excluded: int = 0
    shards: int = 0
    shards_skipped: int = 0
    shards_retried: int = Field(0, description="Done before, redone because their errors were transient")
    shards_written: int = 0
    images_written: int = Field(0, description="Images (tagged or reported) in the shards this run wrote")
    shards_superseded: int = Field(0, description="Shards of an earlier listing, removed after a complete run")
    images_skipped: int = 0
    images_tagged: int = 0
    errors: dict[str, int] = Field(default_factory=dict)
    seconds: float = 0.0
    images_per_s: float = Field(0.0, description="Tagged images / seconds since the pipeline started (start-up included)")
    images_per_s_steady: float = Field(0.0, description="Images / seconds from the first 10% of this run's images to its end")


def model_fingerprint(model: RamPlus) -> str:
    """sha256 over the weights (names, dtypes, shapes, bytes): the same checkpoint in any format, one id."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- the pipeline's stages (they run in Ray workers) -----------------------------------------------------------

_DECODERS: dict[str, tuple[Any, ImageDecoder, ThreadPoolExecutor]] = {}
_DECODERS_LOCK = threading.Lock()


def _decoder_for(config: str) -> tuple[Any, ImageDecoder, ThreadPoolExecutor]:
    """One fetcher, decoder and thread pool per worker process (Ray reuses task workers)."""
    with _DECODERS_LOCK:
        if config not in _DECODERS:
            from workers.io.fetchers import S3Fetcher
            from workers.settings import S3Settings

            cfg = json.loads(config)
            fetch = FetchSettings(**cfg["fetch"])
            decoder = ImageDecoder(cfg["image_size"], fast=cfg["fast"], max_bytes=fetch.max_bytes, max_pixels=fetch.max_pixels)
            _DECODERS[config] = (S3Fetcher(fetch, S3Settings(**cfg["s3"])), decoder, ThreadPoolExecutor(fetch.concurrency))
        return _DECODERS[config]


def fetch_and_decode(batch: Any, *, config: str) -> Any:
    """Ray Data stage: rows {key, shard, size, etag} -> + pixels (raw bytes, c/h/w, dtype) or error_kind/error."""
    import pyarrow as pa

    fetcher, decoder, pool = _decoder_for(config)
    bucket = json.loads(config)["bucket"]
    rows = batch.to_pylist()

    def one(row: dict[str, Any]) -> dict[str, Any]:
        uri = f"s3://{bucket}/{row['key']}"
        out = {**row, "pixels": b"", "c": 0, "h": 0, "w": 0, "dtype": "", "error_kind": "", "error": ""}
        try:
            pixels = decoder.decode(fetcher.fetch(uri), uri).contiguous()
        except InputError as exc:
            return out | {"error_kind": exc.kind.value, "error": str(exc)}
        except SourceUnavailable as exc:  # S3 away: a transient error, redone by a rerun (--retry-transient)
            return out | {"error_kind": ErrorKind.FETCH.value, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a bug of ours must not fail the job: report it with the image
            return out | {"error_kind": ErrorKind.INTERNAL.value, "error": f"{type(exc).__name__}: {exc}"}
        c, h, w = pixels.shape
        return out | {"pixels": pixels.numpy().tobytes(), "c": c, "h": h, "w": w, "dtype": str(pixels.dtype).removeprefix("torch.")}

    done = list(pool.map(one, rows))
    # pyarrow, not numpy: numpy's fixed-width bytes would drop the pixels' trailing zero bytes.
    return pa.Table.from_pylist(done, schema=_DECODED_SCHEMA())


def _DECODED_SCHEMA() -> Any:  # noqa: N802 - a schema constant, built lazily so importing needs no pyarrow
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()), ("shard", pa.string()), ("size", pa.int64()), ("etag", pa.string()),
        ("pixels", pa.binary()), ("c", pa.int32()), ("h", pa.int32()), ("w", pa.int32()), ("dtype", pa.string()),
        ("error_kind", pa.string()), ("error", pa.string()),
    ])


class BackfillTagger:
    """Ray Data stage (an actor per replica): decoded rows -> one JSON line each, a result or an error."""

    def __init__(self, config: str) -> None:
        from workers.stream.replica import load_model

        cfg = json.loads(config)
        settings = Settings(**cfg["settings"])
        model = load_model(settings)
        if model_fingerprint(model) != cfg["fingerprint"]:
            raise RuntimeError("the checkpoint changed since the backfill started: its weights differ from the driver's")
        if settings.model.device == "cpu" or not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(settings.backfill.cpus_per_replica)))
        self.bucket = cfg["bucket"]
        self.worker = f"{socket.gethostname()}/backfill-{os.getpid()}"
        f = settings.fetch
        self.engine = TaggingEngine(
            model, device=settings.model.device, precision=settings.model.precision, fast=settings.model.fast_preprocess,
            max_bytes=f.max_bytes, max_pixels=f.max_pixels,
        )
        if cfg["vocab"] is not None:
            self.engine.set_vocabulary(_vocab_store(settings).load(*cfg["vocab"]))
        if self.engine.vocabulary.ref != cfg["vocab_ref"]:
            raise RuntimeError(f"replica has vocabulary {self.engine.vocabulary.ref}, the job asked for {cfg['vocab_ref']}")

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.to_pylist()
        lines: list[str] = [""] * len(rows)
        good = [i for i, r in enumerate(rows) if not r["error_kind"]]
        for i, r in enumerate(rows):
            if r["error_kind"]:
                lines[i] = self._error(r, r["error_kind"], r["error"])
        if good:
            pixels = [self._pixels(rows[i]) for i in good]
            try:
                tagged = self.engine.infer(pixels)
            except Exception:  # noqa: BLE001 - find the one image that breaks the batch, tag the rest
                log.exception("backfill.batch_failed", images=len(good))
                tagged = []
                for p in pixels:
                    try:
                        tagged.extend(self.engine.infer([p]))
                    except Exception as exc:  # noqa: BLE001
                        tagged.append(exc)
            for i, tags in zip(good, tagged):
                r = rows[i]
                if isinstance(tags, Exception):
                    lines[i] = self._error(r, ErrorKind.INTERNAL.value, f"{type(tags).__name__}: {tags}")
                    rows[i]["error_kind"] = ErrorKind.INTERNAL.value
                    continue
                uri = self._uri(r)
                lines[i] = TagResult.of(
                    tags, id=uri, uri=uri, model=self.engine.model_id, worker=self.worker, meta={"size": r["size"], "etag": r["etag"]},
                ).model_dump_json()
        return pa.table({
            "shard": [r["shard"] for r in rows], "key": [r["key"] for r in rows],
            "error_kind": [r["error_kind"] for r in rows], "line": lines,
        })

    def _uri(self, row: dict[str, Any]) -> str:
        return f"s3://{self.bucket}/{row['key']}"

    def _error(self, row: dict[str, Any], kind: str, message: str) -> str:
        return BackfillError(uri=self._uri(row), kind=ErrorKind(kind), message=message, size=row["size"], etag=row["etag"]).model_dump_json()

    @staticmethod
    def _pixels(row: dict[str, Any]) -> torch.Tensor:
        dtype = getattr(torch, row["dtype"])
        return torch.frombuffer(bytearray(row["pixels"]), dtype=dtype).view(row["c"], row["h"], row["w"])


def _vocab_store(settings: Settings) -> Any:
    import redis

    from workers.vocab.store import VocabStore

    return VocabStore(redis.Redis.from_url(settings.redis.url, socket_timeout=60))


# -- the driver ------------------------------------------------------------------------------------------------


@dataclass
class ShardWriter:
    """Collects a shard's lines as they arrive (in any order) and writes it when the last one is in."""

    client: Any
    bucket: str
    run: str
    format: str
    expected: dict[str, int]
    lines: dict[str, list[tuple[str, bool, str]]] = field(default_factory=dict)
    written: int = 0
    images: int = 0

    def add(self, shard: str, key: str, ok: bool, line: str) -> bool:
        """True when this line completed its shard (which is then written)."""
        got = self.lines.setdefault(shard, [])
        got.append((key, ok, line))
        if len(got) < self.expected[shard]:
            return False
        self.write(shard, self.lines.pop(shard))
        return True

    def write(self, shard: str, rows: list[tuple[str, bool, str]]) -> None:
        rows.sort(key=lambda r: r[0])
        errors = [line for _, ok, line in rows if not ok]
        results = [line for _, ok, line in rows if ok]
        error_key = f"{self.run}{ERRORS}{shard}.jsonl"
        if errors:
            self.client.put_object(Bucket=self.bucket, Key=error_key, Body="\n".join(errors).encode() + b"\n")
        else:  # a redone shard may have had errors before
            self.client.delete_object(Bucket=self.bucket, Key=error_key)
        if self.format == "parquet":
            body, suffix = _parquet([json.loads(line) for line in results]), ".parquet"
        else:
            body, suffix = ("\n".join(results).encode() + b"\n") if results else b"", ".jsonl"
        # Last: a result object is the mark of a finished shard.
        self.client.put_object(Bucket=self.bucket, Key=f"{self.run}{RESULTS}{shard}{suffix}", Body=body)
        self.written += 1
        self.images += len(rows)


def _parquet(records: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("id", pa.string()), ("uri", pa.string()),
        ("tags", pa.list_(pa.struct([("tag", pa.string()), ("score", pa.float64())]))),
        ("vocab", pa.string()), ("model", pa.string()), ("ts", pa.string()), ("worker", pa.string()),
        ("size", pa.int64()), ("etag", pa.string()),
    ])
    rows = [{**{k: r[k] for k in ("id", "uri", "tags", "vocab", "model", "ts", "worker")}, **(r.get("meta") or {})} for r in records]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue()


@dataclass
class BackfillPlan:
    summary: BackfillSummary
    bucket: str
    out_bucket: str
    run: str
    shards: list[Shard]  # every shard of the listing
    todo: list[Shard]  # the ones this run does
    too_large: set[str]
    superseded: dict[str, list[str]]  # shard -> its objects in the output, from an earlier listing


def _resolve_vocab(settings: Settings, model: RamPlus) -> tuple[tuple[str, str] | None, str]:
    spec = settings.backfill.vocab
    if spec is None:
        assert model.vocabulary is not None
        return None, model.vocabulary.ref
    from workers.vocab.store import parse_ref

    name, version = parse_ref(spec)
    store = _vocab_store(settings)
    version = version or store.active_version(name)
    if version is None:
        raise ValueError(f"vocabulary {name!r} has no active version in Redis (ramplus vocab activate {name} VERSION)")
    store.load(name, version)  # validated here, before any replica starts (clear error, early)
    return (name, version), f"{name}@{version}"


def make_plan(settings: Settings, client: Any, model: RamPlus, fingerprint: str, vocab_ref: str, *, progress: bool) -> BackfillPlan:
    from tqdm import tqdm

    b = settings.backfill
    assert b.input and b.output
    bucket, prefix = split_s3_prefix(b.input, "--input")
    out_bucket, out_prefix = split_s3_prefix(b.output, "--output")
    run = run_prefix(out_prefix, model.config.key, fingerprint, vocab_ref)
    if out_bucket == bucket and (run.startswith(prefix) or not prefix):
        raise ValueError(f"--output {b.output} is inside --input {b.input}: results would be listed as images")
    require_bucket(client, bucket, "--input")
    require_bucket(client, out_bucket, "--output")
    summary = BackfillSummary(input=b.input, output=f"s3://{out_bucket}/{run}", model=model.config.key, fingerprint=fingerprint, vocab=vocab_ref)
    listing = tqdm(list_objects(client, bucket, prefix), desc="listing", unit="obj", disable=not progress, mininterval=1.0)
    selection: Selection = select(listing, prefix, b.include, b.exclude, b.max_bytes or settings.fetch.max_bytes)
    shards = plan_shards(selection.objects, b.shard_size)
    done = existing_shards(client, out_bucket, run, RESULTS)
    retry: set[str] = set()
    if b.retry_transient:
        for name, key in existing_shards(client, out_bucket, run, ERRORS).items():
            if name in done and transient_error_count(client.get_object(Bucket=out_bucket, Key=key)["Body"].read()):
                retry.add(name)
    todo = [s for s in shards if s.name not in done or s.name in retry]
    planned = {s.name for s in shards}
    superseded: dict[str, list[str]] = {}
    for folder in (RESULTS, ERRORS):
        for name, key in existing_shards(client, out_bucket, run, folder).items():
            if name not in planned:
                superseded.setdefault(name, []).append(key)
    summary.listed, summary.selected, summary.excluded = selection.listed, len(selection.objects), selection.excluded
    summary.shards = len(shards)
    summary.shards_skipped = len(shards) - len(todo)
    summary.shards_retried = len(retry & planned)
    summary.images_skipped = sum(len(s.objects) for s in shards if s.name in done and s.name not in retry)
    return BackfillPlan(summary, bucket, out_bucket, run, shards, todo, selection.too_large, superseded)


class _Interrupted(Exception):
    pass


class _StopRequest:
    """SIGINT / SIGTERM (`ray job stop`) handler: the first one asks the tagging loop to stop after the row in
    hand; a second one stops at once.

    Raising from the handler itself is not reliable: the signal lands wherever the main thread is, which
    while Ray Data iterates can be a `__del__` (an ObjectRef's), where Python prints the exception and drops
    it; CI saw a SIGINT'd backfill run on to completion. A flag checked by the loop cannot be dropped."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            raise _Interrupted(name)
        self.signal = name
        log.warning("backfill.stopping", signal=name, hint="stops after the image in hand; send it again to stop at once")

    def check(self) -> None:
        if self.signal is not None:
            raise _Interrupted(self.signal)


def run_backfill(settings: Settings, *, progress: bool | None = None) -> BackfillSummary:
    """Plan, tag what is not done, write shards as they complete; returns (and writes) the summary."""
    from tqdm import tqdm

    from workers.stream.replica import load_model
    from workers.io.s3 import s3_client

    b = settings.backfill
    if not b.input or not b.output:
        raise ValueError("a backfill needs --input s3://bucket/prefix and --output s3://bucket/prefix/")
    show = progress if progress is not None else True
    started = time.monotonic()
    model = load_model(settings)
    fingerprint = model_fingerprint(model)
    vocab, vocab_ref = _resolve_vocab(settings, model)
    client = s3_client(settings.s3)
    plan = make_plan(settings, client, model, fingerprint, vocab_ref, progress=show)
    summary = plan.summary
    errors: Counter[str] = Counter()
    log.info("backfill.plan", **summary.model_dump(include={"input", "output", "listed", "selected", "shards", "shards_skipped", "shards_retried"}),
             shards_todo=len(plan.todo))

    # The input bucket is trusted as the operator named it; nothing else is fetched.
    fetch = settings.fetch.model_copy(deep=True)
    if not fetch.bucket_allowed(plan.bucket):
        fetch.s3_buckets = [*fetch.s3_buckets, plan.bucket]
    writer = ShardWriter(client, plan.out_bucket, plan.run, b.format, {s.name: len(s.objects) for s in plan.todo})
    items: list[dict[str, Any]] = []
    for shard in plan.todo:
        for obj in shard.objects:
            if obj.key in plan.too_large:
                limit = b.max_bytes or settings.fetch.max_bytes
                line = BackfillError(
                    uri=f"s3://{plan.bucket}/{obj.key}", kind=ErrorKind.TOO_LARGE, size=obj.size, etag=obj.etag,
                    message=f"{obj.size} bytes, over the {limit}-byte limit (RAMPLUS_BACKFILL__MAX_BYTES); not read",
                ).model_dump_json()
                errors[ErrorKind.TOO_LARGE.value] += 1
                writer.add(shard.name, obj.key, False, line)
            else:
                items.append({"key": obj.key, "shard": shard.name, "size": obj.size, "etag": obj.etag})

    bar = tqdm(total=len(items), desc="tagging", unit="img", disable=not show, mininterval=1.0, smoothing=0.1)
    stop = _StopRequest()
    handled = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; `ray job stop` sends SIGTERM
    previous = {sig: signal.getsignal(sig) for sig in handled}
    if threading.current_thread() is threading.main_thread():
        for sig in handled:
            signal.signal(sig, stop)
    tag_started = time.monotonic()
    processed, tenth, steady_from = 0, max(1, len(items) // 10), (0, tag_started)
    try:
        if items:
            for row in _pipeline(settings, plan, fetch, model, fingerprint, vocab, vocab_ref, items):
                processed += 1
                if processed == tenth:
                    steady_from = (processed, time.monotonic())
                ok = not row["error_kind"]
                if ok:
                    summary.images_tagged += 1
                else:
                    errors[row["error_kind"]] += 1
                writer.add(row["shard"], row["key"], ok, row["line"])
                bar.update(1)
                stop.check()
        summary.complete = True
    except (KeyboardInterrupt, _Interrupted):
        log.warning("backfill.interrupted", shards_written=writer.written, shards_unfinished=len(plan.todo) - writer.written)
    finally:
        bar.close()
        if threading.current_thread() is threading.main_thread():
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if summary.complete:
        for keys in plan.superseded.values():
            for key in keys:
                client.delete_object(Bucket=plan.out_bucket, Key=key)
        summary.shards_superseded = len(plan.superseded)
    summary.shards_written, summary.images_written = writer.written, writer.images
    summary.errors = dict(sorted(errors.items()))
    summary.seconds = round(time.monotonic() - started, 3)
    tag_seconds = time.monotonic() - tag_started
    summary.images_per_s = round(summary.images_tagged / tag_seconds, 2) if tag_seconds > 0 else 0.0
    steady_seconds = time.monotonic() - steady_from[1]
    if processed > steady_from[0] and steady_seconds > 0:
        summary.images_per_s_steady = round((processed - steady_from[0]) / steady_seconds, 2)
    client.put_object(Bucket=plan.out_bucket, Key=f"{plan.run}summary.json", Body=summary.model_dump_json(indent=2).encode())
    log.info("backfill.done", **summary.model_dump(exclude={"input", "output", "fingerprint"}))
    if not summary.complete:
        raise BackfillInterrupted(summary)
    return summary


class BackfillInterrupted(Exception):
    def __init__(self, summary: BackfillSummary) -> None:
        super().__init__("backfill interrupted: finished shards are kept, a rerun does the rest")
        self.summary = summary


def _pipeline(
    settings: Settings, plan: BackfillPlan, fetch: FetchSettings, model: RamPlus, fingerprint: str,
    vocab: tuple[str, str] | None, vocab_ref: str, items: list[dict[str, Any]],
) -> Iterator[dict[str, Any]]:
    import ray
    import ray.data

    b = settings.backfill
    if not ray.is_initialized():
        ray.init(address=settings.fleet.ray_address, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours is the one that counts images
    ctx.execution_options.preserve_order = True  # shards complete in order: few partial shards held here
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and settings.model.device != "cpu"
    replicas = b.replicas or (gpus if use_gpu else 1)
    decode_config = json.dumps({
        "fetch": fetch.model_dump(mode="json"), "s3": settings.s3.model_dump(mode="json"), "bucket": plan.bucket,
        "image_size": model.config.image_size, "fast": settings.model.fast_preprocess,
    }, sort_keys=True)
    tag_config = json.dumps({
        "settings": settings.model_dump(mode="json"), "fingerprint": fingerprint, "bucket": plan.bucket,
        "vocab": list(vocab) if vocab else None, "vocab_ref": vocab_ref,
    })
    decode_batch = max(8, min(64, b.batch_size))
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // decode_batch, 10_000)))
    ds = ds.map_batches(
        # Its own CPU request (not the replicas'): Ray Data would otherwise fuse decoding into the actors,
        # where it runs in turn with the forward pass instead of beside it.
        fetch_and_decode, fn_kwargs={"config": decode_config}, batch_size=decode_batch, batch_format="pyarrow", num_cpus=b.decode_cpus,
        compute=ray.data.TaskPoolStrategy(size=b.decode_tasks) if b.decode_tasks else None, udf_modifying_row_count=False,
    )
    ds = ds.map_batches(
        BackfillTagger, fn_constructor_kwargs={"config": tag_config}, batch_size=b.batch_size, batch_format="pyarrow",
        num_cpus=b.cpus_per_replica, num_gpus=1 if use_gpu else 0, compute=ray.data.ActorPoolStrategy(size=replicas), udf_modifying_row_count=False,
    )
    log.info("backfill.pipeline", images=len(items), replicas=replicas, gpus_per_replica=1 if use_gpu else 0, decode_tasks=b.decode_tasks)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        yield from batch.to_pylist()


__all__ = [
    "BackfillError", "BackfillInterrupted", "BackfillSummary", "BackfillTagger", "ListedObject", "ShardWriter",
    "fetch_and_decode", "make_plan", "model_fingerprint", "run_backfill",
]

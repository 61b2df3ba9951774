"""Bulk backfill: tag every image under an S3 prefix with the fleet's model code, resumably.

The driver (this module) plans (`workers.backfill.plan`), then runs one Ray Data pipeline over what is not
done yet, with the stages of `workers.backfill.stages`, and writes what `workers.backfill.report` defines:

    listed objects -> fetch + decode (CPU tasks, a thread pool each) -> tag (an actor pool, one replica per GPU)
                   -> the driver, which writes each shard when its last image arrives

The decode tasks and the replicas run exactly the fleet's code (`ImageDecoder`, `TaggingEngine`), so a
result line here is the fleet's result line for the same image, model and vocabulary. Unreadable objects
become lines of the shard's error report, never a failed job. A shard's result object is written after
its error report and is the only thing a rerun looks at: an interrupted job loses the shards in flight,
nothing else.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from ramplus_core import RamPlus
from workers.backfill.plan import (
    ERRORS,
    RESULTS,
    Selection,
    Shard,
    existing_shards,
    list_objects,
    plan_shards,
    require_bucket,
    run_prefix,
    selection_id,
    select,
    split_s3_prefix,
    transient_error_count,
)
from workers.backfill.report import BackfillError, BackfillSummary, ShardWriter
from workers.stream.engine import defers_jpegs
from workers.backfill.stages import BackfillTagger, vocab_store, fetch_and_decode, model_fingerprint
from workers.errors import ErrorKind
from workers.settings import FetchSettings, Settings

log = structlog.get_logger("ramplus.backfill")


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
    store = vocab_store(settings)
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
    run = run_prefix(out_prefix, model.config.key, fingerprint, vocab_ref, selection_id(f"s3://{bucket}/{prefix}", b.include, b.exclude, b.format))
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
    from workers.io.s3 import s3_client
    from workers.stream.replica import load_model

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
    log.info("backfill.plan", **plan.summary.model_dump(include={"input", "output", "listed", "selected", "shards", "shards_skipped", "shards_retried"}),
             shards_todo=len(plan.todo))
    writer = ShardWriter(client, plan.out_bucket, plan.run, b.format, {s.name: len(s.objects) for s in plan.todo})
    errors: Counter[str] = Counter()
    items = _report_too_large(plan, writer, errors, limit=b.max_bytes or settings.fetch.max_bytes)
    rows = _pipeline(settings, plan, _trusting(settings.fetch, plan.bucket), model, fingerprint, vocab, vocab_ref, items)
    rate = _tag(rows if items else iter(()), len(items), plan, writer, errors, progress=show)
    return _finish(client, plan, writer, errors, rate, started)


def _trusting(fetch: FetchSettings, bucket: str) -> FetchSettings:
    """The fetch settings plus the input bucket: it is trusted as the operator named it; nothing else is fetched."""
    fetch = fetch.model_copy(deep=True)
    if not fetch.bucket_allowed(bucket):
        fetch.s3_buckets = [*fetch.s3_buckets, bucket]
    return fetch


def _report_too_large(plan: BackfillPlan, writer: ShardWriter, errors: Counter[str], *, limit: int) -> list[dict[str, Any]]:
    """Objects the listing showed too large go straight to their shard's error report (never read); returns
    the rest, as the pipeline's input rows."""
    items: list[dict[str, Any]] = []
    for shard in plan.todo:
        for obj in shard.objects:
            if obj.key in plan.too_large:
                line = BackfillError(
                    uri=f"s3://{plan.bucket}/{obj.key}", kind=ErrorKind.TOO_LARGE, size=obj.size, etag=obj.etag,
                    message=f"{obj.size} bytes, over the {limit}-byte limit (RAMPLUS_BACKFILL__MAX_BYTES); not read",
                ).model_dump_json()
                errors[ErrorKind.TOO_LARGE.value] += 1
                writer.add(shard.name, obj.key, False, line)
            else:
                items.append({"key": obj.key, "shard": shard.name, "size": obj.size, "etag": obj.etag})
    return items


@dataclass
class _Rate:
    """When tagging started, how many rows came back, and (rows, time) once the first tenth was in."""

    started: float
    processed: int = 0
    steady_from: tuple[int, float] = (0, 0.0)


@contextlib.contextmanager
def _stop_requests() -> Iterator[_StopRequest]:
    """SIGINT and SIGTERM (`ray job stop`) ask the tagging loop to stop, while it runs (main thread only)."""
    stop = _StopRequest()
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in handled}
    main = threading.current_thread() is threading.main_thread()
    if main:
        for sig in handled:
            signal.signal(sig, stop)
    try:
        yield stop
    finally:
        if main:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _tag(
    rows: Iterator[dict[str, Any]], total: int, plan: BackfillPlan, writer: ShardWriter, errors: Counter[str], *, progress: bool,
) -> _Rate:
    """Hand each row to its shard (written when complete); sets `summary.complete` unless interrupted."""
    from tqdm import tqdm

    summary = plan.summary
    rate = _Rate(started=time.monotonic())
    rate.steady_from = (0, rate.started)
    tenth = max(1, total // 10)
    bar = tqdm(total=total, desc="tagging", unit="img", disable=not progress, mininterval=1.0, smoothing=0.1)
    try:
        with _stop_requests() as stop:
            for row in rows:
                rate.processed += 1
                if rate.processed == tenth:
                    rate.steady_from = (rate.processed, time.monotonic())
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
    return rate


def _finish(client: Any, plan: BackfillPlan, writer: ShardWriter, errors: Counter[str], rate: _Rate, started: float) -> BackfillSummary:
    """Remove what a complete run superseded, count, write `summary.json`; raises if the run was interrupted."""
    summary = plan.summary
    if summary.complete:
        for keys in plan.superseded.values():
            for key in keys:
                client.delete_object(Bucket=plan.out_bucket, Key=key)
        summary.shards_superseded = len(plan.superseded)
    summary.shards_written, summary.images_written = writer.written, writer.images
    summary.errors = dict(sorted(errors.items()))
    now = time.monotonic()
    summary.seconds = round(now - started, 3)
    tag_seconds = now - rate.started
    summary.images_per_s = round(summary.images_tagged / tag_seconds, 2) if tag_seconds > 0 else 0.0
    steady_rows, steady_at = rate.steady_from
    if rate.processed > steady_rows and now - steady_at > 0:
        summary.images_per_s_steady = round((rate.processed - steady_rows) / (now - steady_at), 2)
    client.put_object(Bucket=plan.out_bucket, Key=f"{plan.run}summary.json", Body=summary.model_dump_json(indent=2).encode())
    log.info("backfill.done", **summary.model_dump(exclude={"input", "output", "fingerprint"}))
    if not summary.complete:
        raise BackfillInterrupted(summary)
    return summary


def quiet_ray_data(*, verbose: bool) -> None:
    """Ray Data's INFO lines (execution plans, log paths) only with RAMPLUS_LOG__LEVEL=DEBUG; and never its
    warning that progress bars are off: they are, on purpose (our own bar counts images)."""
    import logging

    logging.getLogger("ray.data").setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


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
    quiet_ray_data(verbose=settings.log.level.upper() == "DEBUG")
    ctx.execution_options.preserve_order = True  # shards complete in order: few partial shards held here
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and settings.model.device != "cpu"
    replicas = b.replicas or (gpus if use_gpu else 1)
    decode_config = json.dumps({
        "fetch": fetch.model_dump(mode="json"), "s3": settings.s3.model_dump(mode="json"), "bucket": plan.bucket,
        "image_size": model.config.image_size, "fast": settings.model.fast_preprocess,
        # The replicas' engine decodes these JPEGs with their batch (nvJPEG): the tasks only check them.
        "defer_jpegs": defers_jpegs(settings.model.decode, fast=settings.model.fast_preprocess, on_cuda=use_gpu),
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


__all__ = ["BackfillInterrupted", "BackfillPlan", "make_plan", "run_backfill"]

"""The stream pipeline: poll -> fetch + decode (threads) -> micro-batch -> model -> write -> commit.

One pipeline per replica. Five kinds of thread, so that no stage waits on another:

- the polling thread (the caller of `run`) owns the source and the offset tracker: it polls, pauses and
  resumes partitions to bound memory, and commits (kafka-python's consumer is not thread-safe: only this
  thread calls it). The Kafka source's rebalance listener runs on kafka-python's IO thread while this
  thread is blocked inside `poll`, and drains through the non-blocking `drain_left` / `end_drain`;
- `fetch_concurrency` worker threads parse, fetch and decode; a request that can never succeed goes to
  the dead-letter sink from here;
- one staging thread forms batches (up to `batch_size`, waiting at most `max_batch_wait_s` for a
  partial one) and stages each (`engine.stage`: JPEGs decoded with their batch, resized, on the device)
  while one inference thread runs the model on the batch before it;
- one writer thread writes each batch's results (one object per partition) and reports them done.

A record's offset is committed only after its result was written or its dead letter acknowledged, and
only once every record before it in its partition is done too (`OffsetTracker`). Nothing is lost: a
crash replays from the last commit, and the sink makes a replay overwrite rather than duplicate.

Nothing is written twice either, which needs two more rules, because the next owner of a partition
cleans up past the committed offset once, when it gets the partition: results are written only while
the source says this replica still owns its partitions (`write_allowed`: a Kafka member evicted while
it could not reach the broker must not keep writing), and once a partition is forgotten no result
polled before that is written any more (`forget` waits for a write in progress, the writer re-checks
before every attempt). A write checked before it starts can still land late (the process frozen
between the check and the PUT, or the PUT held up): ownership is checked again when the write has been
answered, and a write answered only after the lease ran out is withdrawn and tried again, since it may
have landed after the next owner's cleanup.

With a canary vocabulary in the engine (workers/vocab/canary.py), the inference thread has the chosen rows
of each batch scored by it too and the writer writes their canary lines after the batch's results
(`CanaryWriter`, best effort: it never holds a write or a commit).

At about 510 lines this file is longer than the house's 400 on purpose: it is one class whose four threads
share one lock, one offset tracker and the rules above, and the argument that nothing is lost or written
twice has to be read in one place. What it needs of the world is in workers/stream/ports.py.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception_type, retry_if_not_exception_type, wait_exponential

from ramplus_core.tagging import ImageTags
from workers.errors import DeadLetterRefused, ErrorKind, InputError, SourceUnavailable
from workers.metrics import ReplicaMetrics
from workers.stream.offsets import OffsetTracker
from workers.stream.ports import CanarySink, DeadLetterSink, Engine, Fetcher, ResultSink, Source
from workers.stream.records import Record, TopicPartition
from workers.schemas import DEAD_LETTER_ORIGINAL_BYTES, MAX_REQUEST_BYTES, DeadLetter, ResultLine, TagRequest, TagResult
from workers.stream.canary_writer import CanaryWriter
from workers.vocab.canary import CanaryBatch

log = structlog.get_logger("ramplus.pipeline")


@dataclass(slots=True)
class Prepared:
    record: Record
    request: TagRequest
    pixels: Any  # what the engine's decode gave: pixels, or a checked JPEG that stage decodes with its batch
    polled_at: float
    epoch: int
    vocab: Any = None  # what the engine's vocabulary_for gave; None: the active vocabulary at batch time


class PipelineStopped(Exception):
    """Raised inside a retry loop when the pipeline stops before the write succeeded."""


class StreamPipeline:
    def __init__(
        self,
        source: Source,
        sink: ResultSink,
        dead_letters: DeadLetterSink,
        engine: Engine,
        fetcher: Fetcher,
        *,
        worker: str,
        batch_size: int = 16,
        max_batch_wait_s: float = 0.05,
        max_in_flight: int = 256,
        fetch_concurrency: int = 8,
        drain_timeout_s: float = 60.0,
        retry_wait_s: float = 0.5,
        stuck_after_s: float = 120.0,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        dead_letter_original_bytes: int = DEAD_LETTER_ORIGINAL_BYTES,
        metrics: ReplicaMetrics | None = None,
        canary_sink: CanarySink | None = None,
    ) -> None:
        self.source, self.sink, self.dead_letters = source, sink, dead_letters
        self.engine, self.fetcher = engine, fetcher
        self.worker = worker
        self.batch_size, self.max_batch_wait_s = batch_size, max_batch_wait_s
        self.max_in_flight = max_in_flight
        self.drain_timeout_s, self.retry_wait_s = drain_timeout_s, retry_wait_s
        self.stuck_after_s = stuck_after_s
        self.max_request_bytes, self.dead_letter_original_bytes = max_request_bytes, dead_letter_original_bytes
        self.metrics = metrics or ReplicaMetrics()
        # None: canaries are not scored here, whatever the engine holds.
        self.canary = CanaryWriter(canary_sink, worker, self.metrics) if canary_sink is not None else None
        self.tracker = OffsetTracker()
        self._pool = ThreadPoolExecutor(fetch_concurrency, thread_name_prefix="ramplus-fetch")
        self._ready: queue.Queue[Prepared] = queue.Queue()
        self._to_write: queue.Queue[tuple[list[tuple[Prepared, ImageTags | InputError]], CanaryBatch | None] | None] = queue.Queue(maxsize=4)
        self._finished: queue.SimpleQueue[tuple[TopicPartition, int, int]] = queue.SimpleQueue()
        self._stopping = threading.Event()  # no more retries of writes: give up and leave offsets uncommitted
        self._flush = threading.Event()  # draining: do not wait for partial batches
        self._paused = False
        # Held by the writer around each write attempt, and by `forget`: after `forget` returns, no result
        # of a forgotten partition can still land in the sink.
        self._write_lock = threading.Lock()
        self._fatal: BaseException | None = None
        self._threads: list[threading.Thread] = []
        # Where each record in flight is (prepare, tag, write, dead_letter): what a stuck-record report names.
        # Written by the stage threads, read by the polling thread; single dict operations, atomic in CPython.
        self._stage: dict[tuple[TopicPartition, int], str] = {}
        self._reported_stuck: set[tuple[TopicPartition, int]] = set()
        self.stats = {"polled": 0, "tagged": 0, "dead_letters": 0, "skipped": 0, "commits": 0, "batches": 0}

    # -- the polling thread -------------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, until_idle: Callable[[], bool] | None = None, poll_timeout_s: float = 0.1) -> None:
        """Until `stop` is set (or `until_idle()` says the source is exhausted and all is done); then drain."""
        self._start_threads()
        try:
            while not stop.is_set():
                if self._fatal is not None:
                    raise RuntimeError(f"pipeline thread failed: {self._fatal!r}") from self._fatal
                self._take_finished()
                self._commit()
                self._flow_control()
                self._report_stuck()
                for record in self.source.poll(poll_timeout_s):
                    self._admit(record)
                if until_idle is not None and until_idle() and self.tracker.in_flight() == 0:
                    break
            self.drain()
        finally:
            self._stop_threads()

    def _admit(self, record: Record) -> None:
        now = time.monotonic()
        epoch = self.tracker.add(record.tp, record.offset, now)
        self.stats["polled"] += 1
        self._stage[(record.tp, record.offset)] = "prepare"
        self._pool.submit(self._prepare, record, now, epoch)

    def _take_finished(self) -> int:
        n = 0
        while True:
            try:
                tp, offset, epoch = self._finished.get_nowait()
            except queue.Empty:
                return n
            self.tracker.done(tp, offset, epoch)
            self._stage.pop((tp, offset), None)
            self._reported_stuck.discard((tp, offset))
            n += 1

    def _commit(self) -> bool:
        offsets = self.tracker.committable()
        if not offsets:
            return True
        try:
            self.source.commit(offsets)
        except Exception as exc:  # the broker is away or we were evicted: keep the offsets, try again later
            self.metrics.errors.labels(stage="commit").inc()
            log.warning("commit.failed", error=f"{type(exc).__name__}: {exc}", partitions=len(offsets))
            return False
        self.tracker.mark_committed(offsets)
        self.stats["commits"] += 1
        return True

    def _report_stuck(self) -> None:
        """A record that holds its partition's commits back longer than `stuck_after_s` is reported, once:
        whatever the cause (a bug, a dependency that never answers), it can never hide."""
        now, oldest_age = time.monotonic(), 0.0
        for tp, offset, polled_at in self.tracker.oldest():
            age = now - polled_at
            oldest_age = max(oldest_age, age)
            if age > self.stuck_after_s and (tp, offset) not in self._reported_stuck:
                self._reported_stuck.add((tp, offset))
                self.metrics.stuck.inc()
                log.error("record.stuck", topic=tp[0], partition=tp[1], offset=offset, age_s=round(age, 1),
                          stage=self._stage.get((tp, offset), "done, not yet committed"), bound_s=self.stuck_after_s)
        self.metrics.oldest_in_flight.set(oldest_age)

    def _flow_control(self) -> None:
        in_flight = self.tracker.in_flight()
        self.metrics.in_flight.set(in_flight)
        if not self._paused and in_flight >= self.max_in_flight:
            self.source.pause(self.source.assignment())
            self._paused = True
            log.debug("partitions.paused", in_flight=in_flight)
        elif self._paused and in_flight <= self.max_in_flight // 2:
            self.source.resume(self.source.assignment())
            self._paused = False
            log.debug("partitions.resumed", in_flight=in_flight)

    def drain(self, tps: Iterable[TopicPartition] | None = None, *, commit: bool = True) -> bool:
        """Finish everything polled (for `tps`, or all) within `drain_timeout_s`, then commit what is done.
        False if records were still in flight at the deadline (they stay uncommitted: redone after a restart).

        Blocking: for shutdown, on the polling thread. A rebalance drains with `drain_left` and `end_drain`
        from the Kafka listener, which must not block its loop.
        """
        wanted = list(tps) if tps is not None else None
        deadline = time.monotonic() + self.drain_timeout_s
        while (left := self.drain_left(wanted)) and time.monotonic() < deadline:
            time.sleep(0.005)
        if left:
            log.warning("drain.timeout", left=left, timeout_s=self.drain_timeout_s)
        elif left is None:
            log.warning("drain.failed", error=repr(self._fatal))
        committed = self.end_drain(commit=commit)
        return left == 0 and committed

    def drain_left(self, tps: Iterable[TopicPartition] | None = None) -> int | None:
        """One non-blocking step of a drain: take what finished, and say how many records of `tps` (or of all
        partitions) are still in flight; None if a pipeline thread failed (nothing more will finish)."""
        self._flush.set()  # partial batches go at once
        self._take_finished()
        if self._fatal is not None:
            return None
        return sum(self.tracker.in_flight(tp) for tp in (tps if tps is not None else self.tracker.partitions()))

    def end_drain(self, *, commit: bool = True) -> bool:
        """After `drain_left`: batches wait for more images again; commit what is done."""
        self._flush.clear()
        self._take_finished()
        return self._commit() if commit else True

    def forget(self, tps: list[TopicPartition]) -> None:
        with self._write_lock:
            self.tracker.forget(tps)
        gone = set(tps)
        for key in [k for k in list(self._stage) if k[0] in gone]:
            self._stage.pop(key, None)
        self._reported_stuck = {k for k in self._reported_stuck if k[0] not in gone}

    # -- fetch + decode threads ---------------------------------------------------------------------------

    def _prepare(self, record: Record, polled_at: float, epoch: int) -> None:
        """Every record leaves here with an outcome: ready for the model, dead-lettered, or skipped."""
        try:
            prepared = self._parse_fetch_decode(record, polled_at, epoch)
            if prepared is not None:
                self._stage[(record.tp, record.offset)] = "tag"
                self._ready.put(prepared)
        except PipelineStopped:
            return  # stopping: left uncommitted, redone after the restart
        except BaseException as exc:  # a bug in the dead-letter path itself: never leave the record in flight
            log.exception("prepare.unhandled", partition=record.partition, offset=record.offset)
            self._skip(record, epoch, "unhandled", f"{type(exc).__name__}: {exc}")

    def _parse_fetch_decode(self, record: Record, polled_at: float, epoch: int) -> Prepared | None:
        request: TagRequest | None = None
        try:
            request = TagRequest.parse(record.value, max_bytes=self.max_request_bytes)
            # Before the fetch: a request for a vocabulary that cannot be served costs no download.
            vocab = self.engine.vocabulary_for(request.vocab) if request.vocab is not None else None
            uri = request.uri
            data = self._retry_until_stopped("fetch", lambda: self.fetcher.fetch(uri), retry_on=(SourceUnavailable,))
            pixels = self.engine.decode(data, request.uri)
        except InputError as exc:
            self._dead_letter(record, exc, request, epoch)
            return None
        except PipelineStopped:
            raise
        except Exception as exc:  # a bug of ours, not the request's: say so in the dead letter
            log.exception("prepare.internal_error", offset=record.offset, partition=record.partition)
            self._dead_letter(record, InputError(ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}"), request, epoch)
            return None
        return Prepared(record, request, pixels, polled_at, epoch, vocab)

    def _dead_letter(self, record: Record, error: InputError, request: TagRequest | None, epoch: int) -> None:
        self._stage[(record.tp, record.offset)] = "dead_letter"
        letter = DeadLetter.build(
            record.value, error, record.source, self.worker, request.id if request else None,
            max_original_bytes=self.dead_letter_original_bytes,
        )
        try:
            self._retry_until_stopped(
                "dead_letter", lambda: self.dead_letters.send(letter, record.key), give_up_on=(DeadLetterRefused,)
            )
        except DeadLetterRefused as exc:
            self._skip(record, epoch, "dead_letter_refused", str(exc), kind=error.kind.value, letter_id=letter.letter_id,
                       size=letter.original_size, sha256=letter.original_sha256)
            return
        self.metrics.dead_letters.labels(kind=error.kind.value).inc()
        self.stats["dead_letters"] += 1
        log.info("dead_letter", kind=error.kind.value, reason=str(error)[:500], partition=record.partition, offset=record.offset)
        self._finished.put((record.tp, record.offset, epoch))

    def _skip(self, record: Record, epoch: int, reason: str, detail: str, **context: Any) -> None:
        """The last resort, for a record no result or dead letter can ever be made for: commit past it, and
        say so loudly (log at error level with everything needed to find it again, and a metric)."""
        self.metrics.skipped.labels(reason=reason).inc()
        self.stats["skipped"] += 1
        log.error("record.skipped", reason=reason, detail=detail[:500], topic=record.topic, partition=record.partition,
                  offset=record.offset, **context)
        self._finished.put((record.tp, record.offset, epoch))

    def _retry_until_stopped(
        self, stage: str, action: Callable[[], Any], *,
        retry_on: tuple[type[BaseException], ...] = (Exception,), give_up_on: tuple[type[BaseException], ...] = (),
    ) -> Any:
        """`action()` until it succeeds: writes must happen before their records are committed, and an outage
        of the fleet's own storage is waited out. Raises what is in `give_up_on` or not in `retry_on`."""
        def note(state: RetryCallState) -> None:
            exc = state.outcome.exception()
            self.metrics.errors.labels(stage=stage).inc()
            log.warning(f"{stage}.retry", error=f"{type(exc).__name__}: {str(exc)[:500]}", wait_s=state.next_action.sleep)

        def sleep(seconds: float) -> None:  # the wait ends early, and the retrying with it, when the replica stops
            if self._stopping.wait(seconds):
                raise PipelineStopped(stage)

        return Retrying(
            retry=retry_if_exception_type(retry_on) & retry_if_not_exception_type(give_up_on),
            wait=wait_exponential(multiplier=self.retry_wait_s, max=10.0),
            sleep=sleep, before_sleep=note, reraise=True,
        )(action)

    # -- inference thread ---------------------------------------------------------------------------------

    def _next_batch(self) -> list[Prepared] | None:
        try:
            first = self._ready.get(timeout=0.1)
        except queue.Empty:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_batch_wait_s
        while len(batch) < self.batch_size:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0 or self._flush.is_set():
                    batch.append(self._ready.get_nowait())
                else:
                    batch.append(self._ready.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _next_staged(self) -> tuple[list[Prepared], Any] | None:
        batch = self._next_batch()
        return None if batch is None else (batch, self.engine.stage([p.pixels for p in batch]))

    def _infer_loop(self) -> None:
        # Batch n+1 is formed, decoded and put on the device by the staging thread while batch n runs here.
        stager = ThreadPoolExecutor(1, thread_name_prefix="ramplus-stage")
        try:
            pending = stager.submit(self._next_staged)
            while not self._stopping.is_set():
                item = pending.result()
                pending = stager.submit(self._next_staged)
                if item is None:
                    continue
                batch, staged = item
                started = time.monotonic()
                canary = self.canary.choose(self.engine.canary, batch) if self.canary is not None else None
                vocabs = [p.vocab for p in batch]
                tags = self.engine.run(staged, vocabs, canary) if canary is not None else self.engine.run(staged, vocabs)
                self.metrics.batch_size.observe(len(batch))
                self.metrics.batch_seconds.observe(time.monotonic() - started)
                self.stats["batches"] += 1
                self._to_write.put((list(zip(batch, tags)), canary))
        except BaseException as exc:  # a model failure (e.g. CUDA OOM) is fatal: Ray restarts the replica
            log.exception("inference.failed")
            self._fatal = exc
        finally:
            stager.shutdown(wait=False, cancel_futures=True)
            self._to_write.put(None)

    # -- writer thread ------------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        try:
            while True:
                item = self._to_write.get()
                if item is None:
                    return
                results, canary = item
                written = self._write_batch(results)
                if canary is not None and self.canary is not None:
                    self.canary.write(canary, results, written)
        except BaseException as exc:  # a writer that died silently would hold every partition: restart instead
            log.exception("writer.failed")
            self._fatal = exc

    def _write_batch(self, item: list[tuple[Prepared, ImageTags | InputError]]) -> set[int]:
        """Writes the batch's results; returns the `id()` of each Prepared whose result was written."""
        written: set[int] = set()
        by_partition: dict[TopicPartition, list[tuple[Prepared, ResultLine]]] = {}
        for prepared, tags in item:
            record, request = prepared.record, prepared.request
            if isinstance(tags, InputError):  # decoded with its batch (on the device) and refused: this image only
                self._pool.submit(self._dead_letter_or_skip, record, tags, request, prepared.epoch)
                continue
            try:
                # Serialised here, once: a result that cannot be would otherwise fail its write for ever.
                result = TagResult.line(
                    tags, id=request.id, uri=request.uri, model=self.engine.model_id, worker=self.worker,
                    source=record.source, meta=request.meta,
                )
            except Exception as exc:  # parsing should have refused it: our bug, so say so and move on
                log.exception("result.unwritable", partition=record.partition, offset=record.offset)
                error = InputError(ErrorKind.INTERNAL, f"result cannot be serialised: {type(exc).__name__}: {exc}")
                self._pool.submit(self._dead_letter_or_skip, record, error, request, prepared.epoch)
                continue
            self._stage[(record.tp, record.offset)] = "write"
            by_partition.setdefault(record.tp, []).append((prepared, result))
        for tp, rows in by_partition.items():
            rows.sort(key=lambda r: r[0].record.offset)
            rows = self._write_owned(tp, rows)
            now_wall, now = time.time(), time.monotonic()
            for prepared, _ in rows:
                ts = prepared.record.timestamp_ms
                # End to end: from the producer's timestamp when there is one, else from our poll.
                self.metrics.latency.observe(now_wall - ts / 1000 if ts else now - prepared.polled_at)
                self._finished.put((tp, prepared.record.offset, prepared.epoch))
            self.metrics.images.inc(len(rows))
            self.stats["tagged"] += len(rows)
            written.update(id(prepared) for prepared, _ in rows)
        return written

    def _dead_letter_or_skip(self, record: Record, error: InputError, request: TagRequest | None, epoch: int) -> None:
        try:
            self._dead_letter(record, error, request, epoch)
        except PipelineStopped:
            return
        except BaseException as exc:
            log.exception("dead_letter.unhandled", partition=record.partition, offset=record.offset)
            self._skip(record, epoch, "unhandled", f"{type(exc).__name__}: {exc}")

    def _write_owned(
        self, tp: TopicPartition, rows: list[tuple[Prepared, ResultLine]]
    ) -> list[tuple[Prepared, ResultLine]]:
        """Write the rows of `tp` that are still ours, retrying failures; returns those written.

        A partition revoked or lost since a row was polled belongs to another replica now, which redoes
        it: writing it too could duplicate what that replica's recovery already cleaned. Checked under
        the write lock before every attempt, so a write never races `forget`; while the source cannot
        vouch for our membership we wait, without the lock, so that a rebalance can still forget it.
        """
        wait = self.retry_wait_s
        while True:
            with self._write_lock:
                current = self.tracker.epoch(tp)
                stale = sum(1 for prepared, _ in rows if prepared.epoch != current)
                if stale:
                    self.metrics.stale_dropped.inc(stale)
                    for prepared, _ in rows:
                        if prepared.epoch != current and self._stage.get((tp, prepared.record.offset)) == "write":
                            self._stage.pop((tp, prepared.record.offset), None)
                    rows = [r for r in rows if r[0].epoch == current]
                if not rows:
                    return rows
                allowed = self.source.write_allowed()
                if allowed:
                    try:
                        handle = self.sink.write(tp, [r for _, r in rows])
                    except Exception as exc:
                        self.metrics.errors.labels(stage="write").inc()
                        log.warning("write.retry", error=f"{type(exc).__name__}: {exc}", wait_s=wait)
                    else:
                        if self.source.write_allowed():
                            return rows  # answered inside the lease: it landed before any eviction could
                        if not self._withdraw(tp, handle):
                            return []
                        allowed = False
            if self._stopping.wait(wait if allowed else 0.1):
                return []  # left uncommitted: redone after the restart
            if allowed:
                wait = min(wait * 2, 10.0)

    def _withdraw(self, tp: TopicPartition, handle: str) -> bool:
        """Take back a write answered after the lease ran out (under the write lock, so `forget` waits):
        it may have landed after the partition's next owner cleaned up. False if stopped before it could."""
        log.warning("write.withdrawn", partition=tp[1], object=handle,
                    detail="answered after the membership lease ran out; held until the group confirms us")
        try:
            self._retry_until_stopped("withdraw", lambda: self.sink.withdraw(handle))
        except PipelineStopped:
            log.error("write.withdraw_abandoned", partition=tp[1], object=handle,
                      detail="stopped first: if the next owner redid these records, they are in S3 twice")
            return False
        self.metrics.writes_withdrawn.inc()
        return True

    # -- lifecycle ----------------------------------------------------------------------------------------

    def _start_threads(self) -> None:
        self._threads = [
            threading.Thread(target=self._infer_loop, name="ramplus-infer", daemon=True),
            threading.Thread(target=self._write_loop, name="ramplus-write", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _stop_threads(self) -> None:
        self._stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for t in self._threads:
            t.join(timeout=30)

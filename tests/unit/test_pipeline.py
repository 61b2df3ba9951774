"""The stream pipeline, embedded: a local source, in-memory sinks, the real tiny model."""

from __future__ import annotations

import threading
import time

import fakeredis
import pytest
import torch

from helpers import jpeg_bytes, make_tiny_model, random_images
from infra.local.kit import wait_until
from ramplus_core import Vocabulary, preprocess, select_tags
from workers.stream.engine import TaggingEngine
from workers.errors import ErrorKind, InputError
from fakes import LocalSource, MemoryDeadLetters, MemorySink
from workers.stream.pipeline import StreamPipeline
from workers.schemas import DeadLetter, SourceRef, TagRequest
from workers.vocab.store import VocabStore


class DictFetcher:
    """URIs -> bytes from a dict; a missing URI is NOT_FOUND, like the real fetchers."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def fetch(self, uri: str) -> bytes:
        if uri not in self.objects:
            raise InputError(ErrorKind.NOT_FOUND, f"{uri}: no such object")
        return self.objects[uri]


def run_pipeline(items, objects, *, fast=True, batch_size=4, max_in_flight=64, sink=None, dead=None, vocab_store=None, **kw):
    source = LocalSource(items, max_poll_records=8)
    sink = sink or MemorySink()
    dead = dead or MemoryDeadLetters()
    engine = TaggingEngine(make_tiny_model(), device="cpu", fast=fast, vocab_store=vocab_store)
    pipeline = StreamPipeline(
        source, sink, dead, engine, DictFetcher(objects), worker="test", batch_size=batch_size,
        max_batch_wait_s=0.01, max_in_flight=max_in_flight, fetch_concurrency=3, **kw,
    )
    pipeline.run(threading.Event(), until_idle=lambda: source.exhausted)
    return source, sink, dead, pipeline


@pytest.fixture(scope="module")
def images():
    return random_images(10, seed=3)


def test_every_request_is_tagged_once_and_offsets_reach_the_end(images):
    objects = {f"s3://b/{i}.jpg": jpeg_bytes(im) for i, im in enumerate(images)}
    requests = [TagRequest(id=f"id{i}", uri=uri, meta={"n": i}) for i, uri in enumerate(objects)]
    source, sink, dead, _ = run_pipeline(requests, objects)
    ids = [r.id for r in sink.results]
    assert sorted(ids) == sorted(r.id for r in requests)
    assert not dead.letters
    assert source.committed == {("local", 0): len(requests)}
    for result in sink.results:
        assert result.meta == {"n": int(result.id[2:])}
        assert result.source.offset == int(result.id[2:])
        assert result.vocab == "tiny-vocab@1" and result.model == "tiny@64"
    # each write holds one partition's results in offset order
    for _, rows in sink.writes:
        offsets = [r.offset for r in rows]
        assert offsets == sorted(offsets)


def test_results_match_the_model_run_offline_on_the_exact_path(images):
    objects = {f"s3://b/{i}.jpg": jpeg_bytes(im) for i, im in enumerate(images)}
    requests = [TagRequest(id=f"id{i}", uri=uri) for i, uri in enumerate(objects)]
    _, sink, _, _ = run_pipeline(requests, objects, fast=False)
    from ramplus_core import load_image

    model = make_tiny_model()
    decoded = [load_image(objects[r.uri]) for r in requests]
    expected = select_tags(model.tag_logits(preprocess(decoded, 64)), model.vocabulary, all_scores=True)
    by_id = {r.id: r for r in sink.results}
    for request, exp in zip(requests, expected):
        got = by_id[request.id]
        assert [t.tag for t in got.tags] == exp.names
        for t in got.tags:
            assert t.score == pytest.approx(exp.scores[t.tag], abs=1e-5)


def test_bad_requests_go_to_dead_letters_with_their_kind_and_are_committed(images):
    good = jpeg_bytes(images[0])
    objects = {"s3://b/good.jpg": good, "s3://b/corrupt.jpg": good[: len(good) // 2], "s3://b/text.jpg": b"hello, not an image"}
    items = [
        TagRequest(id="good", uri="s3://b/good.jpg"),
        b"{not json",
        b"\xff\xfe\x00",
        b'["a list"]',
        b'{"id": "noscheme", "uri": "ftp://x/y.jpg"}',
        b'{"uri": "s3://b/good.jpg"}',
        None,
        TagRequest(id="missing", uri="s3://b/missing.jpg"),
        TagRequest(id="corrupt", uri="s3://b/corrupt.jpg"),
        TagRequest(id="text", uri="s3://b/text.jpg"),
    ]
    source, sink, dead, _ = run_pipeline(items, objects)
    assert [r.id for r in sink.results] == ["good"]
    by_offset = {d.source.offset: d for d in dead.letters}
    assert {o: d.error.kind for o, d in by_offset.items()} == {
        1: ErrorKind.MALFORMED, 2: ErrorKind.MALFORMED, 3: ErrorKind.MALFORMED, 4: ErrorKind.VALIDATION,
        5: ErrorKind.VALIDATION, 6: ErrorKind.MALFORMED, 7: ErrorKind.NOT_FOUND, 8: ErrorKind.DECODE,
        9: ErrorKind.NOT_IMAGE,
    }
    assert by_offset[2].encoding == "base64" and by_offset[2].original_bytes() == b"\xff\xfe\x00"
    assert by_offset[1].original_bytes() == b"{not json"
    assert by_offset[7].id == "missing" and "missing.jpg" in by_offset[7].error.message
    assert source.committed == {("local", 0): len(items)}


def test_a_failing_sink_is_retried_and_nothing_is_committed_past_it(images):
    objects = {f"s3://b/{i}.jpg": jpeg_bytes(im) for i, im in enumerate(images[:4])}
    requests = [TagRequest(id=f"id{i}", uri=uri) for i, uri in enumerate(objects)]

    class FlakySink(MemorySink):
        failures = 3

        def write(self, tp, results):
            if self.failures:
                self.failures -= 1
                raise ConnectionError("S3 is away")
            return super().write(tp, results)

    source, sink, _, pipeline = run_pipeline(requests, objects, sink=FlakySink(), retry_wait_s=0.01)
    assert sorted(r.id for r in sink.results) == sorted(r.id for r in requests)
    assert source.committed == {("local", 0): 4}
    assert pipeline.metrics.errors.labels(stage="write")._value.get() == 3


def test_a_sink_that_never_recovers_leaves_offsets_uncommitted(images):
    objects = {"s3://b/0.jpg": jpeg_bytes(images[0])}

    stop = threading.Event()

    class DeadSink(MemorySink):
        attempts = 0

        def write(self, tp, results):
            self.attempts += 1
            if self.attempts >= 3:  # stopped on state, not on a timer: the write was tried, and tried again
                stop.set()
            raise ConnectionError("S3 is gone")

    source, sink = LocalSource([TagRequest(id="a", uri="s3://b/0.jpg")]), DeadSink()
    pipeline = StreamPipeline(
        source, sink, MemoryDeadLetters(), TaggingEngine(make_tiny_model(), device="cpu"), DictFetcher(objects),
        worker="test", max_batch_wait_s=0.0, drain_timeout_s=0.5, retry_wait_s=0.01,
    )
    pipeline.run(stop)
    assert sink.attempts >= 3 and pipeline.metrics.errors.labels(stage="write")._value.get() >= 3
    assert source.committed == {}


def test_writes_wait_while_the_source_cannot_vouch_for_ownership(images):
    """An evicted Kafka member must not write: nothing is written or committed until ownership is confirmed."""
    objects = {"s3://b/0.jpg": jpeg_bytes(images[0])}
    requests = [TagRequest(id=f"id{i}", uri="s3://b/0.jpg") for i in range(6)]

    class UnsureSource(LocalSource):
        owned = threading.Event()

        def write_allowed(self):
            return self.owned.is_set()

    source, sink = UnsureSource(requests), MemorySink()
    pipeline = StreamPipeline(
        source, sink, MemoryDeadLetters(), TaggingEngine(make_tiny_model(), device="cpu"), DictFetcher(objects),
        worker="test", max_batch_wait_s=0.0,
    )
    runner = threading.Thread(target=pipeline.run, args=(threading.Event(),),
                              kwargs={"until_idle": lambda: source.exhausted})
    runner.start()
    try:
        assert wait_until(lambda: pipeline.stats["batches"] >= 1, 60, interval_s=0.05)  # tagged, held at the writer
        assert sink.results == [] and source.committed == {}
    finally:
        source.owned.set()
        runner.join(30)
    assert sorted(r.id for r in sink.results) == sorted(r.id for r in requests)
    assert source.committed == {("local", 0): 6}


def test_a_write_answered_after_the_lease_ran_out_is_withdrawn_and_redone_once_ownership_is_confirmed(images):
    """The process froze between the ownership check and the PUT (or the PUT was held up): by the time it
    is answered the lease has run out, and the object may have landed after the next owner's cleanup."""
    objects = {"s3://b/0.jpg": jpeg_bytes(images[0])}
    requests = [TagRequest(id=f"id{i}", uri="s3://b/0.jpg") for i in range(3)]

    class LapsingSource(LocalSource):
        owned = threading.Event()
        checks = 0

        def write_allowed(self):
            self.checks += 1
            # valid before the first write, lapsed when it is answered, then unsure until the test confirms us
            return self.checks == 1 or self.owned.is_set()

    source, sink = LapsingSource(requests), MemorySink()
    pipeline = StreamPipeline(
        source, sink, MemoryDeadLetters(), TaggingEngine(make_tiny_model(), device="cpu"), DictFetcher(objects),
        worker="test", max_batch_wait_s=0.5, batch_size=8, retry_wait_s=0.01,
    )
    runner = threading.Thread(target=pipeline.run, args=(threading.Event(),),
                              kwargs={"until_idle": lambda: source.exhausted})
    runner.start()
    try:
        assert wait_until(lambda: pipeline.metrics.writes_withdrawn._value.get() == 1, 30)
        assert sink.writes == [] and source.committed == {}  # taken back, not committed
    finally:
        source.owned.set()
        runner.join(30)
    assert sorted(r.id for r in sink.results) == ["id0", "id1", "id2"]  # written again, once
    assert source.committed == {("local", 0): 3}
    assert pipeline.metrics.writes_withdrawn._value.get() == 1


def test_a_withdrawal_that_cannot_finish_before_the_replica_stops_commits_nothing(images):
    objects = {"s3://b/0.jpg": jpeg_bytes(images[0])}

    class LapsedSource(LocalSource):
        checks = 0

        def write_allowed(self):
            self.checks += 1
            return self.checks == 1

    stop = threading.Event()

    class UndeletableSink(MemorySink):
        def withdraw(self, handle):
            stop.set()  # stopped once the withdrawal was tried (state, not a timer)
            raise ConnectionError("S3 is gone")

    source, sink = LapsedSource([TagRequest(id="a", uri="s3://b/0.jpg")]), UndeletableSink()
    pipeline = StreamPipeline(
        source, sink, MemoryDeadLetters(), TaggingEngine(make_tiny_model(), device="cpu"), DictFetcher(objects),
        worker="test", max_batch_wait_s=0.0, drain_timeout_s=0.5, retry_wait_s=0.01,
    )
    pipeline.run(stop)
    assert source.committed == {}
    assert pipeline.metrics.errors.labels(stage="withdraw")._value.get() >= 1
    assert pipeline.metrics.writes_withdrawn._value.get() == 0


def test_results_of_a_forgotten_partition_are_dropped_not_written(images):
    from workers.stream.pipeline import Prepared
    from workers.stream.records import Record

    sink = MemorySink()
    pipeline = StreamPipeline(
        LocalSource([]), sink, MemoryDeadLetters(), TaggingEngine(make_tiny_model(), device="cpu"), DictFetcher({}),
        worker="test",
    )
    tp = ("local", 0)
    epoch = pipeline.tracker.add(tp, 0)
    pipeline.tracker.add(tp, 1)
    rows = [
        (Prepared(Record("local", 0, o, b"{}"), TagRequest(id=f"x{o}", uri="s3://b/x"), torch.zeros(1), 0.0, epoch), r)
        for o, r in ((0, "r0"), (1, "r1"))
    ]
    pipeline.forget([tp])  # revoked while they were being tagged
    new_epoch = pipeline.tracker.add(tp, 1)  # and assigned again: offset 1 polled anew
    rows.append((Prepared(Record("local", 0, 1, b"{}"), TagRequest(id="x1", uri="s3://b/x"), torch.zeros(1), 0.0, new_epoch), "r1'"))
    written = pipeline._write_owned(tp, rows)
    assert [r for _, r in written] == ["r1'"]
    assert sink.writes == [(tp, ["r1'"])]
    assert pipeline.metrics.stale_dropped._value.get() == 2


def test_memory_is_bounded_by_pausing_the_source(images):
    objects = {"s3://b/0.jpg": jpeg_bytes(images[0])}
    requests = [TagRequest(id=f"id{i}", uri="s3://b/0.jpg") for i in range(40)]
    source, sink, _, _ = run_pipeline(requests, objects, max_in_flight=8)
    assert len(sink.results) == 40
    assert source.pause_count >= 1


def test_dead_letter_round_trips_the_original_payload():
    source = SourceRef(topic="t", partition=0, offset=1)
    letter = DeadLetter.build(b"\x00\x01binary", InputError(ErrorKind.MALFORMED, "x"), source, "w")
    again = DeadLetter.model_validate_json(letter.model_dump_json())
    assert again.original_bytes() == b"\x00\x01binary"
    assert again.error.kind is ErrorKind.MALFORMED


def test_engine_refuses_a_model_without_vocabulary():
    from ramplus_core import create_model

    with pytest.raises(ValueError, match="no vocabulary"):
        TaggingEngine(create_model("tiny@64", seed=0), device="cpu")


def test_fast_path_scores_stay_close_to_the_exact_path(images):
    objects = {f"s3://b/{i}.jpg": jpeg_bytes(im) for i, im in enumerate(images)}
    requests = [TagRequest(id=f"id{i}", uri=uri) for i, uri in enumerate(objects)]
    engine_fast = TaggingEngine(make_tiny_model(), device="cpu", fast=True, threshold=0.0)
    engine_exact = TaggingEngine(make_tiny_model(), device="cpu", fast=False, threshold=0.0)
    for r in requests:
        fast = engine_fast.infer([engine_fast.decode(objects[r.uri], r.uri)])[0]
        exact = engine_exact.infer([engine_exact.decode(objects[r.uri], r.uri)])[0]
        f = {t.tag: t.score for t in fast.tags}
        e = {t.tag: t.score for t in exact.tags}
        assert f.keys() == e.keys()
        assert max(abs(f[k] - e[k]) for k in f) < 0.05
    assert torch.is_tensor(engine_fast.decode(objects[requests[0].uri], "x"))


def test_requests_naming_vocabularies_get_theirs_and_unservable_ones_are_dead_lettered(images):
    store = VocabStore(fakeredis.FakeRedis())
    store.publish(Vocabulary.from_embeddings(
        [f"p{i}" for i in range(7)], torch.nn.functional.normalize(torch.randn(7, 3, 512), dim=-1),
        thresholds=0.0, name="products", version="3",
    ))
    store.activate("products", "3")
    objects = {"s3://b/0.jpg": jpeg_bytes(images[0])}
    items = [
        TagRequest(id="same-name", uri="s3://b/0.jpg", vocab="tiny-vocab"),
        TagRequest(id="same-version", uri="s3://b/0.jpg", vocab="tiny-vocab@1"),
        TagRequest(id="other-name", uri="s3://b/0.jpg", vocab="products"),
        TagRequest(id="other-pinned", uri="s3://b/0.jpg", vocab="products@3"),
        TagRequest(id="unknown-version", uri="s3://b/0.jpg", vocab="tiny-vocab@2"),
        TagRequest(id="unknown-name", uri="s3://b/0.jpg", vocab="nothing"),
        b'{"id": "bad-ref", "uri": "s3://b/0.jpg", "vocab": "a@b@c"}',
    ]
    _, sink, dead, pipeline = run_pipeline(items, objects, vocab_store=store)
    assert {r.id: r.vocab for r in sink.results} == {
        "same-name": "tiny-vocab@1", "same-version": "tiny-vocab@1", "other-name": "products@3", "other-pinned": "products@3",
    }
    assert all(len(r.tags) == 7 for r in sink.results if r.vocab == "products@3")  # thresholds 0: every tag
    kinds = {d.id: d.error.kind for d in dead.letters}  # a request that does not validate has no id to give
    assert kinds == {"unknown-version": ErrorKind.VALIDATION, "unknown-name": ErrorKind.VALIDATION, None: ErrorKind.VALIDATION}
    assert [d.error.message.split(":")[1].strip() for d in dead.letters if d.id is None] == ["vocab"]
    assert pipeline.engine.cache.refs() == ["products@3"]


def test_the_next_batch_is_staged_while_the_model_runs_this_one(images):
    """Overlap (issue 16, step 3): `stage` of batch n+1 starts before `run` of batch n returns."""
    objects = {f"s3://b/{i}.jpg": jpeg_bytes(im) for i, im in enumerate(images)}
    requests = [TagRequest(id=f"id{i}", uri=uri) for i, uri in enumerate(objects)]
    source = LocalSource(requests, max_poll_records=16)
    engine = TaggingEngine(make_tiny_model(), device="cpu")
    events: list[str] = []
    stage, run = engine.stage, engine.run

    def slow_run(staged, vocabularies=None):
        events.append("run")
        time.sleep(0.5)  # long enough for the staging thread to take the next batch from the queue
        out = run(staged, vocabularies)
        events.append("ran")
        return out

    def noted_stage(pixels):
        events.append("stage")
        return stage(pixels)

    engine.run, engine.stage = slow_run, noted_stage
    sink = MemorySink()
    pipeline = StreamPipeline(
        source, sink, MemoryDeadLetters(), engine, DictFetcher(objects), worker="test", batch_size=2,
        max_batch_wait_s=0.01, max_in_flight=64, fetch_concurrency=3,
    )
    pipeline.run(threading.Event(), until_idle=lambda: source.exhausted)
    assert sorted(r.id for r in sink.results) == sorted(r.id for r in requests)
    first_run = events.index("run")
    assert "stage" in events[first_run : events.index("ran")], events  # staged during the first run

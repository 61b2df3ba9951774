"""Poison never blocks a partition: every record ends as a result, a dead letter or a counted skip.

Unit level: request parsing with bounded cost, dead letters that always fit their topic, the pipeline's
last resorts (skip when the dead-letter topic refuses for good), outages of the fleet's own storage waited
out, and the stuck-record report. The same cases against the real stack: tests/integration/test_hostile_input.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pickle
import threading

import pytest
import structlog
from kafka import errors as kafka_errors

from helpers import jpeg_bytes, make_tiny_model, random_images
from workers.stream.engine import TaggingEngine
from workers.errors import DeadLetterRefused, ErrorKind, InputError, SourceUnavailable
from workers.stream.dead_letters import RECORD_OVERHEAD, KafkaDeadLetters
from fakes import LocalSource, MemoryDeadLetters, MemorySink
from workers.stream.pipeline import StreamPipeline
from workers.schemas import DEAD_LETTER_ORIGINAL_BYTES, MAX_JSON_DEPTH, DeadLetter, SourceRef, TagRequest
from workers.settings import KafkaSettings

SOURCE = SourceRef(topic="requests", partition=3, offset=1234)


def nested(depth: int) -> bytes:
    return b'{"id": "deep", "uri": "s3://b/k.jpg", "meta": {"a": ' + b"[" * depth + b"]" * depth + b"}}"


# ------------------------------------------------------------------------------------- request parsing


@pytest.mark.parametrize(
    ("value", "kind", "says"),
    [
        (b"[" * 100_000 + b"]" * 100_000, ErrorKind.VALIDATION, "nests deeper"),
        (nested(900), ErrorKind.VALIDATION, "nests deeper"),  # json.loads takes it; pydantic could not write it out
        (nested(MAX_JSON_DEPTH), ErrorKind.VALIDATION, "nests deeper"),
        (b'{"id": "s", "uri": "s3://b/k.jpg", "meta": {"x": "\\ud800"}}', ErrorKind.VALIDATION, "surrogate"),
        (b'{"id": "s", "uri": "s3://b/k.jpg", "meta": {"\\udfff": 1}}', ErrorKind.VALIDATION, "surrogate"),
        (b'{"id": "n", "uri": "s3://b/k.jpg", "meta": {"n": ' + b"9" * 5000 + b"}}", ErrorKind.VALIDATION, "cannot be read"),
        (b'{"id": "n", "uri": "s3://b/k.jpg", "meta": {"n": NaN}}', ErrorKind.VALIDATION, "NaN is not JSON"),
        (b'{"id": "big", "uri": "s3://b/k.jpg", "meta": {"pad": "' + b"x" * 300_000 + b'"}}', ErrorKind.TOO_LARGE, "limit"),
        (b"\x00" * 1000, ErrorKind.MALFORMED, "not JSON"),
        (pickle.dumps({"id": "p", "uri": "s3://b/k.jpg"}), ErrorKind.MALFORMED, "not UTF-8"),
    ],
    ids=["100k-deep", "900-deep-meta", "just-too-deep", "surrogate-value", "surrogate-key", "huge-int", "nan",
         "over-size", "nul", "pickle"],
)
def test_hostile_request_bytes_are_refused_with_a_kind_that_is_not_internal(value, kind, says):
    with pytest.raises(InputError) as caught:
        TagRequest.parse(value)
    assert caught.value.kind is kind
    assert says in str(caught.value)


def test_what_parses_can_always_be_written_back_out():
    request = TagRequest.parse(nested(MAX_JSON_DEPTH - 2))
    assert json.loads(request.model_dump_json())["meta"]["a"] == json.loads(nested(MAX_JSON_DEPTH - 2))["meta"]["a"]


def test_the_size_limit_is_a_setting():
    small = b'{"id": "a", "uri": "s3://b/k.jpg", "meta": {"pad": "' + b"x" * 2000 + b'"}}'
    assert TagRequest.parse(small).id == "a"
    with pytest.raises(InputError) as caught:
        TagRequest.parse(small, max_bytes=1024)
    assert caught.value.kind is ErrorKind.TOO_LARGE and "RAMPLUS_KAFKA__MAX_REQUEST_BYTES" in str(caught.value)


# ----------------------------------------------------------------------------------- dead-letter envelope


def test_a_nul_filled_megabyte_makes_a_small_dead_letter_that_names_the_whole_value():
    """The fleet's first blocked partition: 1,000,000 NUL bytes made a 6 MB envelope (each NUL escaped as \\u0000)."""
    value = b"\x00" * 1_000_000
    letter = DeadLetter.build(value, InputError(ErrorKind.MALFORMED, "not JSON"), SOURCE, "w")
    encoded = letter.model_dump_json().encode()
    assert len(encoded) < DEAD_LETTER_ORIGINAL_BYTES * 4 / 3 + 2048
    again = DeadLetter.model_validate_json(encoded)
    assert again.encoding == "base64" and again.truncated
    assert again.original_bytes() == value[:DEAD_LETTER_ORIGINAL_BYTES]
    assert again.original_size == len(value) and again.original_sha256 == hashlib.sha256(value).hexdigest()
    assert again.letter_id == "requests/3/1234"


def test_clean_text_stays_readable_and_control_characters_go_to_base64():
    text = DeadLetter.build(b'{"id": 1, "uri": "x"}\n', InputError(ErrorKind.VALIDATION, "x"), SOURCE, "w")
    assert text.encoding == "utf-8" and text.original == '{"id": 1, "uri": "x"}\n' and not text.truncated
    control = DeadLetter.build(b"abc\x01def", InputError(ErrorKind.MALFORMED, "x"), SOURCE, "w")
    assert control.encoding == "base64" and base64.b64decode(control.original) == b"abc\x01def"


def test_a_long_text_is_cut_at_a_character_boundary():
    value = "é".encode() * 50 + b"z"  # 101 bytes; a limit of 10 cuts nowhere, 11 cuts inside the sixth é
    letter = DeadLetter.build(value, InputError(ErrorKind.MALFORMED, "x"), SOURCE, "w", max_original_bytes=11)
    assert letter.encoding == "utf-8" and letter.original == "é" * 5 and letter.truncated
    assert letter.original_size == 101


def test_the_minimal_letter_keeps_the_reason_position_and_digest_only():
    value = b"\xff" * 5000
    letter = DeadLetter.build(value, InputError(ErrorKind.MALFORMED, "m" * 5000), SOURCE, "w", request_id="r1")
    minimal = letter.minimal()
    assert minimal.encoding == "omitted" and minimal.original == "" and minimal.truncated
    assert (minimal.letter_id, minimal.id, minimal.error.kind) == (letter.letter_id, "r1", ErrorKind.MALFORMED)
    assert minimal.original_sha256 == hashlib.sha256(value).hexdigest() and minimal.original_size == 5000
    assert len(minimal.model_dump_json()) < 1200


# ----------------------------------------------------------------------------- sending dead letters


class FakeFuture:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def get(self, timeout: float) -> None:
        if self.error is not None:
            raise self.error


class FakeProducer:
    """Refuses records over `broker_limit` like a broker would (after the send), records what it took."""

    def __init__(self, max_request_size: int = 1_048_576, broker_limit: int | None = None, error: Exception | None = None):
        self.config = {"max_request_size": max_request_size}
        self.broker_limit, self.error = broker_limit, error
        self.sent: list[tuple[bytes | None, bytes, dict]] = []

    def send(self, topic, key=None, value=None, headers=None):  # noqa: ANN001, ANN201
        if self.error is not None:
            return FakeFuture(self.error)
        if self.broker_limit is not None and len(value) > self.broker_limit:
            return FakeFuture(kafka_errors.MessageSizeTooLargeError("MESSAGE_TOO_LARGE"))
        self.sent.append((key, value, dict(headers)))
        return FakeFuture(None)


def dead_letters(producer: FakeProducer, topic_limit: int | None = None) -> KafkaDeadLetters:
    return KafkaDeadLetters(KafkaSettings(), client_id="t", producer=producer, topic_limit=topic_limit)


def letter_of(size: int) -> DeadLetter:
    return DeadLetter.build(b"\xfe" * size, InputError(ErrorKind.MALFORMED, "x"), SOURCE, "w")


def test_a_letter_over_the_topic_limit_is_cut_before_it_is_sent():
    producer = FakeProducer()
    sink = dead_letters(producer, topic_limit=20_000)
    assert sink.max_record_bytes == 20_000 - RECORD_OVERHEAD
    sink.send(letter_of(50_000), key=b"k")
    (key, value, headers), = producer.sent
    sent = DeadLetter.model_validate_json(value)
    assert sent.encoding == "omitted" and sent.original_size == 50_000
    assert key == b"k" and headers["ramplus-letter-id"] == b"requests/3/1234" and headers["ramplus-error-kind"] == b"malformed"
    assert sink.metrics is None  # no metrics given: nothing to count, nothing fails


def test_a_letter_that_fits_goes_whole():
    producer = FakeProducer()
    dead_letters(producer, topic_limit=1_000_000).send(letter_of(1000), key=None)
    assert DeadLetter.model_validate_json(producer.sent[0][1]).original_bytes() == b"\xfe" * 1000


def test_a_broker_that_refuses_the_letter_gets_the_minimal_one_and_a_huge_key_is_replaced():
    producer = FakeProducer(broker_limit=3000)  # the topic's limit could not be read: the broker says it
    dead_letters(producer).send(letter_of(10_000), key=b"K" * 100_000)
    (key, value, _), = producer.sent
    assert DeadLetter.model_validate_json(value).encoding == "omitted"
    assert key == b"requests/3/1234"


def test_a_topic_that_refuses_even_the_minimal_letter_raises_refused_not_a_retryable_error():
    with pytest.raises(DeadLetterRefused, match="minimal"):
        dead_letters(FakeProducer(broker_limit=10)).send(letter_of(10), key=None)


def test_a_transient_send_failure_is_raised_as_it_is_for_the_pipeline_to_retry():
    with pytest.raises(kafka_errors.KafkaTimeoutError):
        dead_letters(FakeProducer(error=kafka_errors.KafkaTimeoutError("broker away"))).send(letter_of(10), key=None)


# ------------------------------------------------------------------------------------------- pipeline


class DictFetcher:
    def __init__(self, objects: dict[str, bytes], unavailable: int = 0) -> None:
        self.objects, self.unavailable, self.calls = objects, unavailable, 0
        self.gate: threading.Event | None = None

    def fetch(self, uri: str) -> bytes:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(30)
        if self.unavailable:
            self.unavailable -= 1
            raise SourceUnavailable("S3 endpoint unreachable")
        if uri not in self.objects:
            raise InputError(ErrorKind.NOT_FOUND, f"{uri}: no such object")
        return self.objects[uri]


def pipeline_for(items, fetcher, dead=None, **kw) -> tuple[LocalSource, MemorySink, StreamPipeline]:
    source, sink = LocalSource(items), MemorySink()
    pipeline = StreamPipeline(
        source, sink, dead or MemoryDeadLetters(), TaggingEngine(make_tiny_model(), device="cpu"), fetcher,
        worker="test", max_batch_wait_s=0.01, fetch_concurrency=2, retry_wait_s=0.01, **kw,
    )
    return source, sink, pipeline


@pytest.fixture(scope="module")
def image() -> bytes:
    return jpeg_bytes(random_images(1, seed=5)[0])


def test_when_the_dead_letter_topic_refuses_for_good_the_record_is_skipped_committed_and_counted(image):
    class Refusing(MemoryDeadLetters):
        def send(self, letter, key):  # noqa: ANN001, ANN201
            raise DeadLetterRefused("topic refuses everything")

    items = [b"\x00" * 5000, TagRequest(id="ok", uri="s3://b/ok.jpg")]
    source, sink, pipeline = pipeline_for(items, DictFetcher({"s3://b/ok.jpg": image}), dead=Refusing())
    with structlog.testing.capture_logs() as logs:
        pipeline.run(threading.Event(), until_idle=lambda: source.exhausted)
    assert [r.id for r in sink.results] == ["ok"]
    assert source.committed == {("local", 0): 2}
    assert pipeline.metrics.skipped.labels(reason="dead_letter_refused")._value.get() == 1
    skipped, = [e for e in logs if e["event"] == "record.skipped"]
    assert skipped["offset"] == 0 and skipped["sha256"] == hashlib.sha256(b"\x00" * 5000).hexdigest()


def test_a_bug_in_the_dead_letter_path_skips_the_record_instead_of_holding_its_partition(monkeypatch):
    from workers.stream import pipeline as pipeline_module

    class Broken(DeadLetter):
        @classmethod
        def build(cls, *args, **kw):  # noqa: ANN002, ANN003, ANN206
            raise RuntimeError("bug while building the letter")

    monkeypatch.setattr(pipeline_module, "DeadLetter", Broken)
    source, sink, pipeline = pipeline_for([b"{bad", b"[1]"], DictFetcher({}))
    pipeline.run(threading.Event(), until_idle=lambda: source.exhausted)
    assert source.committed == {("local", 0): 2}
    assert pipeline.metrics.skipped.labels(reason="unhandled")._value.get() == 2


def test_an_outage_of_the_fleets_storage_is_waited_out_not_dead_lettered(image):
    fetcher = DictFetcher({"s3://b/ok.jpg": image}, unavailable=5)
    items = [TagRequest(id=f"r{i}", uri="s3://b/ok.jpg") for i in range(3)]
    dead = MemoryDeadLetters()
    source, sink, pipeline = pipeline_for(items, fetcher, dead=dead)
    pipeline.run(threading.Event(), until_idle=lambda: source.exhausted)
    assert sorted(r.id for r in sink.results) == ["r0", "r1", "r2"]
    assert dead.letters == []
    assert pipeline.metrics.errors.labels(stage="fetch")._value.get() == 5
    assert source.committed == {("local", 0): 3}


def test_stopping_during_an_outage_leaves_the_record_uncommitted(image):
    fetcher = DictFetcher({"s3://b/ok.jpg": image}, unavailable=10**9)
    source, sink, pipeline = pipeline_for([TagRequest(id="r", uri="s3://b/ok.jpg")], fetcher, drain_timeout_s=0.2)
    stop = threading.Event()
    runner = threading.Thread(target=pipeline.run, args=(stop,))
    runner.start()
    try:
        assert wait_for(lambda: fetcher.calls >= 3)
    finally:
        stop.set()
        runner.join(30)
    assert not runner.is_alive()
    assert sink.results == [] and source.committed == {}


def test_a_record_stuck_longer_than_the_bound_is_reported_once_with_its_offset_and_stage(image):
    fetcher = DictFetcher({"s3://b/ok.jpg": image})
    fetcher.gate = threading.Event()
    items = [TagRequest(id="slow", uri="s3://b/ok.jpg")]
    source, sink, pipeline = pipeline_for(items, fetcher, stuck_after_s=0.2)
    with structlog.testing.capture_logs() as logs:
        runner = threading.Thread(target=pipeline.run, args=(threading.Event(),), kwargs={"until_idle": lambda: source.exhausted})
        runner.start()
        try:
            assert wait_for(lambda: pipeline.metrics.stuck._value.get() == 1)
            threading.Event().wait(0.3)  # more polling rounds: still reported once
        finally:
            fetcher.gate.set()
            runner.join(30)
    stuck = [e for e in logs if e["event"] == "record.stuck"]
    assert len(stuck) == 1 and stuck[0]["offset"] == 0 and stuck[0]["stage"] == "prepare" and stuck[0]["age_s"] >= 0.2
    assert pipeline.metrics.stuck._value.get() == 1
    assert [r.id for r in sink.results] == ["slow"]


def test_an_unwritable_result_is_dead_lettered_not_retried_for_ever(image, monkeypatch):
    from workers.stream import pipeline as pipeline_module

    real = pipeline_module.TagResult

    class Unwritable(real):
        def model_dump_json(self, **kw):  # noqa: ANN003, ANN201
            if self.id == "bad":
                raise ValueError("cannot serialise")
            return super().model_dump_json(**kw)

    monkeypatch.setattr(pipeline_module, "TagResult", Unwritable)
    items = [TagRequest(id="bad", uri="s3://b/ok.jpg"), TagRequest(id="good", uri="s3://b/ok.jpg")]
    dead = MemoryDeadLetters()
    source, sink, pipeline = pipeline_for(items, DictFetcher({"s3://b/ok.jpg": image}), dead=dead)
    pipeline.run(threading.Event(), until_idle=lambda: source.exhausted)
    assert [r.id for r in sink.results] == ["good"]
    assert [(d.id, d.error.kind) for d in dead.letters] == [("bad", ErrorKind.INTERNAL)]
    assert source.committed == {("local", 0): 2}


def wait_for(predicate, timeout_s: float = 20.0) -> bool:  # noqa: ANN001
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()

"""Canary vocabularies without servers: which requests, the engine's second head, the pipeline's canary
lines, the watcher following Redis (fakeredis), the report's arithmetic."""

from __future__ import annotations

import json
import threading

import fakeredis
import pytest
import torch

from fakes import LocalSource, MemoryCanarySink, MemoryDeadLetters, MemorySink
from helpers import jpeg_bytes, make_tiny_model, random_images
from ramplus_core import Vocabulary
from ramplus_core.errors import VocabularyError
from workers.metrics import ReplicaMetrics
from workers.schemas import TagRequest
from workers.settings import S3Settings
from workers.stream.engine import TaggingEngine
from workers.stream.pipeline import StreamPipeline
from workers.vocab.canary import CanaryBatch, CanaryControl, CanaryLine, CanaryReport, chosen, jaccard
from workers.vocab.store import VocabStore, VocabStoreError
from workers.vocab.watcher import VocabularyWatcher


def vocabulary(version: str, *, n: int = 12, seed: int = 0, name: str = "live", threshold: float = 0.3) -> Vocabulary:
    torch.manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, 3, 512), dim=-1)
    return Vocabulary.from_embeddings([f"tag{i}" for i in range(n)], emb, thresholds=threshold, name=name, version=version)


def test_choice_is_a_stable_hash_of_the_id_at_the_fraction():
    ids = [f"req-{i}" for i in range(20_000)]
    at_20 = {i for i in ids if chosen(i, 0.2)}
    assert abs(len(at_20) / len(ids) - 0.2) < 0.015
    assert at_20 == {i for i in ids if chosen(i, 0.2)}  # the same on every replica and every replay
    assert at_20 < {i for i in ids if chosen(i, 0.5)}  # raising the fraction keeps those already chosen
    assert all(chosen(i, 1.0) for i in ids[:100]) and not any(chosen(i, 0.0) for i in ids[:100])


def test_jaccard():
    assert jaccard([], []) == 1.0
    assert jaccard(["a"], []) == 0.0
    assert jaccard(["a", "b"], ["b", "c"]) == pytest.approx(1 / 3)


def line(id_: str, active: list[str], canary: list[str], ref: str = "v@2") -> CanaryLine:
    return CanaryLine(id=id_, uri=f"s3://b/{id_}", active="v@1", canary=ref, active_tags=active, canary_tags=canary,
                      agreement=jaccard(active, canary), worker="w")


def test_the_report_compares_rates_keeps_one_line_per_request_and_lists_silent_tags():
    lines = [
        line("a", ["cat", "dog"], ["cat"]),          # 0.5
        line("b", ["cat"], ["cat", "new"]),          # 0.5
        line("c", ["dog"], ["dog"]),                 # 1.0
        line("d", [], []),                           # 1.0
        line("a", ["cat", "dog"], ["cat"]),          # a replay of a: counted once
        line("x", ["cat"], [], ref="v@3"),           # another canary: ignored
    ]
    report = CanaryReport.of("v@2", lines, canary_tags=["cat", "dog", "new", "silent"], active_tags=["cat", "dog"])
    assert report.images == 4 and report.active == ["v@1"]
    assert report.agreement_mean == pytest.approx(0.75)
    assert report.agreement_histogram == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    changes = {r.tag: (r.active, r.canary) for r in report.largest_changes}
    assert changes == {"dog": (0.5, 0.25), "new": (None, 0.25)}
    assert report.never_fired == ["silent"] and report.never_fired_count == 1
    assert report.positives_per_image == {"active": 1.0, "canary": 1.0}
    text = report.text()
    assert "4 images" in text and "mean 0.750" in text and "silent" in text
    assert CanaryReport.of("v@9", lines).images == 0


@pytest.fixture(scope="module")
def pixels():
    engine = TaggingEngine(make_tiny_model(), device="cpu")
    return [engine.decode(jpeg_bytes(im), str(i)) for i, im in enumerate(random_images(6, seed=4))]


def test_the_engine_runs_the_encoder_once_and_the_canary_head_on_its_rows(pixels):
    engine = TaggingEngine(make_tiny_model(), device="cpu")
    candidate = vocabulary("2", n=9, seed=7, name="tiny-vocab")
    without = engine.infer(pixels)
    encoded = []
    real_encode = engine.encode_images
    engine.encode_images = lambda x: encoded.append(x.shape[0]) or real_encode(x)  # type: ignore[method-assign]
    canary = engine.set_canary(candidate, 0.5)
    batch = CanaryBatch(canary, rows=[1, 4])
    with_canary = engine.run(engine.stage(pixels), None, batch)
    assert encoded == [len(pixels)]  # one encoder pass for both heads
    assert [t.names for t in with_canary] == [t.names for t in without]  # the consumers' answers are untouched
    offline = TaggingEngine(make_tiny_model(), device="cpu")
    offline.set_vocabulary(candidate)
    expected = offline.infer(pixels)
    assert sorted(batch.tags) == [1, 4]
    for row, tags in batch.tags.items():
        assert tags.vocab == candidate.ref and tags.names == expected[row].names
        assert tags.values == pytest.approx(expected[row].values, abs=1e-5)
    assert engine.set_canary(None) is None and engine.canary is None
    with pytest.raises(ValueError):
        engine.set_canary(candidate, 0.0)


def test_the_pipeline_writes_canary_lines_for_the_chosen_requests_only_and_results_as_without(pixels):
    objects = {f"s3://b/{i}.jpg": jpeg_bytes(im) for i, im in enumerate(random_images(8, seed=2))}
    uris = list(objects)
    requests = [TagRequest(id=f"id{i}", uri=uris[i % 8]) for i in range(80)]
    requests += [TagRequest(id=f"pinned{i}", uri=uris[0], vocab="tiny-vocab@1") for i in range(10)]
    candidate = vocabulary("2", n=9, seed=7, name="tiny-vocab")

    def run(with_canary: bool):
        source = LocalSource(requests, max_poll_records=8)
        sink, canaries, metrics = MemorySink(), MemoryCanarySink(), ReplicaMetrics()
        engine = TaggingEngine(make_tiny_model(), device="cpu", metrics=metrics)
        if with_canary:
            engine.set_canary(candidate, 0.3)
        pipeline = StreamPipeline(source, sink, MemoryDeadLetters(), engine, _Fetcher(objects), worker="t", batch_size=8,
                                  max_batch_wait_s=0.01, fetch_concurrency=2, metrics=metrics, canary_sink=canaries)
        pipeline.run(threading.Event(), until_idle=lambda: source.exhausted)
        return sink, canaries, metrics

    plain, none, _ = run(False)
    sink, canaries, metrics = run(True)
    assert not none.lines
    key = lambda r: (r.id, r.vocab, [t.tag for t in r.tags])  # noqa: E731
    assert sorted(map(key, sink.results)) == sorted(map(key, plain.results))
    lines = canaries.lines[candidate.ref]
    want = {r.id for r in requests if r.vocab is None and chosen(r.id, 0.3)}
    assert {row["id"] for row in lines} == want and len(lines) == len(want) and 10 < len(want) < 40
    results = {r.id: r for r in sink.results}
    for row in lines:
        assert row["active"] == "tiny-vocab@1" and row["canary"] == candidate.ref
        assert row["active_tags"] == [t.tag for t in results[row["id"]].tags]
        assert row["agreement"] == pytest.approx(jaccard(row["active_tags"], row["canary_tags"]))
    text = metrics.exposition().decode()
    assert f'ramplus_canary_images_total{{canary="{candidate.ref}"}} {float(len(want))}' in text
    assert 'ramplus_canary_tag_rate{' in text


class _Fetcher:
    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def fetch(self, uri: str) -> bytes:
        return self.objects[uri]


@pytest.fixture
def live():
    store = VocabStore(fakeredis.FakeRedis())
    metrics = ReplicaMetrics()
    engine = TaggingEngine(make_tiny_model(name="live", version="0"), device="cpu")
    store.publish(vocabulary("1"))
    store.activate("live", "1")
    watcher = VocabularyWatcher(store, "live", engine.set_vocabulary, current=lambda: engine.vocabulary.ref, dim=512,
                                poll_interval_s=0.1, metrics=metrics, cached=engine.cache.peek,
                                set_canary=engine.set_canary, current_canary=lambda: engine.canary)
    watcher.check()
    return store, engine, watcher, metrics


def test_the_watcher_follows_the_canary_and_stopping_lets_it_go(live):
    store, engine, watcher, metrics = live
    store.publish(vocabulary("2", seed=3))
    control = CanaryControl(store)
    control.start("live@2", 0.2, dim=512)
    watcher.check()
    assert engine.canary is not None and engine.canary.ref == "live@2" and engine.canary.fraction == 0.2
    assert engine.vocabulary.ref == "live@1"  # the active version is untouched
    assert 'ramplus_canary_fraction{canary="live@2"} 0.2' in metrics.exposition().decode()
    control.start("live@2", 0.5, dim=512)
    watcher.check()
    assert engine.canary.fraction == 0.5
    control.stop("live")
    watcher.check()
    assert engine.canary is None and "ramplus_canary_fraction{" not in metrics.exposition().decode()
    control.start("live@2", 0.2, dim=512)
    watcher.check()
    store.activate("live", "2")  # activated by hand while it runs: a version is never compared with itself
    watcher.check()
    assert engine.vocabulary.ref == "live@2" and engine.canary is None


def test_a_canary_that_cannot_load_is_refused_and_the_active_version_kept(live):
    store, engine, watcher, metrics = live
    control = CanaryControl(store)
    store.publish(vocabulary("bad", seed=5))
    meta = json.loads(store.redis.get("ramplus:vocab:live:bad:meta"))
    store.redis.set(f"ramplus:vocab:live:bad:{meta['upload']}:0", b"\x00" * meta["bytes"])
    narrow = vocabulary("narrow", seed=6)
    store.publish(Vocabulary.from_embeddings(narrow.tags, narrow.embeddings[:, :, :256], name="live", version="narrow"))
    for ref, words in (("live@bad", "checksum"), ("live@narrow", "dimension"), ("live@nope", "does not exist")):
        with pytest.raises(VocabularyError, match=words):
            control.start(ref, 0.2, dim=512)
        assert control.get("live") is None and store.active_version("live") == "1"
    with pytest.raises(VocabStoreError, match="active"):
        control.start("live@1", 0.2)
    # Started behind the CLI's back: every replica refuses it by itself, once, and tags on with version 1.
    store.redis.set("ramplus:vocab:live:canary", json.dumps({"version": "bad", "fraction": 0.2, "started_at": 1.0}))
    watcher.check()
    watcher.check()
    assert engine.canary is None and engine.vocabulary.ref == "live@1"
    assert 'ramplus_vocab_refused_total{reason="checksum"} 1.0' in metrics.exposition().decode()


def test_the_canary_prefix_is_never_inside_the_results_prefix():
    assert S3Settings().canary_prefix == "canary/"
    for prefix, canary in (("results/", "results/canary/"), ("out/", "o"), ("", "canary/")):
        with pytest.raises(ValueError, match="must not contain"):
            S3Settings(prefix=prefix, canary_prefix=canary)


def test_the_engine_chunks_the_head_as_configured_and_every_setting_gives_the_same_tags(pixels):
    from workers.settings import ModelSettings

    assert ModelSettings().head_options() == {"tag_chunk_size": "auto", "head_memory_bytes": None}
    assert ModelSettings(tag_chunk_size="none", head_memory_mb=64).head_options() == {"tag_chunk_size": None, "head_memory_bytes": 64 * 2**20}
    with pytest.raises(ValueError):
        ModelSettings(tag_chunk_size=0)
    big = vocabulary("big", n=300, seed=1, name="tiny-vocab", threshold=0.5)
    answers = []
    for options in ({"tag_chunk_size": None}, {"tag_chunk_size": 7}, {"tag_chunk_size": "auto", "head_memory_bytes": 200_000}):
        engine = TaggingEngine(make_tiny_model(), device="cpu", **options)
        engine.set_vocabulary(big)
        calls = []
        real_decode = engine.model.decode
        engine.model.decode = lambda q, e, real=real_decode: calls.append(q.shape[1]) or real(q, e)  # type: ignore[method-assign]
        answers.append([(t.names, t.values) for t in engine.infer(pixels)])
        chunks = {"None": [300], "7": [7] * 42 + [6]}.get(str(options["tag_chunk_size"]))
        if chunks is not None:
            assert calls == chunks
        else:  # auto with a budget too small for 300 tags at once: several balanced chunks
            assert len(calls) > 1 and sum(calls) == 300 and max(calls) - min(calls) <= 1
    for names_values in answers[1:]:
        for (names, values), (want_names, want_values) in zip(names_values, answers[0]):
            assert names == want_names and values == pytest.approx(want_values, abs=1e-6)

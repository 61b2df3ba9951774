"""Vocabularies named by requests: loaded once, least recently used evicted, served while the store is away."""

from __future__ import annotations

import threading
import time

import fakeredis
import pytest
import torch

from helpers import jpeg_bytes, make_tiny_model, random_images
from ramplus_core import Vocabulary, select_tags
from ramplus_core.errors import VocabularyError
from workers.stream.engine import TaggingEngine
from workers.errors import ErrorKind, InputError
from workers.metrics import ReplicaMetrics
from workers.vocab.cache import VocabularyCache
from workers.vocab.store import VocabStore


def vocabulary(name: str, version: str, n: int = 5, seed: int = 0, dim: int = 512) -> Vocabulary:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, 2, dim, generator=g), dim=-1)
    return Vocabulary.from_embeddings([f"{name}{version}-t{i}" for i in range(n)], emb, thresholds=0.0, name=name, version=version)


class CountingStore:
    """An in-memory store that counts loads, can be made slow, and can go away."""

    def __init__(self, *vocabs: Vocabulary) -> None:
        self.vocabs = {v.ref: v for v in vocabs}
        self.active: dict[str, str] = {}
        self.loads: list[str] = []
        self.delay_s = 0.0
        self.down = False

    def load(self, name: str, version: str) -> Vocabulary:
        if self.down:
            raise ConnectionError("store is down")
        self.loads.append(f"{name}@{version}")
        time.sleep(self.delay_s)
        if f"{name}@{version}" not in self.vocabs:
            raise VocabularyError(f"{name}@{version}: no such version")
        return self.vocabs[f"{name}@{version}"]

    def active_version(self, name: str) -> str | None:
        if self.down:
            raise ConnectionError("store is down")
        return self.active.get(name)


def prepare(v: Vocabulary):
    return make_tiny_model().prepare_vocabulary(v)


def make_cache(store: CountingStore, **kw) -> VocabularyCache:
    return VocabularyCache(prepare, load=store.load, active_version=store.active_version, **kw)


def test_a_version_is_loaded_once_and_the_least_recently_used_is_evicted():
    store = CountingStore(*(vocabulary("a", str(i), seed=i) for i in range(4)))
    metrics = ReplicaMetrics()
    cache = make_cache(store, capacity=2, metrics=metrics)
    assert cache.get("a", "0").vocabulary.ref == "a@0"
    assert cache.get("a", "0").vocabulary.ref == "a@0"
    cache.get("a", "1")
    cache.get("a", "0")  # now a@1 is the least recently used
    cache.get("a", "2")
    assert cache.refs() == ["a@0", "a@2"]
    assert store.loads == ["a@0", "a@1", "a@2"]
    cache.get("a", "1")
    assert store.loads[-1] == "a@1" and cache.refs() == ["a@2", "a@1"]
    assert metrics.vocab_cache.labels(outcome="hit")._value.get() == 2
    assert metrics.vocab_cache.labels(outcome="evicted")._value.get() == 2
    assert metrics.vocab_cache_size._value.get() == 2


def test_concurrent_requests_for_one_version_share_one_load():
    store = CountingStore(vocabulary("a", "1"))
    store.delay_s = 0.3
    cache = make_cache(store)
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("a", "1").vocabulary.ref)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == ["a@1"] * 6 and store.loads == ["a@1"]


def test_a_bad_version_is_refused_as_validation_and_not_reloaded_for_each_request():
    wrong_dim = vocabulary("a", "small", dim=64)
    store = CountingStore(wrong_dim)
    cache = make_cache(store, refused_ttl_s=60)
    for ref in (("a", "missing"), ("a", "small")):
        for _ in range(3):
            with pytest.raises(InputError) as err:
                cache.get(*ref)
            assert err.value.kind is ErrorKind.VALIDATION
    assert str(err.value).startswith("vocabulary a@small is refused: embeddings are 64-d")
    assert store.loads == ["a@missing", "a@small"]
    assert len(cache) == 0


def test_a_name_follows_its_active_version_and_keeps_the_last_answer_while_the_store_is_away():
    store = CountingStore(vocabulary("a", "1"), vocabulary("a", "2", seed=2))
    cache = make_cache(store, resolve_ttl_s=0.0, outage_backoff_s=0.0)
    with pytest.raises(InputError) as err:
        cache.get("a", None)
    assert err.value.kind is ErrorKind.VALIDATION and "no active version" in str(err.value)
    store.active["a"] = "1"
    assert cache.get("a", None).vocabulary.ref == "a@1"
    store.active["a"] = "2"
    assert cache.get("a", None).vocabulary.ref == "a@2"
    store.down = True
    # Loaded versions and the last resolution keep serving; an unloaded one is a FETCH dead letter (replayable).
    assert cache.get("a", None).vocabulary.ref == "a@2"
    assert cache.get("a", "1").vocabulary.ref == "a@1"
    with pytest.raises(InputError) as err:
        cache.get("b", None)
    assert err.value.kind is ErrorKind.FETCH and "store unavailable" in str(err.value)
    with pytest.raises(InputError) as err:
        cache.get("a", "3")
    assert err.value.kind is ErrorKind.FETCH
    store.down = False
    with pytest.raises(InputError) as err:  # store back: a real answer, not a cached outage
        cache.get("a", "3")
    assert err.value.kind is ErrorKind.VALIDATION


def test_while_the_store_is_away_it_is_asked_once_per_backoff_not_per_request(monkeypatch):
    import workers.vocab.cache as cache_module

    now = [1000.0]  # the cache's clock, moved by the test: a busy machine cannot stretch the loop past the backoff
    monkeypatch.setattr(cache_module.time, "monotonic", lambda: now[0])
    store = CountingStore(vocabulary("a", "1"))
    store.active["a"] = "1"
    calls: list[str] = []
    real = store.active_version
    store.active_version = lambda name: calls.append(name) or real(name)
    cache = make_cache(store, resolve_ttl_s=0.0, outage_backoff_s=0.3)
    assert cache.get("a", None).vocabulary.ref == "a@1"
    store.down = True
    for _ in range(20):
        assert cache.get("a", None).vocabulary.ref == "a@1"  # the last answer, without asking every time
        with pytest.raises(InputError) as err:
            cache.get("a", "2")
        assert err.value.kind is ErrorKind.FETCH
    assert len(calls) == 2 and store.loads == ["a@1"]  # one call before, one failed call during the outage
    now[0] += 0.35
    store.down = False
    store.active["a"] = "1"
    cache.get("a", None)
    assert len(calls) == 3  # asked again once the backoff has passed


def test_without_a_store_only_the_active_and_previous_versions_are_served():
    engine = TaggingEngine(make_tiny_model(), device="cpu")
    assert engine.vocabulary_for("tiny-vocab") is None
    assert engine.vocabulary_for("tiny-vocab@1").vocabulary.ref == "tiny-vocab@1"
    for ref in ("tiny-vocab@2", "other"):
        with pytest.raises(InputError) as err:
            engine.vocabulary_for(ref)
        assert err.value.kind is ErrorKind.VALIDATION and "not served here" in str(err.value)
    engine.set_vocabulary(vocabulary("tiny-vocab", "2"))
    assert engine.vocabulary_for("tiny-vocab@1").vocabulary.ref == "tiny-vocab@1"  # the one switched away from
    assert engine.vocabulary_for("tiny-vocab@2").vocabulary.ref == "tiny-vocab@2"
    assert engine.cache.refs() == ["tiny-vocab@1"]


def test_a_mixed_batch_tags_each_image_with_its_own_vocabulary_exactly_as_offline():
    redis_store = VocabStore(fakeredis.FakeRedis())
    other = vocabulary("products", "7", n=9, seed=5)
    redis_store.publish(other, dtype="float32")
    redis_store.activate("products", "7")
    engine = TaggingEngine(make_tiny_model(), device="cpu", fast=False, vocab_store=redis_store)
    images = random_images(4, seed=9)
    pixels = [engine.decode(jpeg_bytes(im), f"{i}") for i, im in enumerate(images)]
    choices = [None, engine.vocabulary_for("products"), engine.vocabulary_for("products@7"), engine.vocabulary_for("tiny-vocab@1")]
    got = engine.infer(pixels, choices)
    assert [t.vocab for t in got] == ["tiny-vocab@1", "products@7", "products@7", "tiny-vocab@1"]
    model = make_tiny_model()
    x = torch.stack(pixels)
    for vocab, rows in ((model.vocabulary, [0, 3]), (other, [1, 2])):
        expected = select_tags(model.tag_logits(x[rows], vocab), vocab, all_scores=True)
        for row, exp in zip(rows, expected):
            assert exp.tags and [t.tag for t in got[row].tags] == exp.names
            assert all(t.score == pytest.approx(exp.scores[t.tag], abs=1e-5) for t in got[row].tags)

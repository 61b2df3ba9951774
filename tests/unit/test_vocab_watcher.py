"""A replica follows the active vocabulary: switches between batches, refuses bad versions, survives Redis."""

from __future__ import annotations

import json
import time

import fakeredis
import pytest

from infra.local.kit import wait_until
import torch

from helpers import make_tiny_model, random_images
from ramplus_core import Vocabulary
from workers.stream.engine import TaggingEngine
from workers.vocab.store import VocabStore
from workers.vocab.watcher import VocabularyWatcher


def vocabulary(version: str, n: int = 6, seed: int = 0) -> Vocabulary:
    torch.manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, 2, 512), dim=-1)
    return Vocabulary.from_embeddings([f"v{version}-t{i}" for i in range(n)], emb, thresholds=0.0, name="live", version=version)


@pytest.fixture
def setup():
    store = VocabStore(fakeredis.FakeRedis())
    engine = TaggingEngine(make_tiny_model(), device="cpu")
    watcher = VocabularyWatcher(store, "live", engine.set_vocabulary, current=lambda: engine.vocabulary.ref,
                                dim=512, poll_interval_s=0.1)
    watcher.start()
    yield store, engine, watcher
    watcher.stop()


def test_activating_a_version_switches_the_engine_and_results_name_it(setup):
    store, engine, _ = setup
    store.publish(vocabulary("1"))
    store.activate("live", "1")
    assert wait_until(lambda: engine.vocabulary.ref == "live@1", 5, interval_s=0.02)
    pixels = engine.decode(__import__("helpers").jpeg_bytes(random_images(1)[0]), "x")
    out = engine.infer([pixels])[0]
    assert out.vocab == "live@1" and all(t.tag.startswith("v1-") for t in out.tags)
    store.publish(vocabulary("2", n=3, seed=1))
    store.activate("live", "2")
    assert wait_until(lambda: engine.vocabulary.ref == "live@2", 5, interval_s=0.02)
    assert engine.infer([pixels])[0].vocab == "live@2"
    store.rollback("live")
    assert wait_until(lambda: engine.vocabulary.ref == "live@1", 5, interval_s=0.02)


def test_a_corrupt_version_is_refused_and_the_old_one_kept(setup):
    store, engine, watcher = setup
    store.publish(vocabulary("1"))
    store.activate("live", "1")
    assert wait_until(lambda: engine.vocabulary.ref == "live@1", 5, interval_s=0.02)
    store.publish(vocabulary("2"))
    meta = json.loads(store.redis.get("ramplus:vocab:live:2:meta"))
    store.redis.set(f"ramplus:vocab:live:2:{meta['upload']}:0", b"\x00" * meta["bytes"])
    store.activate("live", "2")
    assert wait_until(lambda: "2" in watcher.refused, 5, interval_s=0.02)
    assert engine.vocabulary.ref == "live@1"
    assert watcher.metrics.vocab_refused.labels(reason="checksum")._value.get() == 1


def test_a_wrong_dimension_is_refused(setup):
    store, engine, watcher = setup
    emb = torch.nn.functional.normalize(torch.randn(3, 1, 256), dim=-1)
    store.publish(Vocabulary.from_embeddings(["a", "b", "c"], emb, name="live", version="small"))
    store.activate("live", "small")
    assert wait_until(lambda: "small" in watcher.refused, 5, interval_s=0.02)
    assert "dimension" in watcher.refused["small"] and engine.vocabulary.ref == "tiny-vocab@1"


def test_redis_errors_keep_the_vocabulary_and_the_watcher_recovers(setup):
    store, engine, watcher = setup
    store.publish(vocabulary("1"))
    store.activate("live", "1")
    assert wait_until(lambda: engine.vocabulary.ref == "live@1", 5, interval_s=0.02)
    real = store.redis
    down = fakeredis.FakeServer()
    down.connected = False  # fakeredis raises ConnectionError on every command to this server
    store.redis = fakeredis.FakeRedis(server=down)
    assert wait_until(lambda: watcher.metrics.errors.labels(stage="vocab")._value.get() >= 1, 5, interval_s=0.02)
    assert engine.vocabulary.ref == "live@1"
    store.redis = real
    store.publish(vocabulary("2", seed=3))
    store.activate("live", "2")
    assert wait_until(lambda: engine.vocabulary.ref == "live@2", 15, interval_s=0.02)


def test_a_published_version_is_prefetched_so_activate_loads_nothing_and_a_bad_one_is_still_refused():
    store = VocabStore(fakeredis.FakeRedis())
    engine = TaggingEngine(make_tiny_model(), device="cpu")
    loads: list[str] = []
    real_load = store.load
    store.load = lambda name, version=None, **kw: loads.append(f"{name}@{version}") or real_load(name, version, **kw)
    watcher = VocabularyWatcher(
        store, "live", engine.set_vocabulary, current=lambda: engine.vocabulary.ref, dim=512, poll_interval_s=0.1,
        cached=engine.cache.peek, prefetch=lambda v: engine.cache.put(engine.prepare_vocabulary(v)),
    )
    watcher.start()
    try:
        assert wait_until(lambda: watcher._pubsub is not None and watcher._pubsub.subscribed, 5, interval_s=0.02)
        store.publish(vocabulary("1"))
        store.publish(vocabulary("other-name", n=3), name="elsewhere")  # not ours: not prefetched
        assert wait_until(lambda: engine.cache.peek("live@1") is not None, 5, interval_s=0.02)
        assert loads == ["live@1"]
        store.activate("live", "1")
        assert wait_until(lambda: engine.vocabulary.ref == "live@1", 5, interval_s=0.02)
        assert loads == ["live@1"] and engine.cache.refs() == ["tiny-vocab@1"]  # active left the cache, previous joined
        assert 0 < watcher.metrics.vocab_switch_seconds._sum.get() < 5  # recorded; bounded only as a user would notice
        announce, store._event = store._event, lambda *a: None  # corrupt it before anyone hears of it
        store.publish(vocabulary("2"))
        meta = json.loads(store.redis.get("ramplus:vocab:live:2:meta"))
        store.redis.set(f"ramplus:vocab:live:2:{meta['upload']}:0", b"\x00" * meta["bytes"])
        store._event = announce
        store._event("published", "live", "2")
        assert wait_until(lambda: loads[-1] == "live@2", 5, interval_s=0.02)
        time.sleep(0.2)
        assert engine.cache.peek("live@2") is None  # the prefetch read corrupt bytes and kept nothing
        store.activate("live", "2")
        assert wait_until(lambda: "2" in watcher.refused, 5, interval_s=0.02) and engine.vocabulary.ref == "live@1"
        assert watcher.metrics.vocab_refused.labels(reason="checksum")._value.get() == 1
    finally:
        watcher.stop()

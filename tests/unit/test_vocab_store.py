"""The Redis vocabulary store's rules, on fakeredis (the real server is in tests/integration)."""

from __future__ import annotations

import json

import fakeredis
import pytest
import torch

from ramplus_core import Vocabulary, VocabularyError
from workers.vocab.store import EVENTS, VocabStore, VocabStoreError, parse_ref


def vocab(n: int = 5, seed: int = 0, version: str = "1", ragged: bool = True) -> Vocabulary:
    g = torch.Generator().manual_seed(seed)
    per_tag = [torch.nn.functional.normalize(torch.randn(1 + (i % 3 if ragged else 0), 16, generator=g), dim=-1) for i in range(n)]
    return Vocabulary.from_embeddings([f"t{i}" for i in range(n)], per_tag, thresholds=[0.5 + i / 100 for i in range(n)],
                                      name="demo", version=version, text_encoder="test")


@pytest.fixture
def store() -> VocabStore:
    return VocabStore(fakeredis.FakeRedis(), chunk_bytes=100)  # tiny chunks: many of them


def test_a_published_version_loads_back_equal_in_fp32_and_close_in_fp16(store):
    v = vocab()
    assert store.publish(v, dtype="float32") == "demo@1"
    back = store.load("demo", "1")
    assert back.tags == v.tags and torch.equal(back.counts, v.counts)
    assert torch.allclose(back.thresholds, v.thresholds)
    assert torch.equal(back.embeddings, v.embeddings)
    store.publish(v, version="2")  # fp16 by default
    assert (store.load("demo", "2").embeddings - v.embeddings).abs().max() < 1e-3
    assert store.show("demo", "1")["chunks"] > 1


def test_a_load_keeps_the_stored_dtype_and_padding_and_a_content_hash_that_checks(store):
    v = vocab()  # ragged: 1-3 descriptions per tag
    store.publish(v, version="2")
    back = store.load("demo", "2")
    assert back.embeddings.dtype == torch.float16 and back.embeddings.shape == v.embeddings.shape
    assert torch.equal(back.counts, v.counts) and torch.equal(back.mask(), v.mask())
    back.validate(check_sha=True)  # the hash carried over from the store's check is the content's own
    back.embeddings[0, 0, 0] = 0.5  # any change to the tensor is seen by the next validation
    with pytest.raises(VocabularyError, match="sha256 mismatch"):
        back.validate(check_sha=True)
    back.embeddings[1, 0, 0] = float("nan")  # the finiteness scan is remembered, but not across changes
    with pytest.raises(VocabularyError, match="non-finite"):
        back.validate(check_sha=False)


@pytest.mark.parametrize("where", ["description", "padding"])
def test_nan_bytes_with_a_matching_checksum_are_refused_on_load(store, where):
    import hashlib

    import numpy as np

    v = vocab()
    store.publish(v, version="9")
    meta_key = "ramplus:vocab:demo:9:meta"
    meta = json.loads(store.redis.get(meta_key))
    array = v.embeddings.to(torch.float16).numpy().copy()
    tag = 0 if where == "padding" else 2  # tag 0 has 1 of 3 descriptions: row 2 is padding
    array[tag, 2, 3] = np.nan
    payload = array.tobytes()
    for i in range(meta["chunks"]):
        store.redis.delete(f"ramplus:vocab:demo:9:{meta['upload']}:{i}")
    meta["chunks"] = 1
    meta["sha256"] = hashlib.sha256(payload).hexdigest()  # a writer that checksummed bad values
    store.redis.set(f"ramplus:vocab:demo:9:{meta['upload']}:0", payload)
    store.redis.set(meta_key, json.dumps(meta))
    with pytest.raises(VocabularyError, match=f"non-finite .* first in tag 't{tag}'"):
        store.load("demo", "9")


def test_versions_are_immutable(store):
    store.publish(vocab())
    with pytest.raises(VocabStoreError, match="immutable"):
        store.publish(vocab(seed=1))


def test_activate_rollback_and_events(store):
    events = store.redis.pubsub()
    events.subscribe(EVENTS)
    events.get_message()
    store.publish(vocab(version="1"))
    store.publish(vocab(seed=1, version="2"))
    assert store.active_version("demo") is None
    store.activate("demo", "1")
    assert store.activate("demo", "2") == "1"
    assert store.load("demo").ref == "demo@2"
    assert store.rollback("demo") == "1"
    assert store.active_version("demo") == "1"
    with pytest.raises(VocabStoreError, match="no previous"):
        store.rollback("demo")
    seen = []
    while (m := events.get_message()) is not None:
        seen.append(json.loads(m["data"]))
    assert [(e["event"], e["version"]) for e in seen] == [
        ("published", "1"), ("published", "2"), ("activated", "1"), ("activated", "2"), ("activated", "1"),
    ]


def test_only_complete_versions_can_be_activated(store):
    with pytest.raises(VocabStoreError, match="does not exist"):
        store.activate("demo", "9")


def test_the_active_version_cannot_be_deleted_others_can(store):
    store.publish(vocab(version="1"))
    store.publish(vocab(version="2"))
    store.activate("demo", "1")
    with pytest.raises(VocabStoreError, match="is active"):
        store.delete("demo", "1")
    store.delete("demo", "2")
    assert store.versions("demo") == ["1"]
    assert not [k for k in store.redis.scan_iter("ramplus:vocab:demo:2:*")]
    assert store.names() == ["demo"]


@pytest.mark.parametrize("damage", ["bytes", "chunk", "shape"])
def test_corrupt_versions_are_refused_with_the_reason(store, damage):
    store.publish(vocab())
    meta_key = "ramplus:vocab:demo:1:meta"
    meta = json.loads(store.redis.get(meta_key))
    chunk = f"ramplus:vocab:demo:1:{meta['upload']}:0"
    if damage == "bytes":
        store.redis.set(chunk, b"\x00" * len(store.redis.get(chunk)))
        match = "checksum"
    elif damage == "chunk":
        store.redis.delete(chunk)
        match = "missing"
    else:
        meta["shape"] = [meta["shape"][0], meta["shape"][1], 8]
        store.redis.set(meta_key, json.dumps(meta))
        match = "do not hold"
    with pytest.raises(VocabularyError, match=match):
        store.load("demo", "1")


def test_wrong_dimension_and_nan_are_refused(store):
    store.publish(vocab())
    with pytest.raises(VocabularyError, match="dimension 16, the model needs 512"):
        store.load("demo", "1", dim=512)
    bad = vocab(version="2", ragged=False)
    bad.embeddings[0, 0, 0] = float("nan")
    with pytest.raises(VocabStoreError, match="not finite"):
        store.publish(bad)


def test_refs_parse_and_reject_separators():
    assert parse_ref("demo") == ("demo", None)
    assert parse_ref("demo@3") == ("demo", "3")
    with pytest.raises(VocabStoreError, match="no ':'"):
        parse_ref("a:b")


# -- memory: neither publish nor load holds a vocabulary's bytes twice (50,000 x 51 x 512 is 2.6 GB in fp16) --


class Wire:
    """fakeredis as a network client behaves for memory: every reply is a fresh bytes object, and chunk values
    written are only measured (so that what the server keeps is not counted as the publisher's memory)."""

    def __init__(self) -> None:
        self.server = fakeredis.FakeRedis()
        self.chunk_writes: list[tuple[type, int]] = []

    def set(self, key, value, **kwargs):  # noqa: ANN001, ANN003, ANN201
        if not key.endswith(":meta"):
            self.chunk_writes.append((type(value), len(value)))
            value = b"x"
        return self.server.set(key, value, **kwargs)

    def get(self, key):  # noqa: ANN001, ANN201
        value = self.server.get(key)
        return None if value is None else bytes(bytearray(value))

    def mget(self, keys):  # noqa: ANN001, ANN201
        return [self.get(k) for k in keys]

    def __getattr__(self, name):  # noqa: ANN001, ANN201
        return getattr(self.server, name)


def traced_peak(fn) -> int:  # noqa: ANN001
    import tracemalloc

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def big_vocab() -> Vocabulary:
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(200, 4, 512, generator=g), dim=-1)  # 800 KiB in fp16
    return Vocabulary.from_embeddings([f"t{i}" for i in range(200)], emb, name="big", version="1")


def test_publish_hands_the_client_one_chunk_at_a_time_and_never_copies_the_whole():
    wire, chunk = Wire(), 64 * 1024
    store = VocabStore(wire, chunk_bytes=chunk)
    v = big_vocab()
    # fakeredis loads its command table (~0.9 MB) on a process's first command: not the publisher's memory
    # (the test failed when it ran alone, first in its process, and passed after other tests)
    wire.server.set("warm-up", b"1")
    peak = traced_peak(lambda: store.publish(v))
    payload = 200 * 4 * 512 * 2
    assert [n for _, n in wire.chunk_writes] == [chunk] * (payload // chunk) + [payload % chunk]
    assert all(kind is memoryview for kind, _ in wire.chunk_writes)
    assert peak < 2 * chunk + 64 * 1024  # a chunk or two and the metadata JSON, not the 800 KiB payload


def test_load_reads_chunk_by_chunk_into_one_buffer():
    server, chunk = fakeredis.FakeRedis(), 16 * 1024
    VocabStore(server, chunk_bytes=chunk).publish(big_vocab())
    wire = Wire()
    wire.server = server
    loaded = []
    peak = traced_peak(lambda: loaded.append(VocabStore(wire).load("big", "1")))
    payload = 200 * 4 * 512 * 2
    # the buffer the vocabulary keeps, plus a chunk in flight (and the client's copies of it), not all 50 chunks
    assert peak < payload + 8 * chunk
    assert (loaded[0].embeddings - big_vocab().embeddings).abs().max() < 1e-3


@pytest.mark.parametrize("chunk_bytes", [101, 4096])
def test_chunks_of_any_size_and_a_bf16_source_load_back_as_their_fp16_bytes(chunk_bytes):
    store = VocabStore(fakeredis.FakeRedis(), chunk_bytes=chunk_bytes)
    v = vocab(n=7)
    bf16 = Vocabulary.from_embeddings(v.tags, v.embeddings, counts=v.counts, thresholds=v.thresholds, name="demo",
                                      version="2", dtype="bfloat16")
    store.publish(v)
    store.publish(bf16)
    assert torch.equal(store.load("demo", "1").embeddings, v.embeddings.to(torch.float16))
    assert torch.equal(store.load("demo", "2").embeddings, bf16.embeddings.to(torch.float16))


def test_a_chunk_longer_than_the_metadata_says_is_refused(store):
    store.publish(vocab())
    meta = json.loads(store.redis.get("ramplus:vocab:demo:1:meta"))
    key = f"ramplus:vocab:demo:1:{meta['upload']}:{meta['chunks'] - 1}"
    store.redis.set(key, store.redis.get(key) + b"\x00\x00")
    with pytest.raises(VocabularyError, match="hold more than"):
        store.load("demo", "1")


def test_a_value_that_overflows_fp16_is_refused_and_leaves_no_chunks(store):
    v = vocab(n=50, ragged=False)
    v.embeddings[40, 0, 0] = 1e6  # finite in fp32, inf in fp16: found in a late chunk
    with pytest.raises(VocabStoreError, match="not finite in float16"):
        store.publish(v)
    assert not list(store.redis.scan_iter("ramplus:vocab:demo:*"))

"""The vocabulary store on the real redis-server: chunks, the active pointer and pub/sub events."""

from __future__ import annotations

import json

import torch

from ramplus_core import Vocabulary
from workers.vocab.store import EVENTS, VocabStore


def test_publish_activate_and_load_through_a_real_server(redis_client, unique):
    name = f"it-{unique}"
    store = VocabStore(redis_client, chunk_bytes=64 * 1024)
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(300, 4, 512), dim=-1)
    vocabulary = Vocabulary.from_embeddings([f"tag{i}" for i in range(300)], emb, thresholds=0.6, name=name, version="1")
    events = redis_client.pubsub()
    events.subscribe(EVENTS)
    events.get_message(timeout=2)

    store.publish(vocabulary)
    store.activate(name, "1")
    loaded = store.load(name, dim=512)

    assert store.show(name)["chunks"] == -(-300 * 4 * 512 * 2 // (64 * 1024))  # 1.2 MB of fp16 in 64 KiB chunks: 19
    assert loaded.ref == f"{name}@1" and loaded.tags == vocabulary.tags
    assert (loaded.embeddings - vocabulary.embeddings).abs().max() < 1e-3
    received = [json.loads(events.get_message(timeout=5)["data"]) for _ in range(2)]
    assert [(e["event"], e["name"]) for e in received] == [("published", name), ("activated", name)]
    events.close()
    for key in redis_client.scan_iter(match=f"ramplus:vocab:{name}:*"):
        redis_client.delete(key)

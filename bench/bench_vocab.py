"""Vocabulary store at official size: publish and load times, bytes in Redis, the replica's memory.

    python bench/bench_vocab.py [--tags 4585 --descriptions 51]

4,585 tags x 51 descriptions x 512 (the official RAM++ vocabulary's shape), random unit vectors, stored as
fp16 (about 239 MB) in 64 MiB chunks on the local stack's redis-server (started here when not running).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import redis
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `infra.local` (the stack and its kit) lives in the repository, not the wheel


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags", type=int, default=4585)
    parser.add_argument("--descriptions", type=int, default=51)
    args = parser.parse_args()

    from infra.local.kit import local_stack

    env = local_stack(["redis"])

    from ramplus_core import Vocabulary
    from workers.vocab.store import VocabStore

    client = redis.Redis.from_url(env["RAMPLUS_REDIS__URL"])
    store = VocabStore(client)
    name = f"bench-{int(time.time())}"
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(args.tags, args.descriptions, 512), dim=-1)
    vocab = Vocabulary.from_embeddings([f"tag{i}" for i in range(args.tags)], emb, thresholds=0.68, name=name, version="1")
    del emb
    before_mem = client.info("memory")["used_memory"]

    t = time.perf_counter()
    store.publish(vocab)
    publish_s = time.perf_counter() - t
    stored = client.info("memory")["used_memory"] - before_mem
    t = time.perf_counter()
    store.activate(name, "1")
    activate_ms = (time.perf_counter() - t) * 1000

    del vocab
    rss_before = rss_mib()
    t = time.perf_counter()
    loaded = store.load(name, dim=512)
    load_s = time.perf_counter() - t
    rss_after = rss_mib()
    # What a CPU replica then holds besides: the model-ready tensors (an fp32 model keeps an fp16 vocabulary as it
    # is, so nothing more since issue 19; on a GPU it is a device copy in the model's dtype).
    from ramplus_core import create_model

    model = create_model("tiny@64", seed=0)
    rss_model = rss_mib()
    t = time.perf_counter()
    prepared = model.prepare_vocabulary(loaded)
    prepare_s = time.perf_counter() - t
    rss_prepared = rss_mib()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"vocabulary {args.tags} x {args.descriptions} x 512 fp16: {stored / 2**20:.0f} MiB in Redis, {store.show(name)['chunks']} chunks")
    print(f"publish: {publish_s:.2f} s   activate: {activate_ms:.1f} ms   load + validate: {load_s:.2f} s")
    print(f"loader process RSS: +{rss_after - rss_before:.0f} MiB for the loaded vocabulary ({loaded.embeddings.dtype} in memory)")
    print(f"model-ready copy ({prepared.embeddings.dtype}, CPU): prepare {prepare_s:.2f} s, +{rss_prepared - rss_model:.0f} MiB; "
          f"peak RSS {peak:.0f} MiB")
    print(f"loaded {loaded.ref}, {len(loaded)} tags")
    for key in client.scan_iter(match=f"ramplus:vocab:{name}:*"):
        client.delete(key)


if __name__ == "__main__":
    main()

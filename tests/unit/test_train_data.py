"""A training rank's data: where a manifest's images are fetched from, and each rank's share."""

from __future__ import annotations

from workers.train.data import fetchable_uri, shard_records
from workers.train.manifest import ManifestRecord


def test_manifest_locations_become_what_the_fetchers_take(tmp_path):
    manifest = str(tmp_path / "ds" / "manifest.jsonl")
    assert fetchable_uri(manifest, "images/0.jpg") == f"file://{tmp_path}/ds/images/0.jpg"
    assert fetchable_uri(manifest, "/abs/x.jpg") == "file:///abs/x.jpg"
    assert fetchable_uri(manifest, "https://h/x.jpg") == "https://h/x.jpg"
    assert fetchable_uri("s3://bkt/ds/manifest.jsonl", "images/0.jpg") == "s3://bkt/ds/images/0.jpg"
    assert fetchable_uri("s3://bkt/ds/manifest.jsonl", "s3://other/y.png") == "s3://other/y.png"


def test_every_rank_gets_an_equal_disjoint_share():
    records = [ManifestRecord(uri=f"{i}.jpg", captions=["c"]) for i in range(11)]
    shares = [shard_records(records, rank, 3, seed=5) for rank in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]  # equal: DDP ranks step in lockstep
    uris = [r.uri for s in shares for r in s]
    assert len(set(uris)) == 9
    assert shard_records(records, 1, 3, seed=5) == shares[1]  # seeded

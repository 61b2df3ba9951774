"""Backfill planning: listing filters, content-defined shards, the output layout, and what counts as done."""

from __future__ import annotations

import json

import pytest

from workers.backfill.plan import (
    MAX_SHARD_FACTOR,
    ListedObject,
    existing_shards,
    list_objects,
    plan_shards,
    run_prefix,
    selection_id,
    select,
    shard_of,
    split_s3_prefix,
    transient_error_count,
)


class FakeS3:
    """list_objects_v2 pages of at most `page` keys, as the real paginator returns them."""

    def __init__(self, objects: dict[str, int], page: int = 3) -> None:
        self.objects, self.page = objects, page
        self.calls = 0

    def get_paginator(self, name: str):  # noqa: ANN201
        assert name == "list_objects_v2"
        fake = self

        class Paginator:
            def paginate(self, Bucket: str, Prefix: str):  # noqa: N803, ANN201
                keys = sorted(k for k in fake.objects if k.startswith(Prefix))
                for i in range(0, len(keys), fake.page):
                    fake.calls += 1
                    yield {"Contents": [{"Key": k, "Size": fake.objects[k], "ETag": f'"e-{k}"'} for k in keys[i : i + fake.page]]}
                if not keys:
                    yield {}

        return Paginator()


def objects(n: int, prefix: str = "img/") -> list[ListedObject]:
    return [ListedObject(f"{prefix}{i:05d}.jpg", 100 + i) for i in range(n)]


def test_listing_walks_every_page_and_keeps_sizes_and_etags():
    s3 = FakeS3({f"p/{i}.jpg": i for i in range(10)} | {"other/x.jpg": 1}, page=3)
    listed = list(list_objects(s3, "b", "p/"))
    assert [o.key for o in listed] == sorted(f"p/{i}.jpg" for i in range(10))
    assert s3.calls == 4
    assert listed[0] == ListedObject("p/0.jpg", 0, "e-p/0.jpg")


def test_select_filters_relative_to_the_prefix_and_marks_too_large_objects():
    listed = [
        ListedObject("in/a.jpg", 10), ListedObject("in/sub/b.png", 10), ListedObject("in/c.txt", 10),
        ListedObject("in/skip/d.jpg", 10), ListedObject("in/big.jpg", 5000), ListedObject("in/folder/", 0),
    ]
    got = select(listed, "in/", include=["*.jpg", "*.png"], exclude=["skip/*"], max_bytes=1000)
    assert [o.key for o in got.objects] == ["in/a.jpg", "in/big.jpg", "in/sub/b.png"]
    assert got.too_large == {"in/big.jpg"}
    assert (got.listed, got.excluded) == (6, 3)


def test_shards_are_deterministic_cover_every_object_once_and_are_bounded():
    objs = objects(5000)
    shards = plan_shards(objs, 100)
    assert plan_shards(objs, 100) == shards
    assert [o for s in shards for o in s.objects] == objs
    sizes = [len(s.objects) for s in shards]
    assert max(sizes) <= MAX_SHARD_FACTOR * 100
    assert 20 <= len(shards) <= 100  # about 5000 / 100 on average
    assert len({s.name for s in shards}) == len(shards)


def test_adding_objects_renames_only_the_shards_they_fall_in():
    objs = objects(3000)
    before = {s.name for s in plan_shards(objs, 100)}
    grown = sorted([*objs, ListedObject("img/01500a.jpg", 1), ListedObject("img/00007a.jpg", 1)], key=lambda o: o.key)
    after = plan_shards(grown, 100)
    changed = [s for s in after if s.name not in before]
    assert 1 <= len(changed) <= 2
    assert {"img/01500a.jpg", "img/00007a.jpg"} <= {k for s in changed for k in s.keys}


def test_plan_rejects_a_zero_shard_size():
    with pytest.raises(ValueError, match="shard_size"):
        plan_shards(objects(3), 0)


def test_run_prefix_separates_models_vocabulary_versions_inputs_and_formats():
    sel = selection_id("s3://in/images/", ["*"], [], "jsonl")
    a = run_prefix("results/", "tiny@64", "ab" * 32, "tags@1", sel)
    assert a == f"results/tiny@64-abababababab/tags@1/in-{sel}/"
    assert run_prefix("results", "tiny@64", "ab" * 32, "tags@1", sel) == a
    assert run_prefix("results/", "tiny@64", "ab" * 32, "tags@2", sel) != a
    assert run_prefix("results/", "tiny@64", "cd" * 32, "tags@1", sel) != a
    others = {
        selection_id("s3://other/images/", ["*"], [], "jsonl"), selection_id("s3://in/images/", ["*.jpg"], [], "jsonl"),
        selection_id("s3://in/images/", ["*"], ["tmp/*"], "jsonl"), selection_id("s3://in/images/", ["*"], [], "parquet"),
    }
    assert sel not in others and len(others) == 4
    assert selection_id("s3://in/images/", ["*"], [], "jsonl") == sel  # a rerun finds its own folder


def test_done_shards_are_read_from_the_results_folder_only():
    run = "out/m-1/v@1/"
    s3 = FakeS3({
        run + "results/part-aaa.jsonl": 5, run + "results/part-bbb.parquet": 5, run + "errors/part-ccc.jsonl": 5,
        run + "summary.json": 5, run + "results/notes.txt": 1,
    })
    assert existing_shards(s3, "b", run, "results/") == {
        "part-aaa": run + "results/part-aaa.jsonl", "part-bbb": run + "results/part-bbb.parquet",
    }
    assert set(existing_shards(s3, "b", run, "errors/")) == {"part-ccc"}
    assert shard_of(run + "summary.json", "results/") is None


def test_transient_errors_are_fetch_and_internal_ones():
    lines = [{"kind": "decode"}, {"kind": "fetch"}, {"kind": "not_image"}, {"kind": "internal"}]
    assert transient_error_count("\n".join(json.dumps(x) for x in lines).encode()) == 2
    assert transient_error_count(b"") == 0


@pytest.mark.parametrize("uri", ["bucket/p", "s3://", "s3:///p", "http://b/p", "s3://user@b/p"])
def test_bad_s3_prefixes_are_refused_with_the_option_name(uri):
    with pytest.raises(ValueError, match="--input"):
        split_s3_prefix(uri)


def test_s3_prefix_may_be_a_whole_bucket():
    assert split_s3_prefix("s3://b") == ("b", "")
    assert split_s3_prefix("s3://b/x/y/") == ("b", "x/y/")


def test_a_stop_signal_is_a_flag_the_loop_checks_and_a_second_one_stops_at_once():
    import signal

    from workers.backfill.run import _Interrupted, _StopRequest

    stop = _StopRequest()
    stop.check()  # nothing asked yet
    stop(signal.SIGINT, None)  # the handler itself raises nothing: a raise there can be dropped by Python
    assert stop.signal == "SIGINT"
    with pytest.raises(_Interrupted, match="SIGINT"):
        stop.check()
    with pytest.raises(_Interrupted, match="SIGTERM"):
        stop(signal.SIGTERM, None)

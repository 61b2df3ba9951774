"""`S3ResultSink.recover` on the real S3 server, on purpose (issue 24): the heart of effectively-once results,
which otherwise runs only when a crash happens to land between a PUT and a commit. Lines at or past the
committed offset are removed, an object that straddles it is rewritten with the lines before it, and
nothing before the offset (or in another partition) is touched."""

from __future__ import annotations

import json

import pytest

from workers.schemas import ResultLine
from workers.settings import S3Settings
from workers.stream.s3_sink import S3ResultSink

pytestmark = pytest.mark.integration
TP, OTHER = ("requests", 0), ("requests", 1)


def lines(tp, offsets) -> list[ResultLine]:
    return [ResultLine(f"id-{tp[1]}-{o}", o, json.dumps({"id": f"id-{tp[1]}-{o}", "source": {"topic": tp[0], "partition": tp[1], "offset": o}}))
            for o in offsets]


def snapshot(s3_client, bucket: str) -> dict[str, bytes]:
    out = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", ()):
            out[obj["Key"]] = s3_client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def offsets_in(body: bytes) -> list[int]:
    return [json.loads(line)["source"]["offset"] for line in body.decode().splitlines() if line.strip()]


def test_recover_removes_what_is_past_the_offset_and_rewrites_the_object_that_straddles_it(stack, aws_env, s3_client, s3_bucket):
    settings = S3Settings(endpoint_url=stack.s3_endpoint, bucket=s3_bucket, prefix="results/")
    earlier, crashed = S3ResultSink(settings), S3ResultSink(settings)  # two replica processes, two writer tokens
    before = [earlier.write(TP, lines(TP, range(0, 5))), crashed.write(TP, lines(TP, range(5, 10)))]
    straddling = crashed.write(TP, lines(TP, range(10, 15)))
    past = crashed.write(TP, lines(TP, range(15, 20)))
    elsewhere = crashed.write(OTHER, lines(OTHER, range(12, 20)))
    start = snapshot(s3_client, s3_bucket)

    successor = S3ResultSink(settings)  # the next owner of the partition, committed offset 12
    assert successor.recover(TP, 12) == 3 + 5

    now = snapshot(s3_client, s3_bucket)
    assert {k: now[k] for k in before} == {k: start[k] for k in before}  # before the offset: byte for byte the same
    assert now[elsewhere] == start[elsewhere]  # another partition: untouched
    assert straddling not in now and past not in now
    rewritten = [k for k in now if k not in start]
    assert len(rewritten) == 1 and offsets_in(now[rewritten[0]]) == [10, 11]
    assert S3ResultSink.parse_key(rewritten[0]) == (10, 11)
    every = sorted(o for k, body in now.items() if k.startswith("results/requests/00000/") for o in offsets_in(body))
    assert every == list(range(12))  # each line before the offset exactly once, none past it

    assert successor.recover(TP, 12) == 0  # again: nothing more to remove
    assert snapshot(s3_client, s3_bucket) == now
    assert successor.recover(TP, 20) == 0  # an offset past everything written removes nothing


def test_recover_at_the_start_of_a_partition_removes_all_of_it(stack, aws_env, s3_client, s3_bucket):
    sink = S3ResultSink(S3Settings(endpoint_url=stack.s3_endpoint, bucket=s3_bucket, prefix="results/"))
    sink.write(TP, lines(TP, range(0, 4)))
    sink.write(OTHER, lines(OTHER, range(0, 4)))
    assert sink.recover(TP, 0) == 4
    left = snapshot(s3_client, s3_bucket)
    assert len(left) == 1 and "/requests/00001/" in next(iter(left))  # only the other partition's object remains

"""Results into S3 as JSON lines, one object per partition per batch, under deterministic keys.

Key: `{prefix}{topic}/{partition:05d}/{first:020d}-{last:020d}-{writer}.jsonl`: first and last offset of
the results in it, and a token drawn once per sink (per replica process). Writing the same results again
from the same process overwrites; the writer token makes each process's objects its own, so that a
write it must take back (`withdraw`, see the pipeline's ownership rules) never removes another replica's.
Offsets are committed only after the PUT succeeded, so a crash can leave objects whose records are
replayed. `recover` runs when a partition is assigned, before it is consumed: it removes
every result line at or past the committed offset (deleting objects wholly past it, rewriting one that
straddles it), so that the replay writes each id exactly once, whatever its batch boundaries are.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import structlog

from workers.io.s3 import ensure_bucket, s3_client
from workers.stream.records import TopicPartition
from workers.schemas import ResultLine
from workers.settings import S3Settings

log = structlog.get_logger("ramplus.s3")


class S3ResultSink:
    def __init__(self, settings: S3Settings, *, client: Any = None, recovery_window: int = 10_000) -> None:
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        self.client = client or s3_client(settings)
        # How far below the committed offset an object that straddles it can start: bounded by how many
        # records a replica holds uncommitted (max_in_flight + one poll), with a wide margin.
        self.recovery_window = recovery_window
        self.writer = secrets.token_hex(4)
        if settings.create_bucket:
            ensure_bucket(self.client, self.bucket)

    def partition_prefix(self, tp: TopicPartition) -> str:
        return f"{self.prefix}{tp[0]}/{tp[1]:05d}/"

    def key(self, tp: TopicPartition, first: int, last: int) -> str:
        return f"{self.partition_prefix(tp)}{first:020d}-{last:020d}-{self.writer}.jsonl"

    @staticmethod
    def parse_key(key: str) -> tuple[int, int]:
        first, last = key.rsplit("/", 1)[1].removesuffix(".jsonl").split("-")[:2]
        return int(first), int(last)

    def write(self, tp: TopicPartition, results: list[ResultLine]) -> str:
        """Durable when it returns; returns the key, for `withdraw`."""
        offsets = [r.offset for r in results if r.offset is not None]
        if len(offsets) != len(results):
            raise ValueError("stream results must carry their source offsets")
        body = "".join(r.json + "\n" for r in results).encode()
        key = self.key(tp, min(offsets), max(offsets))
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/x-ndjson")
        return key

    def withdraw(self, key: str) -> None:
        """Remove an object this sink wrote (idempotent: gone already is fine)."""
        if not key.rsplit("/", 1)[1].endswith(f"-{self.writer}.jsonl"):
            raise ValueError(f"{key} was not written by this sink")
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def objects_from(self, tp: TopicPartition, first_at_least: int) -> list[str]:
        # Keys sort by first offset; starting after "{first_at_least - 1}-" keeps a few keys too many, never too few.
        start_after = f"{self.partition_prefix(tp)}{first_at_least - 1:020d}-" if first_at_least > 0 else ""
        keys: list[str] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.partition_prefix(tp)}
        if start_after:
            kwargs["StartAfter"] = start_after
        for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
            keys.extend(o["Key"] for o in page.get("Contents", ()))
        return keys

    def recover(self, tp: TopicPartition, committed: int) -> int:
        """Remove results at offsets >= `committed` for this partition; returns how many lines were removed."""
        removed = 0
        for key in self.objects_from(tp, max(0, committed - self.recovery_window)):
            first, last = self.parse_key(key)
            if last < committed:
                continue
            if first >= committed:
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                removed += sum(1 for line in body.splitlines() if line.strip())
                self.client.delete_object(Bucket=self.bucket, Key=key)
                continue
            lines = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read().decode().splitlines()
            keep = [line for line in lines if line.strip() and json.loads(line)["source"]["offset"] < committed]
            removed += sum(1 for line in lines if line.strip()) - len(keep)
            kept_last = max(json.loads(line)["source"]["offset"] for line in keep)
            self.client.put_object(
                Bucket=self.bucket, Key=self.key(tp, first, kept_last), Body=("\n".join(keep) + "\n").encode(),
                ContentType="application/x-ndjson",
            )
            self.client.delete_object(Bucket=self.bucket, Key=key)
        if removed:
            log.info("s3.recovered", topic=tp[0], partition=tp[1], committed=committed, removed_lines=removed)
        return removed

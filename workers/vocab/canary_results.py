"""Canary results in S3 (workers/vocab/canary.py): written by replicas, read by `ramplus vocab canary-report`."""

from __future__ import annotations

import json
import secrets
from typing import Any

from workers.io.s3 import s3_client
from workers.settings import S3Settings

TopicPartition = tuple[str, int]


class S3CanarySink:
    """Canary results (`workers/vocab/canary.py`) as JSON lines under their own prefix, one folder per canary:
    `{canary_prefix}{name}@{version}/{topic}/{partition:05d}/{first:020d}-{last:020d}-{writer}.jsonl`.

    Consumers never see them (the prefixes are apart, see `S3Settings`). No recovery on assignment: a
    replayed request is written again under its new owner's token, and readers keep one line per id.
    """

    def __init__(self, settings: S3Settings, *, client: Any = None) -> None:
        self.bucket = settings.bucket
        self.prefix = settings.canary_prefix
        self.client = client or s3_client(settings)
        self.writer = secrets.token_hex(4)

    def folder(self, ref: str) -> str:
        return f"{self.prefix}{ref}/"

    def write(self, ref: str, tp: TopicPartition, offsets: list[int], lines: list[str]) -> str:
        key = f"{self.folder(ref)}{tp[0]}/{tp[1]:05d}/{min(offsets):020d}-{max(offsets):020d}-{self.writer}.jsonl"
        body = "".join(line + "\n" for line in lines).encode()
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/x-ndjson")
        return key

    def read(self, ref: str) -> list[dict[str, Any]]:
        """Every canary line of `ref` (a replayed request may have several: readers keep its latest)."""
        rows: list[dict[str, Any]] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.folder(ref)):
            for obj in page.get("Contents", ()):
                body = self.client.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read().decode()
                rows.extend(json.loads(line) for line in body.splitlines() if line.strip())
        return rows

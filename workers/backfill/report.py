"""What a backfill writes: each shard's results and error report, and the run's summary.

A shard's error report goes first and its result object last: the result object is the mark of a finished
shard, the only thing a rerun looks at (`workers.backfill.plan.existing_shards`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from workers.backfill.plan import ERRORS, RESULTS
from workers.errors import ErrorKind
from workers.schemas import utc_now


class BackfillError(BaseModel):
    """One line of a shard's error report."""

    uri: str
    kind: ErrorKind
    message: str
    size: int
    etag: str = ""
    ts: datetime = Field(default_factory=utc_now)


class BackfillSummary(BaseModel):
    """What a run did; printed at the end and written next to the shards as `summary.json`."""

    input: str
    output: str = Field(description="The run's folder: <output>/<model>-<fingerprint>/<vocab>/")
    model: str
    fingerprint: str
    vocab: str
    complete: bool = False
    listed: int = 0
    selected: int = 0
    excluded: int = 0
    shards: int = 0
    shards_skipped: int = 0
    shards_retried: int = Field(0, description="Done before, redone because their errors were transient")
    shards_written: int = 0
    images_written: int = Field(0, description="Images (tagged or reported) in the shards this run wrote")
    shards_superseded: int = Field(0, description="Shards of an earlier listing, removed after a complete run")
    images_skipped: int = 0
    images_tagged: int = 0
    errors: dict[str, int] = Field(default_factory=dict)
    seconds: float = 0.0
    images_per_s: float = Field(0.0, description="Tagged images / seconds since the pipeline started (start-up included)")
    images_per_s_steady: float = Field(0.0, description="Images / seconds from the first 10% of this run's images to its end")


@dataclass
class ShardWriter:
    """Collects a shard's lines as they arrive (in any order) and writes it when the last one is in."""

    client: Any
    bucket: str
    run: str
    format: str
    expected: dict[str, int]
    lines: dict[str, list[tuple[str, bool, str]]] = field(default_factory=dict)
    written: int = 0
    images: int = 0

    def add(self, shard: str, key: str, ok: bool, line: str) -> bool:
        """True when this line completed its shard (which is then written)."""
        got = self.lines.setdefault(shard, [])
        got.append((key, ok, line))
        if len(got) < self.expected[shard]:
            return False
        self.write(shard, self.lines.pop(shard))
        return True

    def write(self, shard: str, rows: list[tuple[str, bool, str]]) -> None:
        rows.sort(key=lambda r: r[0])
        errors = [line for _, ok, line in rows if not ok]
        results = [line for _, ok, line in rows if ok]
        error_key = f"{self.run}{ERRORS}{shard}.jsonl"
        if errors:
            self.client.put_object(Bucket=self.bucket, Key=error_key, Body="\n".join(errors).encode() + b"\n")
        else:  # a redone shard may have had errors before
            self.client.delete_object(Bucket=self.bucket, Key=error_key)
        if self.format == "parquet":
            body, suffix = _parquet([json.loads(line) for line in results]), ".parquet"
        else:
            body, suffix = ("\n".join(results).encode() + b"\n") if results else b"", ".jsonl"
        # Last: a result object is the mark of a finished shard.
        self.client.put_object(Bucket=self.bucket, Key=f"{self.run}{RESULTS}{shard}{suffix}", Body=body)
        self.written += 1
        self.images += len(rows)


def _parquet(records: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("id", pa.string()), ("uri", pa.string()),
        ("tags", pa.list_(pa.struct([("tag", pa.string()), ("score", pa.float64())]))),
        ("vocab", pa.string()), ("model", pa.string()), ("ts", pa.string()), ("worker", pa.string()),
        ("size", pa.int64()), ("etag", pa.string()),
    ])
    rows = [{**{k: r[k] for k in ("id", "uri", "tags", "vocab", "model", "ts", "worker")}, **(r.get("meta") or {})} for r in records]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue()

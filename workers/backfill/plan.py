"""What a backfill has to do: list the input prefix, filter it, cut it into shards, see what is already done.

No Ray here: the plan is pure bookkeeping over S3 listings, so it is unit-tested with fakes and the same
plan comes out of every run over the same bucket.

Shards are cut where the keys say, not every N keys: after any key whose hash is 0 modulo
`shard_size` (and at 4 x `shard_size` at most). A shard's name is a hash of its keys. Objects added to
or removed from the bucket change only the shards they fall in; every other shard keeps its name, so a
rerun after the bucket grew skips it.

Output layout, one folder per model and vocabulary version (a new model or version never sees an old
one's shards as done)::

    <output>/<model id>-<weights fingerprint[:12]>/<vocab name>@<version>/
        results/part-<hash>.jsonl|.parquet   one per shard, written last: its presence means done
        errors/part-<hash>.jsonl             the shard's unreadable objects, only when it has some
        summary.json                         the last run's summary
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.errors import ErrorKind
from workers.io.s3 import S3UriError, parse_s3_uri

RESULTS, ERRORS = "results/", "errors/"
TRANSIENT_KINDS = frozenset({ErrorKind.FETCH.value, ErrorKind.INTERNAL.value})
MAX_SHARD_FACTOR = 4


def split_s3_prefix(uri: str, what: str = "--input") -> tuple[str, str]:
    """`s3://bucket[/prefix]` -> (bucket, prefix); the prefix is used verbatim (no implied '/')."""
    try:
        return parse_s3_uri(uri)
    except S3UriError as exc:
        raise ValueError(f"{what} {uri!r}: expected s3://bucket/prefix ({exc})") from None


@dataclass(frozen=True, slots=True)
class ListedObject:
    key: str
    size: int
    etag: str = ""


@dataclass
class Selection:
    """A listing after the filters: what will be read, what is too large to read, and the counts."""

    objects: list[ListedObject] = field(default_factory=list)  # sorted by key, too-large ones included
    too_large: set[str] = field(default_factory=set)
    listed: int = 0
    excluded: int = 0


def list_objects(client: Any, bucket: str, prefix: str) -> Iterator[ListedObject]:
    """Every object under the prefix, page by page (list_objects_v2 returns at most 1,000 per call)."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            yield ListedObject(obj["Key"], int(obj["Size"]), str(obj.get("ETag", "")).strip('"'))


def select(
    objects: Iterable[ListedObject], prefix: str, include: Sequence[str], exclude: Sequence[str], max_bytes: int
) -> Selection:
    """Keys are matched relative to the prefix; folder markers ('.../' of size 0) are not objects."""
    out = Selection()
    for obj in objects:
        out.listed += 1
        relative = obj.key[len(prefix) :] if obj.key.startswith(prefix) else obj.key
        if obj.key.endswith("/") and obj.size == 0:
            out.excluded += 1
            continue
        if not any(fnmatch.fnmatchcase(relative, p) for p in include) or any(fnmatch.fnmatchcase(relative, p) for p in exclude):
            out.excluded += 1
            continue
        out.objects.append(obj)
        if obj.size > max_bytes:
            out.too_large.add(obj.key)
    out.objects.sort(key=lambda o: o.key)
    return out


@dataclass(frozen=True)
class Shard:
    name: str
    objects: tuple[ListedObject, ...]

    @property
    def keys(self) -> list[str]:
        return [o.key for o in self.objects]


def _is_boundary(key: str, shard_size: int) -> bool:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") % shard_size == 0


def shard_name(keys: Iterable[str]) -> str:
    return "part-" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def plan_shards(objects: Sequence[ListedObject], shard_size: int) -> list[Shard]:
    """Content-defined shards of the (sorted) objects: about `shard_size` each, never over 4x that."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    shards: list[Shard] = []
    current: list[ListedObject] = []
    for obj in objects:
        current.append(obj)
        if _is_boundary(obj.key, shard_size) or len(current) >= MAX_SHARD_FACTOR * shard_size:
            shards.append(Shard(shard_name(o.key for o in current), tuple(current)))
            current = []
    if current:
        shards.append(Shard(shard_name(o.key for o in current), tuple(current)))
    return shards


def selection_id(input_uri: str, include: list[str], exclude: list[str], fmt: str) -> str:
    """What a run reads and how it writes it, as 12 hex digits: two backfills that differ in any of these never
    share an output folder, so neither can take the other's shards as done or delete them as superseded."""
    what = json.dumps({"input": input_uri, "include": include, "exclude": exclude, "format": fmt}, sort_keys=True)
    return hashlib.sha256(what.encode()).hexdigest()[:12]


def run_prefix(output_prefix: str, model_id: str, fingerprint: str, vocab_ref: str, selection: str) -> str:
    """The run's folder: model and weights, vocabulary version, then the input selection and format
    (`selection_id`). A rerun of the same backfill finds its own folder; any other backfill has another."""
    base = output_prefix if not output_prefix or output_prefix.endswith("/") else output_prefix + "/"
    return f"{base}{model_id}-{fingerprint[:12]}/{vocab_ref}/in-{selection}/"


def shard_of(key: str, folder: str) -> str | None:
    """`.../results/part-x.jsonl` -> 'part-x' (None for anything that is not a shard object)."""
    name = key.rsplit("/", 1)[-1]
    if not key.rsplit("/", 1)[0].endswith(folder.rstrip("/")) or not name.startswith("part-"):
        return None
    return name.split(".", 1)[0]


def require_bucket(client: Any, bucket: str, what: str) -> None:
    """A clear error now rather than a failed write after an hour of tagging."""
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as exc:  # noqa: BLE001 - botocore's ClientError; 404 and 403 say the same to the user
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
        raise ValueError(f"{what}: bucket {bucket!r} is not there or not accessible ({code})") from exc


def existing_shards(client: Any, bucket: str, run: str, folder: str) -> dict[str, str]:
    """{shard name: object key} under `run` + `folder`."""
    out: dict[str, str] = {}
    for obj in list_objects(client, bucket, run + folder):
        name = shard_of(obj.key, folder)
        if name is not None:
            out[name] = obj.key
    return out


def transient_error_count(body: bytes) -> int:
    """Errors in a shard's error report that a rerun may not hit again (fetch failures, our own bugs)."""
    count = 0
    for line in body.decode("utf-8").splitlines():
        if line.strip() and json.loads(line).get("kind") in TRANSIENT_KINDS:
            count += 1
    return count

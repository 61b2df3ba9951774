"""Dataset manifests: one JSON object per line, one line per image, on a local path or at ``s3://bucket/key``.

A line is a :class:`ManifestRecord`::

    {"uri": "images/00000000.jpg", "captions": ["a red circle on a black background", ...],
     "tags": ["black background", "circle", "red"], "split": "train"}

``uri`` is either relative to the folder (or S3 prefix) the manifest is in, as ``write_dataset`` writes
it, so a dataset can be moved or copied whole, or an absolute URI (``s3://``, ``file://``, ``https://``)
or path; :func:`resolve_uri` turns it into something to open. Unknown fields are refused, so a typo in a
hand-written manifest is an error, not silently missing data. Blank lines are skipped.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ramplus_core.errors import RamPlusError
from workers.io.s3 import S3UriError, parse_s3_uri
from workers.settings import S3Settings

__all__ = ["ManifestError", "ManifestRecord", "read_manifest", "resolve_uri", "split_s3_uri", "write_manifest"]


class ManifestError(RamPlusError, ValueError):
    """A manifest that cannot be read: not found, not JSON lines, or a line that is not a record."""


class ManifestRecord(BaseModel):
    """One image of a dataset: where it is, what it shows (tags) and how it is described (captions)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(min_length=1, description="Image location, relative to the manifest's folder or absolute")
    captions: list[str] = Field(min_length=1, description="At least one caption; the first is the main one")
    tags: list[str] = Field(default_factory=list, description="Tags present in the image (may be empty)")
    split: Literal["train", "val", "test"] | None = Field(None, description="Which split the image belongs to")

    @field_validator("captions", "tags")
    @classmethod
    def _no_empty_strings(cls, values: list[str]) -> list[str]:
        if any(not v.strip() for v in values):
            raise ValueError("must not contain empty strings")
        return values


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``; the key may be empty (a whole bucket)."""
    try:
        return parse_s3_uri(uri)
    except S3UriError as exc:
        raise ManifestError(f"{uri}: {exc}") from None


def resolve_uri(manifest: str | Path, uri: str) -> str:
    """A record's ``uri`` as an absolute location: relative ones are taken from the manifest's folder."""
    if "://" in uri or Path(uri).is_absolute():
        return uri
    manifest = str(manifest)
    if "://" in manifest:  # s3://, or any URL: the folder is everything up to the last slash
        return manifest.rsplit("/", 1)[0] + "/" + uri
    return str(Path(manifest).parent / uri)


def _client(s3: S3Settings | None, client: Any) -> Any:
    if client is not None:
        return client
    from workers.io.s3 import s3_client

    return s3_client(s3 or S3Settings())


def write_manifest(
    location: str | Path,
    records: Iterable[ManifestRecord],
    *,
    s3: S3Settings | None = None,
    client: Any = None,
) -> int:
    """Write the records as JSON lines (a local file atomically, or one S3 object); returns how many.

    For an ``s3://`` location the client is ``client``, or one built from ``s3`` (endpoint and region;
    credentials from the AWS chain).
    """
    body = "".join(r.model_dump_json(exclude_none=True) + "\n" for r in records)
    location = str(location)
    if location.startswith("s3://"):
        bucket, key = split_s3_uri(location)
        _client(s3, client).put_object(Bucket=bucket, Key=key, Body=body.encode(), ContentType="application/x-ndjson")
    else:
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(body)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return body.count("\n")


def parse_manifest(text: str, *, origin: str = "manifest") -> list[ManifestRecord]:
    """Records from JSON-lines text; a bad line raises :class:`ManifestError` naming ``origin:line``."""
    records: list[ManifestRecord] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{origin}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{where}: not JSON ({exc.msg} at column {exc.colno}); each line must be one object") from exc
        if not isinstance(raw, dict):
            raise ManifestError(f"{where}: expected a JSON object with uri and captions, got {type(raw).__name__}")
        try:
            records.append(ManifestRecord.model_validate(raw))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in exc.errors())
            raise ManifestError(f"{where}: not a manifest record ({problems})") from exc
    return records


def read_manifest(location: str | Path, *, s3: S3Settings | None = None, client: Any = None) -> list[ManifestRecord]:
    """Every record of a manifest on a local path or at ``s3://bucket/key``, in file order."""
    location = str(location)
    if location.startswith("s3://"):
        bucket, key = split_s3_uri(location)
        c = _client(s3, client)
        try:
            data = c.get_object(Bucket=bucket, Key=key)["Body"].read()
        except c.exceptions.NoSuchKey as exc:
            raise ManifestError(f"{location}: no such object; check the bucket and key") from exc
    else:
        try:
            data = Path(location).read_bytes()
        except FileNotFoundError as exc:
            raise ManifestError(f"{location}: no such manifest file; check the path") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{location}: not UTF-8 text (byte {exc.start}); a manifest is JSON lines") from exc
    return parse_manifest(text, origin=location)

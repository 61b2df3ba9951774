"""The messages on the wire: a request on the input topic, a result line in S3, a dead letter.

Requests are parsed leniently about extra fields (producers may add their own) and strictly about the
ones we use. Results and dead letters are what consumers downstream rely on: change them additively.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ramplus_core.tagging import TagScore
from workers.errors import ErrorKind, InputError

SCHEMES = ("s3", "https", "http", "file")
MAX_ID_LENGTH = 512


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class TagRequest(BaseModel):
    """`{"id": ..., "uri": ..., "vocab": "name[@version]"?, "meta": {...}?}`, keyed by id on the topic."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(min_length=1, max_length=MAX_ID_LENGTH, description="The producer's id; results carry it back.")
    uri: str = Field(min_length=1, max_length=4096, description="s3://bucket/key, https://host/path or file:///path")
    vocab: str | None = Field(
        default=None, pattern=r"^[^:@]{1,200}(@[^:@]{1,200})?$",
        description="name or name@version; default: the replica's active one",
    )
    meta: dict[str, Any] | None = Field(default=None, description="Copied into the result untouched.")

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
        if scheme not in SCHEMES:
            raise ValueError(f"unsupported URI scheme {scheme or '(none)'!r}; expected one of {', '.join(SCHEMES)}")
        return uri

    @classmethod
    def parse(cls, value: bytes | None) -> TagRequest:
        """Bytes from the topic -> a request, or an `InputError` that says what is wrong with them."""
        if value is None:
            raise InputError(ErrorKind.MALFORMED, "empty message (tombstone): expected a JSON request")
        try:
            data = json.loads(value.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InputError(ErrorKind.MALFORMED, f"message is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
        except json.JSONDecodeError as exc:
            raise InputError(ErrorKind.MALFORMED, f"message is not JSON ({exc.msg} at char {exc.pos})") from exc
        if not isinstance(data, dict):
            raise InputError(ErrorKind.MALFORMED, f"message is JSON {type(data).__name__}, expected an object")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']}" for e in exc.errors())
            raise InputError(ErrorKind.VALIDATION, f"invalid request: {problems}") from exc


class SourceRef(BaseModel):
    """Where a record came from: enough to find it again on the topic."""

    topic: str
    partition: int
    offset: int


class TagResult(BaseModel):
    """One JSON line per image in the result objects."""

    id: str
    uri: str
    tags: list[TagScore] = Field(description="Above their thresholds, score-descending.")
    vocab: str = Field(description="name@version of the vocabulary that tagged it")
    model: str = Field(description="the model's id (config key)")
    ts: datetime = Field(default_factory=utc_now)
    worker: str
    source: SourceRef | None = Field(default=None, description="The request's topic position (stream); none in a backfill")
    meta: dict[str, Any] | None = None


class ErrorInfo(BaseModel):
    kind: ErrorKind
    message: str


class DeadLetter(BaseModel):
    """A record that could not be tagged, with the original payload byte for byte."""

    original: str = Field(description="The record's value: text when it is UTF-8, else base64")
    encoding: Literal["utf-8", "base64", "none"] = "utf-8"
    id: str | None = Field(default=None, description="The request id when the payload parsed far enough")
    error: ErrorInfo
    source: SourceRef
    ts: datetime = Field(default_factory=utc_now)
    worker: str

    @classmethod
    def build(cls, value: bytes | None, error: InputError, source: SourceRef, worker: str, request_id: str | None = None) -> DeadLetter:
        if value is None:
            original, encoding = "", "none"
        else:
            try:
                original, encoding = value.decode("utf-8"), "utf-8"
            except UnicodeDecodeError:
                original, encoding = base64.b64encode(value).decode("ascii"), "base64"
        return cls(
            original=original,
            encoding=encoding,
            id=request_id,
            error=ErrorInfo(kind=error.kind, message=str(error)),
            source=source,
            worker=worker,
        )

    def original_bytes(self) -> bytes | None:
        if self.encoding == "none":
            return None
        return base64.b64decode(self.original) if self.encoding == "base64" else self.original.encode("utf-8")

"""The messages on the wire: a request on the input topic, a result line in S3, a dead letter.

Requests are parsed leniently about extra fields (producers may add their own) and strictly about the
ones we use. Results and dead letters are what consumers downstream rely on: change them additively.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, NamedTuple

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ramplus_core.tagging import ImageTags, TagScore
from workers.errors import ErrorKind, InputError

SCHEMES = ("s3", "https", "http", "file")
MAX_ID_LENGTH = 512
# A request is a few hundred bytes; `meta` makes it larger. Over this it is refused before it is decoded.
MAX_REQUEST_BYTES = 256 * 1024
# Results and dead letters are serialised by pydantic, which refuses deep nesting: refuse it on the way in.
MAX_JSON_DEPTH = 32
# What a dead letter carries of the record's value; the whole is summed up by its size and sha256.
DEAD_LETTER_ORIGINAL_BYTES = 64 * 1024
MAX_ERROR_MESSAGE = 4096
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")  # escaped as \u00XX in JSON: six bytes for one


class VocabRef(NamedTuple):
    """`name` or `name@version`: how requests, the CLI and the jobs name a vocabulary. Parsed only here."""

    name: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> VocabRef:
        """Raises ValueError (callers turn it into their own error) unless `text` is `name[@version]`, each part
        1-200 characters without ':' (the Redis key separator) or '@'."""
        name, at, version = text.partition("@")
        if not cls._valid(name) or (at and not cls._valid(version)):
            raise ValueError(
                f"vocabulary {text!r}: expected 'name' or 'name@version' (each 1-200 characters, no ':' or '@')"
            )
        return cls(name, version or None)

    @staticmethod
    def _valid(part: str) -> bool:
        return 0 < len(part) <= 200 and ":" not in part and "@" not in part

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class TagRequest(BaseModel):
    """`{"id": ..., "uri": ..., "vocab": "name[@version]"?, "meta": {...}?}`, keyed by id on the topic."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(min_length=1, max_length=MAX_ID_LENGTH, description="The producer's id; results carry it back.")
    uri: str = Field(min_length=1, max_length=4096, description="s3://bucket/key, https://host/path or file:///path")
    vocab: str | None = Field(default=None, description="name or name@version; default: the replica's active one")
    meta: dict[str, Any] | None = Field(default=None, description="Copied into the result untouched.")

    @field_validator("vocab")
    @classmethod
    def _vocab_ref(cls, vocab: str | None) -> str | None:
        return None if vocab is None else str(VocabRef.parse(vocab))

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
        if scheme not in SCHEMES:
            raise ValueError(f"unsupported URI scheme {scheme or '(none)'!r}; expected one of {', '.join(SCHEMES)}")
        return uri

    @classmethod
    def parse(cls, value: bytes | None, *, max_bytes: int = MAX_REQUEST_BYTES) -> TagRequest:
        """Bytes from the topic -> a request, or an `InputError` that says what is wrong with them.

        The cost is bounded whatever the bytes: the size is checked before decoding, and a request whose
        JSON nests deeper than `MAX_JSON_DEPTH` or holds text that cannot be written back out as UTF-8
        is refused here, not later when its result or dead letter is serialised (where it would fail
        for ever and hold its partition).
        """
        if value is None:
            raise InputError(ErrorKind.MALFORMED, "empty message (tombstone): expected a JSON request")
        if len(value) > max_bytes:
            raise InputError(
                ErrorKind.TOO_LARGE,
                f"message is {len(value)} bytes, over the {max_bytes}-byte limit for a request (RAMPLUS_KAFKA__MAX_REQUEST_BYTES)",
            )
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(ErrorKind.MALFORMED, f"message is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except json.JSONDecodeError as exc:
            raise InputError(ErrorKind.MALFORMED, f"message is not JSON ({exc.msg} at char {exc.pos})") from exc
        except RecursionError as exc:
            raise InputError(ErrorKind.VALIDATION, f"message nests deeper than {MAX_JSON_DEPTH} levels") from exc
        except (ValueError, MemoryError) as exc:  # e.g. an integer of more digits than Python converts
            raise InputError(ErrorKind.VALIDATION, f"message cannot be read as a request ({_short(exc)})") from exc
        if not isinstance(data, dict):
            raise InputError(ErrorKind.MALFORMED, f"message is JSON {type(data).__name__}, expected an object")
        _check_writable(data)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']}" for e in exc.errors())
            raise InputError(ErrorKind.VALIDATION, f"invalid request: {_short(problems)}") from exc


def _short(text: object, limit: int = 500) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_writable(data: Any) -> None:
    """Containers nested at most MAX_JSON_DEPTH deep, every string (keys too) encodable as UTF-8; no recursion."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)) and depth > MAX_JSON_DEPTH:
            raise InputError(ErrorKind.VALIDATION, f"message nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            strings, children = list(node), node.values()
        elif isinstance(node, list):
            strings, children = [], node
        elif isinstance(node, str):
            strings, children = [node], ()
        else:
            continue
        for text in strings:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InputError(
                    ErrorKind.VALIDATION,
                    f"message has text that is not valid Unicode (an unpaired surrogate, {text[exc.start]!a})",
                ) from exc
        stack.extend((child, depth + 1) for child in children)


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

    @classmethod
    def of(
        cls, tagged: ImageTags, *, id: str, uri: str, model: str, worker: str,  # noqa: A002 - the field's name
        source: SourceRef | None = None, meta: dict[str, Any] | None = None,
    ) -> TagResult:
        """The result for one image the engine tagged, as a model (for reading and small uses; see `line`)."""
        return cls(id=id, uri=uri, tags=tagged.tags, vocab=tagged.vocab, model=model, worker=worker, source=source, meta=meta)

    @classmethod
    def line(
        cls, tagged: ImageTags, *, id: str, uri: str, model: str, worker: str,  # noqa: A002 - the field's name
        source: SourceRef | None = None, meta: dict[str, Any] | None = None,
    ) -> ResultLine:
        """The result line for one image the engine tagged: the one builder of the stream and the backfill.

        The same JSON as `of(...).model_dump_json()` (a test holds them equal), without a pydantic object
        per tag: an image may have thousands. The envelope is serialised by pydantic, the tags by
        pydantic's own JSON encoder in one call, so numbers and escapes are written exactly alike.
        """
        envelope = cls.model_construct(
            id=id, uri=uri, tags=[], vocab=tagged.vocab, model=model, ts=utc_now(), worker=worker, source=source, meta=meta,
        )
        text = envelope.model_dump_json()
        if tagged.names:
            tags = pydantic_core.to_json([{"tag": n, "score": v} for n, v in zip(tagged.names, tagged.values)]).decode()
            # The first '"tags":[]' is the field: inside a JSON string a quote is always escaped.
            text = text.replace('"tags":[]', '"tags":' + tags, 1)
        return ResultLine(id=id, offset=source.offset if source is not None else None, json=text)


@dataclass(frozen=True, slots=True)
class ResultLine:
    """One image's result serialised once (`TagResult`'s schema), and the offset of the request it answers."""

    id: str
    offset: int | None
    json: str


class ErrorInfo(BaseModel):
    kind: ErrorKind
    message: str


class DeadLetter(BaseModel):
    """A record that could not be tagged: why, where it was, and its value (whole, or a bounded prefix).

    The dead-letter topic is at-least-once (a replica that dies between the send and the commit sends
    the letter again after the restart): `letter_id` is the same for every copy, so readers can drop repeats.
    The envelope never inflates binary bytes: the value is carried as text only when it is UTF-8 without
    control characters (which JSON would escape sixfold), otherwise as base64, and never more than
    `DEAD_LETTER_ORIGINAL_BYTES` of it; `original_size` and `original_sha256` describe the whole value.
    """

    letter_id: str = Field(description="'topic/partition/offset' of the record: equal for repeats of the same letter")
    original: str = Field(description="The record's value (or its first bytes, see `truncated`): text, or base64")
    encoding: Literal["utf-8", "base64", "none", "omitted"] = Field(
        "utf-8", description="utf-8 or base64: how `original` holds the bytes; none: the value was null; "
        "omitted: not carried (the letter had to be cut down to fit the topic)",
    )
    original_size: int = Field(0, description="Bytes in the whole value")
    original_sha256: str | None = Field(None, description="sha256 of the whole value (hex); none for a null value")
    truncated: bool = Field(False, description="`original` holds only the first bytes of the value")
    id: str | None = Field(default=None, description="The request id when the payload parsed far enough")
    error: ErrorInfo
    source: SourceRef
    ts: datetime = Field(default_factory=utc_now)
    worker: str

    @classmethod
    def build(
        cls, value: bytes | None, error: InputError, source: SourceRef, worker: str, request_id: str | None = None,
        *, max_original_bytes: int = DEAD_LETTER_ORIGINAL_BYTES,
    ) -> DeadLetter:
        encoding: Literal["utf-8", "base64", "none"]
        if value is None:
            original, encoding, truncated = "", "none", False
        else:
            prefix, truncated = value[:max_original_bytes], len(value) > max_original_bytes
            text = _plain_text(prefix, cut=truncated)
            if text is not None:
                original, encoding = text, "utf-8"
            else:
                original, encoding = base64.b64encode(prefix).decode("ascii"), "base64"
        return cls(
            letter_id=f"{source.topic}/{source.partition}/{source.offset}",
            original=original,
            encoding=encoding,
            original_size=0 if value is None else len(value),
            original_sha256=None if value is None else hashlib.sha256(value).hexdigest(),
            truncated=truncated,
            id=request_id,
            error=ErrorInfo(kind=error.kind, message=_short(str(error), MAX_ERROR_MESSAGE)),
            source=source,
            worker=worker,
        )

    def minimal(self) -> DeadLetter:
        """The same letter without the value (reason, position, size and digest): what is sent when the
        whole letter does not fit the topic."""
        return self.model_copy(update={
            "original": "", "encoding": "omitted" if self.encoding != "none" else "none",
            "truncated": self.encoding != "none", "error": ErrorInfo(kind=self.error.kind, message=_short(self.error.message, 500)),
        })

    def original_bytes(self) -> bytes | None:
        """The bytes `original` carries (all of the value unless `truncated`); None for a null value."""
        if self.encoding == "none":
            return None
        if self.encoding == "omitted":
            return b""
        return base64.b64decode(self.original) if self.encoding == "base64" else self.original.encode("utf-8")


def _plain_text(data: bytes, *, cut: bool) -> str | None:
    """`data` as text if it is UTF-8 (a character cut at the end when `cut`) with no control character
    but tab and newlines; else None."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not cut or exc.start < len(data) - 3 or exc.reason != "unexpected end of data":
            return None
        text = data[: exc.start].decode("utf-8")
    return None if _CONTROL.search(text) else text

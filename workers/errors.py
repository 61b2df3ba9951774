"""Why a request could not be tagged: the kinds that end up in the dead-letter topic.

An `InputError` is the request's fault (or its image's) and is final: the record goes to the dead-letter
topic with its kind and its offset is committed. Anything else (a server that went away, a full disk) is
the fleet's problem: the record is retried and its offset is not committed until it is done.
"""

from __future__ import annotations

from enum import Enum

from ramplus_core.errors import ImageError, RamPlusError


class ErrorKind(str, Enum):
    MALFORMED = "malformed"  # not JSON, not UTF-8, or not a request object
    VALIDATION = "validation"  # JSON, but a field is missing or wrong (bad id, unsupported URI scheme, unknown vocab)
    FORBIDDEN = "forbidden"  # the URI is outside the allowlist
    NOT_FOUND = "not_found"  # no such object, file or page
    FETCH = "fetch"  # the source could not be read after retries (unreachable host, timeouts, 5xx)
    TOO_LARGE = "too_large"  # over the byte or pixel limit
    NOT_IMAGE = "not_image"  # bytes that are no image format we know
    DECODE = "decode"  # an image that is corrupt or truncated
    INTERNAL = "internal"  # our bug while handling this record; the message has the exception


class InputError(RamPlusError):
    """A request that can never succeed as it is; `kind` says why."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = ErrorKind(kind)


def input_error_from(exc: ImageError) -> InputError:
    """ramplus_core's image errors carry their kind as a plain string."""
    return InputError(ErrorKind(getattr(exc, "kind", "decode")), str(exc))


class SourceUnavailable(RamPlusError):
    """The fleet's own storage cannot be reached (an S3 outage): not the request's fault. The pipeline
    retries the record until the storage is back (or the replica stops), and never dead-letters it for this."""


class DeadLetterRefused(RamPlusError):
    """The dead-letter topic refused a letter even cut down to its minimum (reason, position, digest): sending
    it again can never succeed. The record is skipped: committed, logged and counted, not retried for ever."""


class CodecUnavailable(RamPlusError):
    """kafka-python here cannot decode one of Kafka's compression codecs: a replica refuses to start (it
    would stop at the first batch in that codec); the message names the package to install."""

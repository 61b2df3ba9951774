"""S3 for every part of the system: the one client factory, and the bucket helper.

Credentials always come from the standard AWS chain (environment, profile, instance role), never from our
settings, so no secret can reach a log line or `ramplus settings --show`. Each client is made from its own
boto3 session: the default session is not thread-safe to create clients from, and fetch threads, Ray tasks
and the writer thread all make their own.
"""

from __future__ import annotations

from typing import Any

from workers.settings import S3Settings


def s3_client(settings: S3Settings, *, pool: int = 16, timeout_s: float = 30.0, attempts: int = 6) -> Any:
    """A boto3 S3 client for `settings`. `attempts` counts every try botocore makes (1: no retries, for
    callers that retry themselves, so that their own setting means the total)."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        config=Config(
            retries={"mode": "standard", "total_max_attempts": attempts},
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            max_pool_connections=pool,
            s3={"addressing_style": "path"} if settings.endpoint_url else None,  # local servers have no bucket DNS
        ),
    )


def ensure_bucket(client: Any, bucket: str) -> None:
    """Create `bucket` unless it exists (any other error, e.g. access denied, is raised)."""
    try:
        client.head_bucket(Bucket=bucket)
    except client.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
        client.create_bucket(Bucket=bucket)


class S3UriError(ValueError):
    """Not an `s3://bucket[/key]` URI. `reason`: 'scheme', 'credentials', 'bucket' or 'key'; the message
    does not repeat the URI, so that each caller can name it (redacted, or as its option) in its own error."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_s3_uri(uri: str, *, key_required: bool = False) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key). The key is verbatim (S3 keys may hold '//', '..', '%'); it may be
    empty (a whole bucket, or a prefix) unless `key_required`. The scheme is case-insensitive."""
    scheme, sep, rest = uri.partition("://")
    if scheme.lower() != "s3" or not sep:
        raise S3UriError("not an s3:// URI", "scheme")
    bucket, _, key = rest.partition("/")
    if "@" in bucket:
        raise S3UriError("credentials in URIs are not allowed", "credentials")
    if not bucket:
        raise S3UriError("no bucket; expected s3://bucket/key", "bucket")
    if key_required and not key:
        raise S3UriError("no key; expected s3://bucket/key", "key")
    return bucket, key

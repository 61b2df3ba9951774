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

"""Model artifacts: a model directory in our safe format, published to S3 (or a directory) and fetched back.

An artifact is what `save_pretrained` writes (config.json, model.safetensors, vocabulary.safetensors)
plus whatever the publisher adds (metrics.json, evaluation scores). Publishing uploads every file first
and `_COMPLETE` last: a JSON list of the files with their sha256. Readers want `_COMPLETE`, so a half
uploaded artifact is never loaded, and check every file against it. Artifacts are immutable: publishing
over a complete one is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import structlog

from workers.io.s3 import S3UriError, parse_s3_uri, s3_client
from workers.settings import S3Settings, Settings

log = structlog.get_logger("ramplus.artifacts")

COMPLETE = "_COMPLETE"


class ArtifactError(RuntimeError):
    """An artifact that cannot be published or read as asked."""


def split_s3_uri(uri: str) -> tuple[str, str]:
    try:
        return parse_s3_uri(uri)
    except S3UriError as exc:
        raise ArtifactError(f"{uri!r}: {exc}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listing(local_dir: Path) -> dict[str, Any]:
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != COMPLETE)
    if not files:
        raise ArtifactError(f"{local_dir} holds no files to publish")
    return {"files": {p.relative_to(local_dir).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}}


def publish_artifact(local_dir: str | Path, dest: str, s3: S3Settings | None = None, *, client: Any = None) -> str:
    """Copy `local_dir` to `dest` (s3://bucket/prefix or a directory), `_COMPLETE` last; returns `dest`."""
    local_dir = Path(local_dir)
    listing = _listing(local_dir)
    if dest.startswith("s3://"):
        bucket, prefix = split_s3_uri(dest.rstrip("/") + "/")
        client = client or s3_client(s3 or S3Settings())
        try:
            client.head_object(Bucket=bucket, Key=prefix + COMPLETE)
            raise ArtifactError(f"{dest} is already published: artifacts are immutable, publish a new version")
        except client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
        for name in listing["files"]:
            client.upload_file(str(local_dir / name), bucket, prefix + name)
        client.put_object(Bucket=bucket, Key=prefix + COMPLETE, Body=json.dumps(listing, indent=1).encode())
    else:
        target = Path(dest)
        if (target / COMPLETE).exists():
            raise ArtifactError(f"{dest} is already published: artifacts are immutable, publish a new version")
        for name in listing["files"]:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local_dir / name, target / name)
        (target / COMPLETE).write_text(json.dumps(listing, indent=1))
    log.info("artifact.published", dest=dest, files=len(listing["files"]))
    return dest


def default_cache_dir() -> Path:
    return Settings.load().model.cache_dir / "artifacts"


def fetch_artifact(uri: str, s3: S3Settings | None = None, *, cache_dir: Path | None = None, client: Any = None) -> Path:
    """A local directory holding the artifact at `uri`, every file checked against `_COMPLETE`."""
    if not uri.startswith("s3://"):
        local = Path(uri)
        if not (local / COMPLETE).is_file():
            raise ArtifactError(f"{uri} is not a complete artifact (no {COMPLETE})")
        _verify(local, json.loads((local / COMPLETE).read_text()))
        return local
    bucket, prefix = split_s3_uri(uri.rstrip("/") + "/")
    client = client or s3_client(s3 or S3Settings())
    try:
        listing = json.loads(client.get_object(Bucket=bucket, Key=prefix + COMPLETE)["Body"].read())
    except client.exceptions.ClientError as exc:
        raise ArtifactError(f"{uri} is not a complete artifact (cannot read {COMPLETE}: {exc})") from exc
    target = (cache_dir or default_cache_dir()) / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:24]
    for name, info in listing["files"].items():
        path = target / name
        if path.is_file() and path.stat().st_size == info["bytes"] and _sha256(path) == info["sha256"]:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.part")  # replicas on one node fetch at once
        client.download_file(bucket, prefix + name, str(tmp))
        tmp.replace(path)
    _verify(target, listing)
    (target / COMPLETE).write_text(json.dumps(listing))
    log.info("artifact.fetched", uri=uri, path=str(target))
    return target


def _verify(local: Path, listing: dict[str, Any]) -> None:
    for name, info in listing["files"].items():
        path = local / name
        if not path.is_file() or _sha256(path) != info["sha256"]:
            raise ArtifactError(f"artifact file {name} is missing or does not match its sha256 in {COMPLETE}")


def resolve_checkpoint(value: str | Path, s3: S3Settings | None = None) -> Path:
    """A checkpoint setting (a local .pth, a model directory, or an s3:// artifact) as a local path."""
    text = str(value)
    return fetch_artifact(text, s3) if text.startswith("s3://") else Path(text).expanduser()

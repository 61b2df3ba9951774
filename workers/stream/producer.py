"""The producers' side: turn files, folders and S3 prefixes into tag requests on the topic."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from kafka import KafkaProducer

from workers.io.local_files import image_files
from workers.io.s3 import parse_s3_uri
from workers.schemas import TagRequest
from workers.settings import KafkaSettings



def stable_id(uri: str) -> str:
    """The same URI always gets the same id, so a re-publish is recognisable downstream."""
    return hashlib.sha256(uri.encode()).hexdigest()[:32]


def file_uri(path: Path) -> str:
    return "file://" + quote(str(path.resolve()))


def iter_uris(inputs: Iterable[str], *, s3: Any = None) -> Iterator[str]:
    """URIs as given; local files as file:// URIs; folders walked for images; `s3://bucket/prefix/` listed."""
    for item in inputs:
        if item.startswith("s3://") and (item.endswith("/") or "/" not in item[5:]):  # a prefix, not an object
            bucket, prefix = parse_s3_uri(item)
            if s3 is None:
                raise ValueError(f"{item}: listing an S3 prefix needs an S3 client")
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", ()):
                    yield f"s3://{bucket}/{obj['Key']}"
        elif "://" in item:
            yield item
        else:
            path = Path(item)
            if path.is_dir():
                yield from (file_uri(p) for p in image_files(path))
            elif path.is_file():
                yield file_uri(path)
            else:
                raise FileNotFoundError(f"{item}: no such file or folder")


def make_producer(settings: KafkaSettings, **options: Any) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers.split(","), acks="all", linger_ms=20,
        **{**settings.client_options, **options},
    )


def publish(
    producer: KafkaProducer, topic: str, uris: Iterable[str], *, vocab: str | None = None, id_prefix: str = ""
) -> int:
    """Sends one request per URI (key = id, so one id always lands in the same partition); returns the count."""
    futures = []
    for uri in uris:
        request = TagRequest(id=id_prefix + stable_id(uri), uri=uri, vocab=vocab)
        futures.append(producer.send(topic, key=request.id.encode(), value=request.model_dump_json(exclude_none=True).encode()))
    producer.flush()
    for f in futures:
        f.get(timeout=60)  # raise if any send failed
    return len(futures)

"""Write the synthetic dataset (ramplus_core.synthetic) to a folder or an S3 prefix.

Layout under ``out`` (a local folder or ``s3://bucket/prefix/``)::

    images/00000000.jpg ...   JPEG, quality 92, no chroma subsampling (colours are tags here)
    manifest.jsonl            one ManifestRecord per image (uri relative to ``out``), written last
    tags.json                 {"tags", "groups", "descriptions": {tag: [...]}, "generator": {"version", ...}}
    descriptions.json         the official description layout [{tag: ["a photo of a {tag}.", ...]}],
                              ready for ``ramplus vocab build --descriptions``

Image i is scene i of ``generate(n, seed)`` and its split depends on i alone, so a re-run with a larger
``n`` rewrites the same first images and appends. The manifest is written after every image, so a
dataset with a manifest is complete. Existing files are overwritten; extra ones are left alone.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections import Counter
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from fractions import Fraction
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal

import structlog
from pydantic import BaseModel, Field
from tqdm import tqdm

from ramplus_core.errors import RamPlusError
from ramplus_core.synthetic import GENERATOR_VERSION, Scene, describe_tags, generate, tag_groups
from workers.train.manifest import ManifestRecord, split_s3_uri, write_manifest
from workers.settings import S3Settings

__all__ = ["DatasetError", "DatasetSummary", "dataset_groups", "image_key", "split_of", "write_dataset"]

log = structlog.get_logger("ramplus.synth")

JPEG_QUALITY = 92


class DatasetError(RamPlusError, ValueError):
    """A dataset that cannot be written where it was asked to go."""


class DatasetSummary(BaseModel):
    """What ``write_dataset`` wrote."""

    out: str = Field(description="The folder or s3:// prefix written to")
    manifest: str = Field(description="Location of manifest.jsonl")
    n: int
    seed: int
    size: int
    train: int
    val: int
    objects: dict[int, int] = Field(description="Images by number of objects")
    tag_counts: dict[str, int] = Field(description="Images per tag of the dataset's vocabulary, by group")
    version: int = Field(GENERATOR_VERSION, description="Generator version (ramplus_core.synthetic.GENERATORS)")
    seconds: float


def image_key(index: int) -> str:
    return f"images/{index:08d}.jpg"


def split_of(index: int, val_fraction: float) -> Literal["train", "val"]:
    """Val for exactly floor(n * fraction) of the first n images, spread evenly, for every n."""
    f = Fraction(val_fraction).limit_denominator(1_000_000)
    return "val" if int((index + 1) * f) > int(index * f) else "train"


def _jpeg(scene: Scene) -> bytes:
    buffer = io.BytesIO()
    scene.image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def dataset_groups(version: int = GENERATOR_VERSION, colours: Sequence[str] | None = None) -> dict[str, list[str]]:
    """The tags a dataset can hold, by group: its generator's, with only the colours it was drawn with."""
    groups = tag_groups(version)
    if colours is not None:
        groups["colour"] = [c for c in groups["colour"] if c in set(colours)]
    return groups


def _metadata(n: int, seed: int, size: int, val_fraction: float, version: int, colours: Sequence[str] | None) -> dict[str, bytes]:
    groups = dataset_groups(version, colours)
    tags = [t for g in groups.values() for t in g]
    every = describe_tags(version)
    descriptions = {t: every[t] for t in tags}
    meta = {
        "tags": tags,
        "groups": groups,
        "descriptions": descriptions,
        "generator": {"name": "ramplus_core.synthetic", "version": version, "n": n, "seed": seed,
                      "size": size, "val_fraction": val_fraction, "colours": list(colours) if colours is not None else None},
    }
    official = [{tag: [f"a photo of a {tag}.", *descriptions[tag]]} for tag in tags]
    return {
        "tags.json": json.dumps(meta, indent=2).encode(),
        "descriptions.json": json.dumps(official, indent=2).encode(),
    }


class _LocalWriter:
    def __init__(self, root: str) -> None:
        self.root = Path(root)
        try:
            (self.root / "images").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatasetError(f"{root}: cannot create the dataset folder there ({exc.strerror or exc})") from exc

    def put(self, key: str, body: bytes, content_type: str) -> None:
        (self.root / key).write_bytes(body)

    def location(self, key: str) -> str:
        return str(self.root / key)

    def close(self) -> None:
        pass


class _S3Writer:
    """PUTs on a thread pool; at most ``2 * workers`` bodies wait in memory, the first failure is raised."""

    def __init__(self, out: str, s3: S3Settings | None, client: Any, workers: int) -> None:
        from workers.io.s3 import s3_client

        self.bucket, prefix = split_s3_uri(out)
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.client = client or s3_client(s3 or S3Settings(), pool=workers)
        try:  # fail before drawing anything when the bucket is not there
            self.client.head_bucket(Bucket=self.bucket)
        except self.client.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            raise DatasetError(f"s3://{self.bucket}: bucket missing or not accessible ({code}); create it or check the credentials") from exc
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synth-s3")
        self.pending: set[Future[Any]] = set()
        self.limit = 2 * workers

    def put(self, key: str, body: bytes, content_type: str) -> None:
        if len(self.pending) >= self.limit:
            self._collect(FIRST_COMPLETED)
        self.pending.add(self.pool.submit(
            self.client.put_object, Bucket=self.bucket, Key=self.prefix + key, Body=body, ContentType=content_type
        ))

    def _collect(self, until: str) -> None:
        done, self.pending = wait(self.pending, return_when=until)
        for future in done:
            future.result()

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def flush(self) -> None:
        self._collect(ALL_COMPLETED)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def write_dataset(
    out: str,
    n: int,
    seed: int,
    size: int = 128,
    val_fraction: float = 0.2,
    s3: S3Settings | None = None,
    *,
    client: Any = None,
    workers: int = 8,
    progress: bool | None = None,
    version: int = GENERATOR_VERSION,
    colours: Sequence[str] | None = None,
) -> DatasetSummary:
    """Draw ``n`` scenes and write images, manifest, tags and descriptions to a folder or ``s3://bucket/prefix/``.

    For S3, ``client`` or a client built from ``s3`` (endpoint, region; credentials from the AWS chain)
    uploads on ``workers`` threads; the bucket must exist. ``progress`` defaults to whether stderr is a TTY.
    ``version`` picks the generator (``ramplus_core.synthetic.GENERATORS``); ``colours`` draws objects in
    those colours only.
    """
    if n < 1:
        raise DatasetError(f"n must be at least 1, got {n}")
    if not 0.0 <= val_fraction <= 1.0:
        raise DatasetError(f"val_fraction must be within [0, 1], got {val_fraction}")
    try:
        groups = dataset_groups(version, colours)
        next(generate(1, seed, size, version=version, colours=colours))  # bad version or colours: fail before writing
    except ValueError as exc:
        raise DatasetError(str(exc)) from exc
    started = time.perf_counter()
    writer: _LocalWriter | _S3Writer = _S3Writer(out, s3, client, workers) if out.startswith("s3://") else _LocalWriter(out)
    records: list[ManifestRecord] = []
    objects: Counter[int] = Counter()
    tag_counts: Counter[str] = Counter()
    bar = tqdm(total=n, desc="synth", unit="img", disable=not (sys.stderr.isatty() if progress is None else progress))
    try:
        for index, scene in enumerate(generate(n, seed, size, version=version, colours=colours)):
            writer.put(image_key(index), _jpeg(scene), "image/jpeg")
            records.append(ManifestRecord(uri=image_key(index), captions=scene.captions, tags=scene.tags,
                                          split=split_of(index, val_fraction)))
            objects[len(scene.objects)] += 1
            tag_counts.update(scene.tags)
            bar.update()
        for name, body in _metadata(n, seed, size, val_fraction, version, colours).items():
            writer.put(name, body, "application/json")
        if isinstance(writer, _S3Writer):
            writer.flush()  # every image is stored before the manifest that lists them
        manifest = writer.location("manifest.jsonl")
        write_manifest(manifest, records, client=getattr(writer, "client", None))
    finally:
        bar.close()
        writer.close()
    val = sum(r.split == "val" for r in records)
    summary = DatasetSummary(
        out=out, manifest=manifest, n=n, seed=seed, size=size, train=n - val, val=val,
        objects=dict(sorted(objects.items())), tag_counts={t: tag_counts[t] for g in groups.values() for t in g}, version=version,
        seconds=round(time.perf_counter() - started, 3),
    )
    log.info("synth.written", out=out, n=n, seed=seed, size=size, train=summary.train, val=val, seconds=summary.seconds)
    return summary

"""A training rank's data: the manifest split into train and validation, each rank's share, and the images
fetched and decoded once with the fleet's fetcher (same allowlists and limits) and the official preprocessing.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from ramplus_core import load_image
from ramplus_core.preprocess import pil_to_tensor
from workers.errors import InputError
from workers.io.fetchers import UriFetcher
from workers.settings import Settings
from workers.train.manifest import ManifestRecord, resolve_uri

log = structlog.get_logger("ramplus.retrain")


@dataclass(frozen=True)
class Examples:
    pixels: torch.Tensor  # [N, 3, S, S], the official preprocessing
    tags: list[list[str]]
    captions: list[list[str]]
    uris: list[str]

    def __len__(self) -> int:
        return len(self.uris)


def fetchable_uri(manifest: str, uri: str) -> str:
    """A record's location as the fetchers take it: relative ones from the manifest's folder, local paths as
    file:// URIs (absolute)."""
    location = resolve_uri(manifest, uri)
    return location if "://" in location else "file://" + str(Path(location).resolve())


def trusted_fetch_settings(settings: Settings) -> Any:
    """The fleet's fetch settings, plus the manifest's own bucket or directory: its images are trusted as it is."""
    fetch = settings.fetch.model_copy(deep=True)
    manifest = settings.train.manifest or ""
    if manifest.startswith("s3://"):
        bucket = manifest[5:].split("/", 1)[0]
        if bucket not in fetch.s3_buckets:
            fetch.s3_buckets = [*fetch.s3_buckets, bucket]
    elif manifest:
        root = Path(manifest).expanduser().resolve().parent
        if root not in fetch.file_roots:
            fetch.file_roots = [*fetch.file_roots, root]
    return fetch


def load_examples(records: list[ManifestRecord], settings: Settings, image_size: int) -> tuple[Examples, dict[str, int]]:
    """Fetch + decode + preprocess in parallel threads; an unreadable image is counted and skipped."""
    fetcher = UriFetcher(trusted_fetch_settings(settings), settings.s3)
    manifest = settings.train.manifest or ""
    f = settings.fetch

    def one(record: ManifestRecord) -> torch.Tensor | InputError:
        uri = fetchable_uri(manifest, record.uri)
        try:
            image = load_image(fetcher.fetch(uri), max_bytes=f.max_bytes, max_pixels=f.max_pixels, name=uri)
            return pil_to_tensor(image, image_size)
        except InputError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - a corrupt image must not stop training
            return InputError("decode", f"{uri}: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(f.concurrency) as pool:
        loaded = list(pool.map(one, records))
    failures: dict[str, int] = {}
    keep = []
    for record, item in zip(records, loaded):
        if isinstance(item, InputError):
            failures[item.kind.value] = failures.get(item.kind.value, 0) + 1
            log.warning("retrain.image_skipped", uri=record.uri, kind=item.kind.value, reason=str(item))
        else:
            keep.append((record, item))
    fetcher.close()
    if not keep:
        return Examples(torch.empty(0, 3, image_size, image_size), [], [], []), failures
    return Examples(
        torch.stack([p for _, p in keep]), [r.tags for r, _ in keep], [r.captions for r, _ in keep],
        [r.uri for r, _ in keep],
    ), failures


def split_records(records: list[ManifestRecord], seed: int) -> tuple[list[ManifestRecord], list[ManifestRecord]]:
    """Train / validation by the manifest's `split` field; without one, a seeded 20% is held out."""
    if any(r.split is not None for r in records):
        return [r for r in records if r.split in (None, "train")], [r for r in records if r.split in ("val", "test")]
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    cut = max(1, len(order) // 5)
    return [records[i] for i in order[cut:]], [records[i] for i in order[:cut]]


def shard_records(records: list[ManifestRecord], rank: int, world: int, seed: int) -> list[ManifestRecord]:
    """Rank `rank`'s equal share of `records`, seeded: every rank the same count (DDP steps in lockstep)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    per_rank = len(order) // world
    return [records[i] for i in order[rank * per_rank : (rank + 1) * per_rank]]

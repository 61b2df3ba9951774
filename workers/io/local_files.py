"""Local image files: which suffixes count as images when a folder is walked (`ramplus tag`, `ramplus produce`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def image_files(folder: Path) -> Iterator[Path]:
    """The images under `folder`, recursively, in sorted order."""
    return iter(sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))

"""Checkpoints we know by name: where they come from, their size and checksum."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict


class KnownCheckpoint(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    url: str
    sha256: str
    size: int
    config: str
    description: str


KNOWN_CHECKPOINTS: dict[str, KnownCheckpoint] = {
    c.name: c
    for c in (
        KnownCheckpoint(
            name="ram_plus_swin_large_14m",
            url="https://huggingface.co/xinyu1205/recognize-anything-plus-model/resolve/main/ram_plus_swin_large_14m.pth",
            sha256="497c178836ba66698ca226c7895317e6e800034be986452dbd2593298d50e87d",
            size=3_010_210_801,
            config="swin_l@384",
            description="The official RAM++ release (Swin-L, 384 px, 14M images), 4,585 tags x 51 descriptions.",
        ),
    )
}

TRUSTED_SHA256 = {c.sha256 for c in KNOWN_CHECKPOINTS.values()}

OFFICIAL_WEIGHTS_HELP = (
    "RAM++ needs the official checkpoint ram_plus_swin_large_14m.pth (3.0 GB): download it from the Hugging "
    "Face model repo xinyu1205/recognize-anything-plus-model (or run `ramplus weights fetch`) and pass "
    "--checkpoint PATH or set RAMPLUS_MODEL__CHECKPOINT. Its tag names and thresholds are ram_tag_list.txt and "
    "ram_tag_list_threshold.txt in the xinyu1205/recognize-anything repository (ram/data/)."
)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()

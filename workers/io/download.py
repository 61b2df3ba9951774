"""Fetch a known checkpoint once into a cache, resumably, and verify it by size and sha256."""

from __future__ import annotations

from pathlib import Path

import httpx
import structlog
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential
from tqdm import tqdm

from ramplus_core.errors import CheckpointError
from ramplus_core.registry import KNOWN_CHECKPOINTS, sha256_file
from workers.settings import Settings

log = structlog.get_logger(__name__)


def default_cache_dir() -> Path:
    return Settings.load().model.cache_dir / "checkpoints"


def fetch_checkpoint(
    name: str = "ram_plus_swin_large_14m",
    *,
    cache_dir: str | Path | None = None,
    url: str | None = None,
    progress: bool = True,
    timeout_s: float = 60.0,
) -> Path:
    """Path of the verified checkpoint `name`, downloading (or resuming) it when not cached yet.

    `url` overrides the registry's source (a mirror); the size and sha256 are always the registry's.
    """
    if name not in KNOWN_CHECKPOINTS:
        raise CheckpointError(f"unknown checkpoint {name!r}; known: {', '.join(KNOWN_CHECKPOINTS)}")
    known = KNOWN_CHECKPOINTS[name]
    directory = Path(cache_dir) if cache_dir else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / Path(known.url).name
    if final.is_file() and final.stat().st_size == known.size:
        return final
    part = final.with_name(final.name + ".part")
    _download(url or known.url, part, known.size, timeout_s, progress)
    digest = sha256_file(part)
    if digest != known.sha256:
        part.unlink()
        raise CheckpointError(
            f"{name}: downloaded file has sha256 {digest[:16]}..., expected {known.sha256[:16]}...: deleted, try again"
        )
    part.replace(final)
    log.info("checkpoint.fetched", name=name, path=str(final))
    return final


@retry(
    retry=retry_if_exception_type(httpx.TransportError),
    stop=stop_after_attempt(5),
    wait=wait_exponential(multiplier=1, max=30),
    reraise=True,
)
def _download(url: str, part: Path, size: int, timeout_s: float, progress: bool) -> None:
    # Each retry resumes where the .part file ends (HTTP Range), so a dropped connection costs nothing.
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have == size:
        return
    headers = {"Range": f"bytes={have}-"} if have else {}
    with httpx.stream("GET", url, headers=headers, timeout=timeout_s, follow_redirects=True) as response:
        if response.status_code == 200:
            have = 0  # the server ignored the range: start over
        elif response.status_code != 206:
            raise CheckpointError(f"download of {url} failed: HTTP {response.status_code}")
        with open(part, "ab" if have else "wb") as f, tqdm(
            total=size, initial=have, unit="B", unit_scale=True, disable=not progress, desc=part.name
        ) as bar:
            for block in response.iter_bytes(1 << 20):
                f.write(block)
                bar.update(len(block))
    if part.stat().st_size != size:
        raise httpx.TransportError(f"connection ended at {part.stat().st_size} of {size} bytes")

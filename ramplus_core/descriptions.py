"""Tag descriptions as RAM++ open-set inference expects them: the prompts, the template and the file format.

RAM++ represents every tag by 51 sentences: the template ``"a photo of a {tag}."`` followed by 10 answers to
each of 5 prompts, produced by an LLM (``generate_tag_des_llm.py`` in the official repository). This module
holds what defines those sentences (reference spec, section 6) and the JSON file they live in. Asking an LLM
for them (an HTTP client, a rate limit, a cache, settings) is I/O and lives with the fleet's vocabulary
tools: ``workers/vocab/llm.py`` and ``workers/vocab/describe.py``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import structlog

from ramplus_core.errors import DescriptionError

__all__ = [
    "DESCRIPTION_PROMPTS",
    "DescriptionSource",
    "Descriptions",
    "fill_prompts",
    "load_descriptions",
    "save_descriptions",
    "template_description",
    "validate_descriptions",
    "write_json_atomic",
]

log = structlog.get_logger(__name__)

Descriptions = list[dict[str, list[str]]]

# Verbatim from the official generator, including "a(n)" and the odd mix of ":" and "?": the released
# label embeddings were built from answers to exactly these strings, so rewording them changes the vocabulary.
DESCRIPTION_PROMPTS: tuple[str, ...] = (
    "Describe concisely what a(n) {tag} looks like:",
    "How can you identify a(n) {tag} concisely?",
    "What does a(n) {tag} look like concisely?",
    "What are the identifying characteristics of a(n) {tag}:",
    "Please provide a concise description of the visual characteristics of {tag}:",
)


def template_description(tag: str) -> str:
    """The first description of every tag, exactly as the official files have it.

    The article is always "a" (never "an") because that is what the released embeddings were built from.
    """
    return f"a photo of a {tag.lower()}."


def fill_prompts(tag: str, prompts: Sequence[str] = DESCRIPTION_PROMPTS) -> list[str]:
    """The prompts with ``{tag}`` substituted, in the order their answers appear in a description list."""
    return [prompt.format(tag=tag) for prompt in prompts]


@runtime_checkable
class DescriptionSource(Protocol):
    """Anything that can answer a prompt ``n`` times: an HTTP endpoint, a local model, a test double."""

    def complete(self, prompt: str, n: int) -> list[str]:
        """Return exactly ``n`` independent answers to ``prompt``."""
        ...


def write_json_atomic(path: Path, payload: Any, *, indent: int | None = None) -> None:
    # tmp + os.replace: a crash or a concurrent reader never sees half a file, which for the cache would
    # otherwise mean a corrupt entry that silently turns into a re-request or an error on every rerun.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, ensure_ascii=False, indent=indent)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def validate_descriptions(items: Any, *, origin: str = "descriptions") -> Descriptions:
    """Check the official layout and return it typed; raise :class:`DescriptionError` naming the bad element.

    Counts may differ between tags: hand-curated files and other LLM settings produce other than 51.
    """
    if not isinstance(items, list):
        raise DescriptionError(
            f"{origin}: expected a JSON list of {{tag: [descriptions]}} objects, got {type(items).__name__}"
        )
    for index, element in enumerate(items):
        where = f"{origin}: element {index}"
        if not isinstance(element, dict) or len(element) != 1:
            shape = f"a dict with {len(element)} keys" if isinstance(element, dict) else type(element).__name__
            raise DescriptionError(f"{where} must be a single-key object {{tag: [descriptions]}}, got {shape}")
        [(tag, descriptions)] = element.items()
        if not isinstance(tag, str) or not tag.strip():
            raise DescriptionError(f"{where} has an empty tag name; every element needs a non-empty tag")
        if not isinstance(descriptions, list) or not descriptions:
            raise DescriptionError(f"{where} ({tag!r}) must map to a non-empty list of strings")
        for position, text in enumerate(descriptions):
            if not isinstance(text, str):
                raise DescriptionError(
                    f"{where} ({tag!r}) description {position} is {type(text).__name__}, expected a string"
                )
    return items


def save_descriptions(path: Path | str, items: Descriptions) -> Path:
    """Write descriptions in the official JSON layout (validated first, written atomically)."""
    path = Path(path)
    validate_descriptions(items, origin=str(path))
    write_json_atomic(path, items, indent=2)
    log.info("descriptions_saved", path=str(path), tags=len(items))
    return path


def load_descriptions(path: Path | str) -> Descriptions:
    """Read and validate a descriptions file in the official JSON layout."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DescriptionError(f"{path}: no such descriptions file; generate one or check the path") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DescriptionError(f"{path}: not a readable JSON file ({exc})") from exc
    return validate_descriptions(raw, origin=str(path))

"""Descriptions of many tags from an answer source, cached on disk so an interrupted run resumes for free.

`DescriptionGenerator` asks a `DescriptionSource` (normally the chat-completions client of
`workers/vocab/llm.py`) the official prompts and assembles the official layout (`ramplus_core.descriptions`);
`from_settings` builds one from `RAMPLUS_LLM__*`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog
from tqdm import tqdm

from ramplus_core.descriptions import (
    DESCRIPTION_PROMPTS,
    Descriptions,
    DescriptionSource,
    fill_prompts,
    template_description,
    write_json_atomic,
)
from ramplus_core.errors import DescriptionError
from workers.settings import LLMSettings, Settings
from workers.vocab.llm import ChatCompletionsClient

__all__ = ["DescriptionGenerator", "from_settings"]

log = structlog.get_logger(__name__)


class DescriptionGenerator:
    """Turns tags into official-format description lists: ``[template] + answers_per_prompt * 5 answers``.

    Answers are cached per prompt (not per tag), keyed by everything that changes them: ``model_id``, the
    filled prompt, ``n`` and any ``generation_params`` (temperature, max_tokens). A rerun after a crash thus
    resumes mid-tag, and a different model or temperature never reuses another's answers.
    """

    def __init__(
        self,
        source: DescriptionSource,
        *,
        model_id: str,
        answers_per_prompt: int = 10,
        cache_dir: Path | str | None = None,
        prompts: Sequence[str] = DESCRIPTION_PROMPTS,
        generation_params: Mapping[str, Any] | None = None,
    ) -> None:
        if answers_per_prompt < 1:
            raise ValueError(f"answers_per_prompt must be >= 1, got {answers_per_prompt}")
        self.source = source
        self.model_id = model_id
        self.answers_per_prompt = answers_per_prompt
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else LLMSettings().cache_dir
        self.prompts = tuple(prompts)
        self.generation_params = dict(generation_params or {})

    # -- cache ---------------------------------------------------------------------------------------------

    def _cache_key(self, prompt: str) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "prompt": prompt,
            "n": self.answers_per_prompt,
            "params": self.generation_params,
        }

    def _cache_path(self, key: Mapping[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
        # Two-level fan-out keeps directories small for 4585-tag (≈23k-prompt) vocabularies.
        return self.cache_dir / digest[:2] / f"{digest}.json"

    def _read_cache(self, key: Mapping[str, Any], path: Path) -> list[str] | None:
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("description_cache_unreadable", path=str(path), error=str(exc))
            return None
        answers = entry.get("answers") if isinstance(entry, dict) else None
        valid = (
            isinstance(answers, list)
            and len(answers) == self.answers_per_prompt
            and all(isinstance(a, str) for a in answers)
            and {k: entry.get(k) for k in key} == dict(key)
        )
        if not valid:
            # A hash collision or a hand-edited file: asking again is cheaper than trusting it.
            log.warning("description_cache_invalid", path=str(path))
            return None
        return answers

    def _answers(self, prompt: str) -> tuple[list[str], bool]:
        key = self._cache_key(prompt)
        path = self._cache_path(key)
        cached = self._read_cache(key, path)
        if cached is not None:
            return cached, True
        answers = self.source.complete(prompt, self.answers_per_prompt)
        if len(answers) != self.answers_per_prompt or not all(isinstance(a, str) for a in answers):
            raise DescriptionError(
                f"description source {type(self.source).__name__} returned {len(answers)} answers to {prompt!r}, "
                f"expected {self.answers_per_prompt} strings"
            )
        write_json_atomic(path, {**key, "answers": list(answers)})
        return list(answers), False

    # -- public --------------------------------------------------------------------------------------------

    def describe(self, tag: str) -> list[str]:
        """The template followed by the answers to every prompt, in prompt order."""
        if not isinstance(tag, str) or not tag.strip():
            raise DescriptionError(f"tag must be a non-empty string, got {tag!r}")
        descriptions = [template_description(tag)]
        cached = 0
        for prompt in fill_prompts(tag, self.prompts):
            answers, hit = self._answers(prompt)
            descriptions.extend(answers)
            cached += hit
        log.info(
            "tag_described",
            tag=tag,
            model_id=self.model_id,
            descriptions=len(descriptions),
            prompts_cached=cached,
            prompts_requested=len(self.prompts) - cached,
        )
        return descriptions

    def describe_many(self, tags: Iterable[str], *, progress: bool = True, max_workers: int = 1) -> Descriptions:
        """Descriptions of every tag in the official JSON layout: a list of ``{tag: [descriptions]}``.

        ``max_workers > 1`` overlaps request latency (the rate limiter still bounds requests per minute);
        the output keeps the input order either way.
        """
        tags = list(tags)
        with tqdm(total=len(tags), disable=not progress, unit="tag", desc="describing tags") as bar:

            def one(tag: str) -> dict[str, list[str]]:
                item = {tag: self.describe(tag)}
                bar.update(1)
                return item

            if max_workers <= 1:
                return [one(tag) for tag in tags]
            with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="describe") as pool:
                return list(pool.map(one, tags))

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> DescriptionGenerator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def from_settings(settings: LLMSettings | None = None, **client_overrides: Any) -> DescriptionGenerator:
    """A generator over an OpenAI-compatible endpoint, configured from ``RAMPLUS_LLM__*`` settings (or the config file's ``[llm]``).

    ``client_overrides`` go to :meth:`ChatCompletionsClient.from_settings` (e.g. a shorter backoff in tests).
    """
    settings = settings if settings is not None else Settings.load().llm
    client = ChatCompletionsClient.from_settings(settings, **client_overrides)
    return DescriptionGenerator(
        client,
        model_id=settings.model,
        answers_per_prompt=settings.answers_per_prompt,
        cache_dir=settings.cache_dir,
        generation_params={"temperature": settings.temperature, "max_tokens": settings.max_tokens},
    )

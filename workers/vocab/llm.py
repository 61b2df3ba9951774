"""LLM-written visual descriptions of tags, in the format RAM++ open-set inference expects.

RAM++ represents every tag by 51 sentences: the template ``"a photo of a {tag}."`` followed by 10 answers to
each of 5 prompts, produced by an LLM (``generate_tag_des_llm.py`` in the official repository). This module
reproduces that script's parameters exactly (reference spec, section 6) and adds what the official one-shot
script lacks for large vocabularies: a pluggable answer source, retries, a rate limit, and an on-disk cache so
an interrupted run resumes without paying for the same request twice.

Reading order: prompts and the template, settings, the source protocol and the HTTP client with its rate
limiter, the generator with its cache, the JSON file format, and the factory.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
import structlog
import tenacity
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from tqdm import tqdm

from ramplus_core.errors import DescriptionError

__all__ = [
    "DESCRIPTION_PROMPTS",
    "ChatCompletionsClient",
    "DescriptionGenerator",
    "DescriptionSource",
    "LLMSettings",
    "RateLimiter",
    "fill_prompts",
    "from_settings",
    "load_descriptions",
    "save_descriptions",
    "template_description",
    "validate_descriptions",
]

log = structlog.get_logger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Prompts and the template
# --------------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "ramplus" / "descriptions"


class LLMSettings(BaseSettings):
    """How to reach the LLM that writes tag descriptions. Every field can be set as ``RAMPLUS_LLM_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="RAMPLUS_LLM_", extra="ignore")

    base_url: str = Field(
        default="https://api.openai.com/v1",
        description="Base URL of an OpenAI-compatible API; requests go to <base_url>/chat/completions.",
    )
    model: str = Field(
        default="gpt-3.5-turbo",
        description="Model name sent to the endpoint (the official descriptions came from gpt-3.5-turbo). "
        "Also part of the cache key, so answers of different models never mix.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="Bearer token for the endpoint; leave unset for local servers that need none.",
    )
    answers_per_prompt: int = Field(
        default=10, ge=1, description="Answers collected per prompt (official: 10, giving 1 + 5*10 = 51)."
    )
    max_tokens: int = Field(default=77, ge=1, description="Completion length limit per answer (official: 77).")
    temperature: float = Field(default=0.99, ge=0.0, le=2.0, description="Sampling temperature (official: 0.99).")
    requests_per_minute: float = Field(
        default=60, ge=0, description="Upper bound on HTTP requests per minute, retries included; 0 disables it."
    )
    max_retries: int = Field(
        default=5, ge=0, description="Retries of one request after a transport error, HTTP 429 or HTTP 5xx."
    )
    timeout_s: float = Field(default=60, gt=0, description="Timeout of one HTTP request, in seconds.")
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Directory of cached answers (one small JSON file per prompt); a rerun reads them instead "
        "of asking the LLM again.",
    )

    @field_validator("cache_dir")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        # Env vars are not shell-expanded, and "~/..." is what people write in them.
        return value.expanduser()


# --------------------------------------------------------------------------------------------------------------
# Answer sources
# --------------------------------------------------------------------------------------------------------------


@runtime_checkable
class DescriptionSource(Protocol):
    """Anything that can answer a prompt ``n`` times: an HTTP endpoint, a local model, a test double."""

    def complete(self, prompt: str, n: int) -> list[str]:
        """Return exactly ``n`` independent answers to ``prompt``."""
        ...


class RateLimiter:
    """Keeps successive requests at least ``60 / requests_per_minute`` seconds apart, across threads.

    Each caller reserves the next free slot under the lock and sleeps outside it, so concurrent callers queue
    up without holding the lock while they wait. Clock and sleep are injectable so tests need no real time.
    """

    def __init__(
        self,
        requests_per_minute: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if requests_per_minute < 0:
            raise ValueError(f"requests_per_minute must be >= 0, got {requests_per_minute}")
        self.interval_s = 60.0 / requests_per_minute if requests_per_minute > 0 else 0.0
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_slot: float | None = None

    def acquire(self) -> float:
        """Block until a request may go out; return how long this call waited, in seconds."""
        if self.interval_s == 0.0:
            return 0.0
        with self._lock:
            now = self._clock()
            slot = now if self._next_slot is None else max(now, self._next_slot)
            self._next_slot = slot + self.interval_s
        wait = slot - now
        if wait > 0:
            self._sleep(wait)
        return wait


class _RetryableResponse(DescriptionError):
    """An HTTP answer worth trying again (429 or 5xx); carries the server's Retry-After, if any."""

    def __init__(self, message: str, *, status: int, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait per a Retry-After header, which may be a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, (_RetryableResponse, httpx.TransportError))


_HINTS: dict[int, str] = {
    400: "check RAMPLUS_LLM_MODEL and that the server accepts max_tokens, temperature and n",
    401: "check RAMPLUS_LLM_API_KEY",
    403: "check that RAMPLUS_LLM_API_KEY may use this model",
    404: "check RAMPLUS_LLM_BASE_URL (it should end before /chat/completions, e.g. .../v1) and RAMPLUS_LLM_MODEL",
}


class ChatCompletionsClient:
    """A :class:`DescriptionSource` backed by any OpenAI-compatible ``/chat/completions`` endpoint.

    Sends the official generator's request: the prompt as an "assistant" message (sic, as the official script
    does; changing the role changes the answers), ``max_tokens=77``, ``temperature=0.99`` and ``n``.
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: SecretStr | str | None = None,
        max_tokens: int = 77,
        temperature: float = 0.99,
        max_retries: int = 5,
        timeout_s: float = 60.0,
        rate_limiter: RateLimiter | None = None,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        retry_after_cap_s: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.max_retries = max_retries
        self._api_key = api_key if isinstance(api_key, SecretStr) or api_key is None else SecretStr(api_key)
        self._rate_limiter = rate_limiter
        self._retry_after_cap_s = retry_after_cap_s
        self._sleep = sleep
        # Full jitter: many workers that hit the same 429 must not come back in lockstep.
        self._backoff = tenacity.wait_random_exponential(multiplier=backoff_base_s, max=backoff_max_s)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(timeout=timeout_s)

    @classmethod
    def from_settings(cls, settings: LLMSettings, **overrides: Any) -> ChatCompletionsClient:
        """A client configured from settings; ``overrides`` (e.g. ``sleep``, ``backoff_base_s``) win."""
        kwargs: dict[str, Any] = {
            "base_url": settings.base_url,
            "model": settings.model,
            "api_key": settings.api_key,
            "max_tokens": settings.max_tokens,
            "temperature": settings.temperature,
            "max_retries": settings.max_retries,
            "timeout_s": settings.timeout_s,
            "rate_limiter": RateLimiter(settings.requests_per_minute),
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    # -- DescriptionSource ---------------------------------------------------------------------------------

    def complete(self, prompt: str, n: int) -> list[str]:
        """``n`` stripped answers to ``prompt``.

        Many OpenAI-compatible servers (vLLM with some settings, llama.cpp, proxies) ignore ``n`` and return
        one choice, so we keep asking for the remainder; each round must bring at least one answer, which
        bounds the loop by ``n`` rounds.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        answers: list[str] = []
        for _ in range(n):
            got = self._request(prompt, n - len(answers))
            if not got:
                raise DescriptionError(
                    f"{self.url} answered with no choices for model {self.model!r}; "
                    "check that the server supports chat completions for this model"
                )
            answers.extend(got)
            if len(answers) >= n:
                break
        # Servers that over-deliver are cut to n so cache entries and file layout stay exact.
        return answers[:n]

    # -- HTTP ----------------------------------------------------------------------------------------------

    def _request(self, prompt: str, n: int) -> list[str]:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_is_retryable),
            stop=tenacity.stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=False,
        )
        body = {
            "model": self.model,
            "messages": [{"role": "assistant", "content": prompt}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "n": n,
        }
        try:
            return retrying(self._post_once, body)
        except tenacity.RetryError as exc:
            last = exc.last_attempt.exception()
            raise DescriptionError(
                f"{self.url} still failing after {self.max_retries + 1} attempts (last: {self._describe(last)}); "
                "check that the server is up, or raise RAMPLUS_LLM_MAX_RETRIES / lower "
                "RAMPLUS_LLM_REQUESTS_PER_MINUTE"
            ) from last

    def _post_once(self, body: dict[str, Any]) -> list[str]:
        if self._rate_limiter is not None:
            self._rate_limiter.acquire()
        headers = {"Content-Type": "application/json"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key.get_secret_value()}"
        response = self._http.post(self.url, json=body, headers=headers)
        status = response.status_code
        if status == 429 or status >= 500:
            raise _RetryableResponse(
                f"HTTP {status}: {self._snippet(response)}",
                status=status,
                retry_after_s=_parse_retry_after(response.headers.get("Retry-After")),
            )
        if status >= 400:
            hint = _HINTS.get(status, "check RAMPLUS_LLM_BASE_URL, RAMPLUS_LLM_MODEL and RAMPLUS_LLM_API_KEY")
            raise DescriptionError(
                f"{self.url} refused the request with HTTP {status} ({self._snippet(response)}); {hint}"
            )
        return self._parse(response)

    def _parse(self, response: httpx.Response) -> list[str]:
        try:
            choices = response.json()["choices"]
            contents = [choice["message"]["content"] for choice in choices]
        except (ValueError, KeyError, TypeError) as exc:
            raise DescriptionError(
                f"{self.url} answered HTTP {response.status_code} with something that is not a chat completion "
                f"({self._snippet(response)}); check that RAMPLUS_LLM_BASE_URL points at an OpenAI-compatible API"
            ) from exc
        if not all(isinstance(content, str) for content in contents):
            raise DescriptionError(
                f"{self.url} returned a choice without text content; check that the model is a chat model"
            )
        return [content.strip() for content in contents]

    def _wait(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, _RetryableResponse) and exc.retry_after_s is not None:
            # The server knows its own quota window better than our backoff does; the cap only guards
            # against a misconfigured header parking a worker for hours.
            return min(exc.retry_after_s, self._retry_after_cap_s)
        return float(self._backoff(retry_state))

    def _log_retry(self, retry_state: tenacity.RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        log.warning(
            "llm_request_retry",
            url=self.url,
            model=self.model,
            attempt=retry_state.attempt_number,
            wait_s=round(retry_state.next_action.sleep, 3) if retry_state.next_action else None,
            error=self._describe(exc),
        )

    def _snippet(self, response: httpx.Response, limit: int = 200) -> str:
        # Some servers echo the key back in their 401 body; it must never reach an exception or a log.
        text = response.text[:limit].replace("\n", " ")
        if self._api_key is not None and self._api_key.get_secret_value():
            text = text.replace(self._api_key.get_secret_value(), "***")
        return text or "empty body"

    @staticmethod
    def _describe(exc: BaseException | None) -> str:
        if exc is None:
            return "unknown"
        if isinstance(exc, _RetryableResponse):
            return str(exc)
        return f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> ChatCompletionsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------------
# The generator and its cache
# --------------------------------------------------------------------------------------------------------------

Descriptions = list[dict[str, list[str]]]


def _write_json_atomic(path: Path, payload: Any, *, indent: int | None = None) -> None:
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
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
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
        _write_json_atomic(path, {**key, "answers": list(answers)})
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


# --------------------------------------------------------------------------------------------------------------
# The official JSON file format
# --------------------------------------------------------------------------------------------------------------


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
    _write_json_atomic(path, items, indent=2)
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


# --------------------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------------------


def from_settings(settings: LLMSettings | None = None, **client_overrides: Any) -> DescriptionGenerator:
    """A generator over an OpenAI-compatible endpoint, configured from ``RAMPLUS_LLM_*`` settings.

    ``client_overrides`` go to :meth:`ChatCompletionsClient.from_settings` (e.g. a shorter backoff in tests).
    """
    settings = settings if settings is not None else LLMSettings()
    client = ChatCompletionsClient.from_settings(settings, **client_overrides)
    return DescriptionGenerator(
        client,
        model_id=settings.model,
        answers_per_prompt=settings.answers_per_prompt,
        cache_dir=settings.cache_dir,
        generation_params={"temperature": settings.temperature, "max_tokens": settings.max_tokens},
    )

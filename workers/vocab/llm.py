"""An OpenAI-compatible chat-completions client that answers description prompts, with a rate limit.

Sends the official generator's request (reference spec, section 6) and adds what its one-shot script lacks
for large vocabularies: retries with jittered backoff that honour Retry-After, a requests-per-minute bound
shared by threads, and errors that say which setting to check. Configured by `RAMPLUS_LLM___<FIELD>`
(`workers.settings.LLMSettings`); `workers/vocab/describe.py` turns its answers into descriptions.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import structlog
import tenacity
from pydantic import SecretStr

from ramplus_core.errors import DescriptionError
from workers.settings import LLMSettings

__all__ = ["ChatCompletionsClient", "RateLimiter"]

log = structlog.get_logger(__name__)


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
    400: "check RAMPLUS_LLM__MODEL and that the server accepts max_tokens, temperature and n",
    401: "check RAMPLUS_LLM__API_KEY",
    403: "check that RAMPLUS_LLM__API_KEY may use this model",
    404: "check RAMPLUS_LLM__BASE_URL (it should end before /chat/completions, e.g. .../v1) and RAMPLUS_LLM__MODEL",
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
                "check that the server is up, or raise RAMPLUS_LLM__MAX_RETRIES / lower "
                "RAMPLUS_LLM__REQUESTS_PER_MINUTE"
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
            hint = _HINTS.get(status, "check RAMPLUS_LLM__BASE_URL, RAMPLUS_LLM__MODEL and RAMPLUS_LLM__API_KEY")
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
                f"({self._snippet(response)}); check that RAMPLUS_LLM__BASE_URL points at an OpenAI-compatible API"
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

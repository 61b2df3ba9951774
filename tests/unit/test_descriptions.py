"""Specification of the LLM descriptions (ramplus_core.descriptions, workers.vocab.llm and .describe), against a
real HTTP server on 127.0.0.1.

The fake server speaks just enough of the OpenAI chat-completions API to be indistinguishable from one for
our client, and records every request, so tests can state what went over the wire.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ramplus_core.descriptions import (
    DESCRIPTION_PROMPTS,
    fill_prompts,
    load_descriptions,
    save_descriptions,
    template_description,
)
from workers.settings import LLMSettings, Settings
from workers.vocab.describe import DescriptionGenerator, from_settings
from workers.vocab.llm import ChatCompletionsClient, RateLimiter
from ramplus_core.errors import DescriptionError

API_KEY = "sk-test-0123456789-secret"


# --------------------------------------------------------------------------------------------------------------
# The fake OpenAI-compatible server
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    payload: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeLLM:
    """Scripted replies first, then well-formed completions with ``n`` (or at most ``max_choices``) choices."""

    base_url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    script: deque[Reply] = field(default_factory=deque)
    max_choices: int | None = None
    clients: list[ChatCompletionsClient] = field(default_factory=list)
    _answers_given: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reply(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> Reply:
        with self._lock:
            self.requests.append({"path": path, "headers": headers, "body": body})
            if self.script:
                return self.script.popleft()
            n = body["n"] if self.max_choices is None else min(body["n"], self.max_choices)
            prompt = body["messages"][0]["content"]
            choices = []
            for index in range(n):
                self._answers_given += 1
                # Padding checks that answers are stripped; the counter makes every answer unique.
                content = f"  answer {self._answers_given} to: {prompt}\n"
                choices.append({"index": index, "message": {"role": "assistant", "content": content}})
            return Reply(200, {"object": "chat.completion", "choices": choices})


@pytest.fixture
def llm_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLLM]:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    fake = FakeLLM()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; without this, Nagle + delayed ACK add ~40 ms per request.
        disable_nagle_algorithm = True

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            reply = fake.reply(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            data = json.dumps(reply.payload).encode() if not isinstance(reply.payload, bytes) else reply.payload
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, name="fake-llm", daemon=True)
    thread.start()
    fake.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield fake
    finally:
        for client in fake.clients:
            client.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class SleepRecorder:
    """Stands in for time.sleep so retry waits are observable and cost no time."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def make_client(server: FakeLLM, **overrides: Any) -> ChatCompletionsClient:
    kwargs: dict[str, Any] = {
        "base_url": server.base_url,
        "model": "gpt-3.5-turbo",
        "api_key": API_KEY,
        "max_retries": 3,
        "timeout_s": 5.0,
        "backoff_base_s": 0.0,
        "sleep": SleepRecorder(),
    }
    kwargs.update(overrides)
    client = ChatCompletionsClient(**kwargs)
    server.clients.append(client)
    return client


def make_generator(server: FakeLLM, cache_dir: Path, **client_overrides: Any) -> DescriptionGenerator:
    return DescriptionGenerator(
        make_client(server, **client_overrides),
        model_id="gpt-3.5-turbo",
        answers_per_prompt=10,
        cache_dir=cache_dir,
        generation_params={"temperature": 0.99, "max_tokens": 77},
    )


# --------------------------------------------------------------------------------------------------------------
# Prompts and the template
# --------------------------------------------------------------------------------------------------------------


def test_template_always_uses_article_a_and_lowercases_the_tag() -> None:
    assert template_description("Apple") == "a photo of a apple."


def test_prompts_are_the_official_five_with_the_tag_filled_in() -> None:
    assert fill_prompts("sea otter") == [
        "Describe concisely what a(n) sea otter looks like:",
        "How can you identify a(n) sea otter concisely?",
        "What does a(n) sea otter look like concisely?",
        "What are the identifying characteristics of a(n) sea otter:",
        "Please provide a concise description of the visual characteristics of sea otter:",
    ]


# --------------------------------------------------------------------------------------------------------------
# What goes over the wire, and what comes back
# --------------------------------------------------------------------------------------------------------------


def test_requests_carry_the_official_generation_parameters_and_bearer_key(llm_server: FakeLLM, tmp_path: Path) -> None:
    make_generator(llm_server, tmp_path).describe("sea otter")

    assert len(llm_server.requests) == len(DESCRIPTION_PROMPTS)
    for request, prompt in zip(llm_server.requests, fill_prompts("sea otter"), strict=True):
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["authorization"] == f"Bearer {API_KEY}"
        assert request["body"] == {
            "model": "gpt-3.5-turbo",
            "messages": [{"role": "assistant", "content": prompt}],
            "max_tokens": 77,
            "temperature": 0.99,
            "n": 10,
        }


def test_describe_returns_template_then_ten_stripped_answers_per_prompt_in_prompt_order(
    llm_server: FakeLLM, tmp_path: Path
) -> None:
    descriptions = make_generator(llm_server, tmp_path).describe("Sea Otter")

    assert len(descriptions) == 51
    assert descriptions[0] == "a photo of a sea otter."
    for index, prompt in enumerate(fill_prompts("Sea Otter")):
        block = descriptions[1 + 10 * index : 1 + 10 * (index + 1)]
        assert all(answer.endswith(f"to: {prompt}") for answer in block)
        assert all(answer == answer.strip() for answer in block)
    assert len(set(descriptions)) == 51


def test_no_api_key_sends_no_authorization_header(llm_server: FakeLLM, tmp_path: Path) -> None:
    make_generator(llm_server, tmp_path, api_key=None).describe("cat")

    assert all("authorization" not in request["headers"] for request in llm_server.requests)


# --------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------


def test_second_generator_over_the_same_cache_makes_no_requests(llm_server: FakeLLM, tmp_path: Path) -> None:
    first = make_generator(llm_server, tmp_path).describe("cat")
    requests_before = len(llm_server.requests)

    second = make_generator(llm_server, tmp_path).describe("cat")

    assert len(llm_server.requests) == requests_before
    assert second == first


def test_cache_is_not_shared_between_models(llm_server: FakeLLM, tmp_path: Path) -> None:
    make_generator(llm_server, tmp_path).describe("cat")
    requests_before = len(llm_server.requests)

    other = DescriptionGenerator(make_client(llm_server), model_id="other-model", cache_dir=tmp_path)
    other.describe("cat")

    assert len(llm_server.requests) == requests_before + len(DESCRIPTION_PROMPTS)


def test_corrupt_cache_entry_is_asked_again_instead_of_trusted(llm_server: FakeLLM, tmp_path: Path) -> None:
    make_generator(llm_server, tmp_path).describe("cat")
    entries = sorted(tmp_path.rglob("*.json"))
    assert len(entries) == len(DESCRIPTION_PROMPTS)
    entries[0].write_text("{not json", encoding="utf-8")
    requests_before = len(llm_server.requests)

    make_generator(llm_server, tmp_path).describe("cat")

    assert len(llm_server.requests) == requests_before + 1


# --------------------------------------------------------------------------------------------------------------
# Retries and failures
# --------------------------------------------------------------------------------------------------------------


def test_server_error_is_retried_and_then_succeeds(llm_server: FakeLLM) -> None:
    llm_server.script.append(Reply(500, {"error": {"message": "overloaded"}}))
    sleep = SleepRecorder()
    client = make_client(llm_server, sleep=sleep)

    answers = client.complete("Describe concisely what a(n) cat looks like:", 10)

    assert len(answers) == 10
    assert len(llm_server.requests) == 2
    assert len(sleep.calls) == 1


def test_rate_limited_request_waits_the_retry_after_seconds(llm_server: FakeLLM) -> None:
    llm_server.script.append(Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "7"}))
    sleep = SleepRecorder()
    client = make_client(llm_server, sleep=sleep, backoff_base_s=1.0)

    answers = client.complete("How can you identify a(n) cat concisely?", 10)

    assert len(answers) == 10
    assert len(llm_server.requests) == 2
    assert sleep.calls == [7.0]


def test_unauthorized_fails_at_once_without_revealing_the_key(llm_server: FakeLLM) -> None:
    # Real servers do echo (part of) the key in their 401 body.
    llm_server.script.append(Reply(401, {"error": {"message": f"Incorrect API key provided: {API_KEY}"}}))
    client = make_client(llm_server)

    with capture_logs() as logs, pytest.raises(DescriptionError) as excinfo:
        client.complete("How can you identify a(n) cat concisely?", 10)

    message = str(excinfo.value)
    assert "401" in message and "RAMPLUS_LLM__API_KEY" in message
    assert API_KEY not in message
    assert API_KEY not in repr(logs)
    assert len(llm_server.requests) == 1


def test_persistent_server_errors_fail_after_max_retries(llm_server: FakeLLM) -> None:
    llm_server.script.extend(Reply(503, {"error": "down"}) for _ in range(10))
    client = make_client(llm_server, max_retries=2)

    with pytest.raises(DescriptionError, match="after 3 attempts"):
        client.complete("How can you identify a(n) cat concisely?", 10)

    assert len(llm_server.requests) == 3


def test_unreachable_server_fails_with_description_error_after_retrying() -> None:
    sleep = SleepRecorder()
    with ChatCompletionsClient(
        base_url="http://127.0.0.1:9/v1", model="m", max_retries=1, backoff_base_s=0.0, sleep=sleep
    ) as client, pytest.raises(DescriptionError, match="ConnectError"):
        client.complete("prompt", 1)

    assert len(sleep.calls) == 1


def test_non_chat_completion_body_fails_with_description_error(llm_server: FakeLLM) -> None:
    llm_server.script.append(Reply(200, {"unexpected": True}))

    with pytest.raises(DescriptionError, match="not a chat completion"):
        make_client(llm_server).complete("prompt", 1)


# --------------------------------------------------------------------------------------------------------------
# Servers that ignore n
# --------------------------------------------------------------------------------------------------------------


def test_server_returning_one_choice_per_call_still_yields_n_answers(llm_server: FakeLLM) -> None:
    llm_server.max_choices = 1

    answers = make_client(llm_server).complete("What does a(n) cat look like concisely?", 10)

    assert len(answers) == 10
    assert [request["body"]["n"] for request in llm_server.requests] == list(range(10, 0, -1))


# --------------------------------------------------------------------------------------------------------------
# Rate limiter
# --------------------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_rate_limiter_spaces_k_back_to_back_requests_by_60_over_r_seconds() -> None:
    clock = FakeClock()
    limiter = RateLimiter(30, clock=clock, sleep=clock.sleep)

    for _ in range(5):
        limiter.acquire()

    assert clock.slept == [2.0, 2.0, 2.0, 2.0]
    assert sum(clock.slept) == pytest.approx(4 * 60 / 30)


def test_rate_limiter_does_not_sleep_when_requests_are_already_spaced() -> None:
    clock = FakeClock()
    limiter = RateLimiter(30, clock=clock, sleep=clock.sleep)

    for _ in range(3):
        limiter.acquire()
        clock.now += 2.5

    assert clock.slept == []


def test_rate_limiter_gives_concurrent_callers_distinct_slots() -> None:
    slept: list[float] = []
    lock = threading.Lock()

    def record(seconds: float) -> None:
        with lock:
            slept.append(seconds)

    # A frozen clock: every thread arrives at t=0, so each must get its own slot further out.
    limiter = RateLimiter(60, clock=lambda: 0.0, sleep=record)
    threads = [threading.Thread(target=limiter.acquire) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(slept) == [float(k) for k in range(1, 8)]


def test_client_asks_the_rate_limiter_before_every_request_including_retries(llm_server: FakeLLM) -> None:
    llm_server.script.append(Reply(500, {"error": "flaky"}))
    clock = FakeClock()
    client = make_client(llm_server, rate_limiter=RateLimiter(120, clock=clock, sleep=clock.sleep))

    client.complete("prompt", 1)

    assert clock.slept == [0.5]


# --------------------------------------------------------------------------------------------------------------
# The official JSON file format
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"cat": ["a photo of a cat."]}', "expected a JSON list"),
        ('[{"cat": ["x"]}, ["dog", ["y"]]]', "element 1 must be a single-key object"),
        ('[{"cat": ["x"], "dog": ["y"]}]', "element 0 must be a single-key object .* 2 keys"),
        ('[{"cat": ["x"]}, {" ": ["y"]}]', "element 1 has an empty tag"),
        ('[{"cat": []}]', "element 0 \\('cat'\\) must map to a non-empty list"),
        ('[{"cat": "a photo of a cat."}]', "element 0 \\('cat'\\) must map to a non-empty list"),
        ('[{"cat": ["x", 3]}]', "element 0 \\('cat'\\) description 1 is int"),
        ("[{", "not a readable JSON file"),
    ],
)
def test_load_descriptions_rejects_malformed_files_naming_the_offending_element(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")

    with pytest.raises(DescriptionError, match=expected) as excinfo:
        load_descriptions(path)

    assert str(path) in str(excinfo.value)


def test_load_descriptions_reports_a_missing_file_as_description_error(tmp_path: Path) -> None:
    with pytest.raises(DescriptionError, match="no such descriptions file"):
        load_descriptions(tmp_path / "missing.json")


def test_load_descriptions_accepts_different_counts_per_tag(tmp_path: Path) -> None:
    path = tmp_path / "ragged.json"
    items = [{"cat": ["a photo of a cat."] + ["furry"] * 50}, {"dog": ["a photo of a dog."]}, {"owl": ["x", "y"]}]
    path.write_text(json.dumps(items), encoding="utf-8")

    assert load_descriptions(path) == items


def test_describe_many_output_round_trips_through_save_and_load(llm_server: FakeLLM, tmp_path: Path) -> None:
    items = make_generator(llm_server, tmp_path / "cache").describe_many(["cat", "Sea Otter"], progress=False)
    path = tmp_path / "out" / "descriptions.json"

    save_descriptions(path, items)

    assert [next(iter(item)) for item in items] == ["cat", "Sea Otter"]
    assert load_descriptions(path) == items
    assert list(path.parent.iterdir()) == [path]


def test_describe_many_with_workers_keeps_the_input_order(llm_server: FakeLLM, tmp_path: Path) -> None:
    tags = ["cat", "dog", "owl", "fox"]

    items = make_generator(llm_server, tmp_path).describe_many(tags, progress=False, max_workers=3)

    assert [next(iter(item)) for item in items] == tags
    assert all(item[tag][0] == template_description(tag) for item, tag in zip(items, tags, strict=True))


# --------------------------------------------------------------------------------------------------------------
# Settings and factory
# --------------------------------------------------------------------------------------------------------------


def test_settings_default_to_the_official_generator_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODEL", "ANSWERS_PER_PROMPT", "MAX_TOKENS", "TEMPERATURE"):
        monkeypatch.delenv(f"RAMPLUS_LLM_{name}", raising=False)

    settings = LLMSettings()

    assert (settings.model, settings.answers_per_prompt, settings.max_tokens, settings.temperature) == (
        "gpt-3.5-turbo",
        10,
        77,
        0.99,
    )


def test_from_settings_reads_ramplus_llm_environment_variables(
    llm_server: FakeLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAMPLUS_LLM__BASE_URL", llm_server.base_url)
    monkeypatch.setenv("RAMPLUS_LLM__MODEL", "local-model")
    monkeypatch.setenv("RAMPLUS_LLM__API_KEY", API_KEY)
    monkeypatch.setenv("RAMPLUS_LLM__ANSWERS_PER_PROMPT", "2")
    monkeypatch.setenv("RAMPLUS_LLM__CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("RAMPLUS_LLM__REQUESTS_PER_MINUTE", "0")

    with from_settings() as generator:
        descriptions = generator.describe("cat")

    assert len(descriptions) == 1 + 5 * 2
    assert {request["body"]["model"] for request in llm_server.requests} == {"local-model"}
    assert llm_server.requests[0]["headers"]["authorization"] == f"Bearer {API_KEY}"
    assert API_KEY not in repr(Settings.load().llm)

"""Keeps a replica on the active version of its vocabulary: pub/sub nudges, polling as the fallback.

With `prefetch`, a version is loaded when it is published (the `published` event), so that activating it
later is a pointer flip rather than a load of up to a few seconds; a version that fails to load then is
simply not prefetched (it is refused for real if it is activated).

A new version is loaded and validated on this watcher's thread, then handed to the engine, which swaps it
between two batches (a batch in progress finishes with the vocabulary it started with). A version that
fails validation is refused: the replica keeps the old one, logs why and counts it. Redis going away stops
nothing: tagging goes on with the vocabulary in memory and the watcher reconnects by itself.

With `set_canary`, it also keeps the replica's canary (workers/vocab/canary.py) in step with Redis: the
candidate is loaded (from the cache when prefetched) and checked like any version; one that fails is
refused (the replica scores no canary and the active version is untouched) until the canary is started
again. A canary of the version that is active meanwhile is stopped: it would compare a version with itself.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from ramplus_core.errors import VocabularyError
from ramplus_core.vocabulary import Vocabulary
from workers.metrics import ReplicaMetrics
from workers.vocab.canary import CanaryControl
from workers.vocab.store import EVENTS, VocabStore

log = structlog.get_logger("ramplus.vocab")

# Refusal reasons (the metric's label) by what the validation error says.
_REASONS = (("checksum", "checksum"), ("sha256", "checksum"), ("dimension", "dimension"), ("-d but the model", "dimension"),
            ("non-finite", "non_finite"), ("missing", "missing"), ("does not exist", "missing"))


class VocabularyWatcher:
    def __init__(
        self,
        store: VocabStore,
        name: str,
        apply: Callable[[Any], None],
        *,
        current: Callable[[], str],
        dim: int | None = None,
        poll_interval_s: float = 1.0,
        metrics: ReplicaMetrics | None = None,
        cached: Callable[[str], Any] | None = None,
        prefetch: Callable[[Vocabulary], None] | None = None,
        set_canary: Callable[[Any, float], Any] | None = None,
        current_canary: Callable[[], Any] | None = None,
    ) -> None:
        self.store, self.name, self.apply, self.current = store, name, apply, current
        self.cached = cached  # 'name@version' -> an already loaded version (prefetched, or requests named it), or None
        self.prefetch = prefetch  # keeps a loaded version for later (the engine's cache)
        self.dim, self.poll_interval_s = dim, poll_interval_s
        self.metrics = metrics or ReplicaMetrics()
        self.refused: dict[str, str] = {}  # version -> why; not retried until it is activated again
        self._refused_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ramplus-vocab", daemon=True)
        self._pubsub: Any = None
        self.set_canary, self.current_canary = set_canary, current_canary  # the engine's; `Canary | None`
        self.canaries = CanaryControl(store)
        self._canary_refused: tuple[str, float] | None = None  # (ref, started_at) of a canary that failed to load

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def check(self) -> bool:
        """Switch to the active version if it is not the one in use (True if a switch happened); then the canary."""
        switched = self._check_active()
        if self.set_canary is not None:
            self.check_canary()
        return switched

    def _check_active(self) -> bool:
        version = self.store.active_version(self.name)
        if version is None or f"{self.name}@{version}" == self.current() or version in self.refused:
            return False
        ref = f"{self.name}@{version}"
        started = time.monotonic()
        try:
            loaded = self.cached(ref) if self.cached is not None else None
            vocabulary: Vocabulary = loaded.vocabulary if loaded is not None else self.store.load(self.name, version, dim=self.dim)
            self.apply(loaded if loaded is not None else vocabulary)
        except VocabularyError as exc:
            text = str(exc)
            reason = next((r for key, r in _REASONS if key in text), "invalid")
            self.refused[version] = str(exc)
            self._refused_at[version] = time.time()
            self.metrics.vocab_refused.labels(reason=reason).inc()
            log.error("vocab.refused", vocab=f"{self.name}@{version}", reason=str(exc), keeping=self.current())
            return False
        self.metrics.vocab_switches.inc()
        self.metrics.vocab_switch_seconds.observe(time.monotonic() - started)
        log.info("vocab.switched", vocab=vocabulary.ref, tags=len(vocabulary), from_cache=loaded is not None)
        return True

    def check_canary(self) -> None:
        """Load, replace or drop the replica's canary as Redis says."""
        assert self.set_canary is not None and self.current_canary is not None
        config = self.canaries.get(self.name)
        current = self.current_canary()
        active = self.current()
        if config is None or f"{self.name}@{config.version}" == active:
            if current is not None:
                self.set_canary(None, 0.0)
                self._drop_fraction(current.ref)
                log.info("vocab.canary_stopped", canary=current.ref)
            return
        ref = f"{self.name}@{config.version}"
        if current is not None and current.ref == ref and current.fraction == config.fraction:
            return
        if self._canary_refused == (ref, config.started_at):
            return
        try:
            loaded = self.cached(ref) if self.cached is not None else None
            self.set_canary(loaded if loaded is not None else self.store.load(self.name, config.version, dim=self.dim), config.fraction)
        except VocabularyError as exc:
            self._canary_refused = (ref, config.started_at)
            reason = next((r for key, r in _REASONS if key in str(exc)), "invalid")
            self.metrics.vocab_refused.labels(reason=reason).inc()
            log.error("vocab.canary_refused", canary=ref, reason=str(exc), active=active)
            return
        if current is not None and current.ref != ref:
            self._drop_fraction(current.ref)
        self.metrics.canary_fraction.labels(canary=ref).set(config.fraction)
        log.info("vocab.canary_started", canary=ref, fraction=config.fraction, active=active)

    def _drop_fraction(self, ref: str) -> None:
        try:
            self.metrics.canary_fraction.remove(ref)
        except KeyError:  # never exported (set by someone other than this watcher)
            pass

    def _subscribe(self) -> None:
        if self._pubsub is None:
            self._pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)
            self._pubsub.subscribe(EVENTS)

    def _wait_for_event(self) -> None:
        """Until an event about our vocabulary arrives or the poll interval passes (the fallback)."""
        message = self._pubsub.get_message(timeout=self.poll_interval_s)
        if message is not None:
            try:
                event = json.loads(message["data"])
            except (ValueError, TypeError):
                return
            version = event.get("version")
            if event.get("name") != self.name:
                return
            if event.get("event") == "published" and self.prefetch is not None:
                self._prefetch(str(version))
            # Activated again after we refused it (not the activation that made us refuse it): try again.
            if event.get("event") == "activated" and version in self.refused and event.get("ts", 0) > self._refused_at[version]:
                self.refused.pop(version)

    def _prefetch(self, version: str) -> None:
        ref = f"{self.name}@{version}"
        if ref == self.current() or (self.cached is not None and self.cached(ref) is not None):
            return
        started = time.monotonic()
        try:
            assert self.prefetch is not None
            self.prefetch(self.store.load(self.name, version, dim=self.dim))
        except VocabularyError as exc:
            log.warning("vocab.prefetch_failed", vocab=ref, reason=str(exc))
            return
        log.info("vocab.prefetched", vocab=ref, seconds=round(time.monotonic() - started, 3))

    def _run(self) -> None:
        # A service loop, not a retried call (so not tenacity, the project's retry idiom): it runs until stopped,
        # and the backoff after a Redis failure starts again from the poll interval once Redis answers.
        backoff = self.poll_interval_s
        while not self._stop.is_set():
            try:
                self._subscribe()
                self.check()
                self._wait_for_event()
                backoff = self.poll_interval_s
            except Exception as exc:  # Redis away: keep the vocabulary we have, reconnect later
                if self._pubsub is not None:
                    try:
                        self._pubsub.close()
                    except Exception:
                        pass
                    self._pubsub = None
                self.metrics.errors.labels(stage="vocab").inc()
                log.warning("vocab.redis_unavailable", error=f"{type(exc).__name__}: {exc}", retry_in_s=backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

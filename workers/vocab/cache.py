"""Vocabularies a replica keeps loaded besides the active one, for requests that name them (`vocab` field).

A request may pin `name@version` or follow `name` (that vocabulary's active version). The first request
for a version loads it (from the store, validated like any version) on its fetch thread; requests for the
same version arriving meanwhile wait for that one load instead of starting their own. The least recently
used version is evicted beyond `capacity`; a batch that still holds an evicted version finishes with it.

The version a replica switched away from is kept here too, so requests pinned to it go on being served
after a switch without a reload. With Redis away, every version already loaded keeps being served, and a
name keeps resolving to the version it last resolved to.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import structlog

from ramplus_core.errors import VocabularyError
from ramplus_core.model import VocabularyTensors
from ramplus_core.vocabulary import Vocabulary
from workers.errors import ErrorKind, InputError
from workers.metrics import ReplicaMetrics

log = structlog.get_logger("ramplus.vocab")

Loader = Callable[[str, str], Vocabulary]  # (name, version) -> a validated vocabulary
ActiveVersion = Callable[[str], "str | None"]  # name -> its active version, None if it has none


class VocabularyCache:
    def __init__(
        self,
        prepare: Callable[[Vocabulary], VocabularyTensors],
        *,
        load: Loader | None = None,
        active_version: ActiveVersion | None = None,
        capacity: int = 4,
        resolve_ttl_s: float = 1.0,
        refused_ttl_s: float = 30.0,
        outage_backoff_s: float = 5.0,
        metrics: ReplicaMetrics | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.prepare, self.load, self.active_version = prepare, load, active_version
        self.capacity, self.resolve_ttl_s, self.refused_ttl_s = capacity, resolve_ttl_s, refused_ttl_s
        # After a failed store call, fail fast for a while: a client retrying each call for seconds on a
        # fetch thread would stall the stream while the store is away.
        self.outage_backoff_s = outage_backoff_s
        self._store_down_until = 0.0
        self.metrics = metrics or ReplicaMetrics()
        self._items: OrderedDict[str, VocabularyTensors] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._resolved: dict[str, tuple[str, float]] = {}  # name -> (version, monotonic time looked up)
        self._refused: dict[str, tuple[str, float]] = {}  # ref -> (why, monotonic time refused)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def refs(self) -> list[str]:
        """Loaded versions, least recently used first."""
        with self._lock:
            return list(self._items)

    def peek(self, ref: str) -> VocabularyTensors | None:
        with self._lock:
            return self._items.get(ref)

    def put(self, vocab: VocabularyTensors) -> None:
        with self._lock:
            self._items[vocab.vocabulary.ref] = vocab
            self._items.move_to_end(vocab.vocabulary.ref)
            while len(self._items) > self.capacity:
                evicted, _ = self._items.popitem(last=False)
                self.metrics.vocab_cache.labels(outcome="evicted").inc()
                log.info("vocab.cache_evicted", vocab=evicted)
            self.metrics.vocab_cache_size.set(len(self._items))

    def discard(self, ref: str) -> None:
        with self._lock:
            self._items.pop(ref, None)
            self.metrics.vocab_cache_size.set(len(self._items))

    def get(self, name: str, version: str | None) -> VocabularyTensors:
        """A loaded version; loads it if needed. Raises InputError (VALIDATION, or FETCH if the store is away)."""
        if version is None:
            version = self._resolve(name)
        ref = f"{name}@{version}"
        with self._lock:
            hit = self._items.get(ref)
            if hit is not None:
                self._items.move_to_end(ref)
                self.metrics.vocab_cache.labels(outcome="hit").inc()
                return hit
            loading = self._loading.setdefault(ref, threading.Lock())
        with loading:  # one load per version; the others wait for it and then hit
            hit = self.peek(ref)
            if hit is not None:
                self.metrics.vocab_cache.labels(outcome="hit").inc()
                return hit
            try:
                vocab = self._load(name, version)
            finally:
                with self._lock:
                    self._loading.pop(ref, None)
        self.put(vocab)
        return vocab

    def _load(self, name: str, version: str) -> VocabularyTensors:
        ref = f"{name}@{version}"
        refused = self._refused.get(ref)
        if refused is not None and time.monotonic() - refused[1] < self.refused_ttl_s:
            raise InputError(ErrorKind.VALIDATION, f"vocabulary {ref} is refused: {refused[0]}")
        if self.load is None:
            raise InputError(ErrorKind.VALIDATION, f"vocabulary {ref} is not served here (no vocabulary store configured)")
        started = time.monotonic()
        try:
            self._check_store(ref)
            vocab = self.prepare(self.load(name, version))
        except VocabularyError as exc:  # unknown, corrupt or the wrong shape: the request's problem
            why = str(exc).removeprefix("vocabulary ").removeprefix(f"{ref}: ")
            self._refused[ref] = (why, time.monotonic())
            self.metrics.vocab_cache.labels(outcome="refused").inc()
            log.warning("vocab.cache_refused", vocab=ref, reason=why)
            raise InputError(ErrorKind.VALIDATION, f"vocabulary {ref} is refused: {why}") from exc
        except Exception as exc:  # the store is away: say so, the dead letter can be replayed once it is back
            self._mark_down(exc)
            self.metrics.vocab_cache.labels(outcome="unavailable").inc()
            raise InputError(ErrorKind.FETCH, f"vocabulary {ref}: store unavailable ({type(exc).__name__}: {exc})") from exc
        self.metrics.vocab_cache.labels(outcome="loaded").inc()
        log.info("vocab.cache_loaded", vocab=ref, tags=vocab.num_tags, seconds=round(time.monotonic() - started, 3))
        return vocab

    def _check_store(self, what: str) -> None:
        if time.monotonic() < self._store_down_until:
            raise ConnectionError(f"the vocabulary store failed recently; not asked about {what} until it has had time to come back")

    def _mark_down(self, exc: Exception) -> None:
        if not isinstance(exc, ConnectionError) or "failed recently" not in str(exc):
            log.warning("vocab.store_unavailable", error=f"{type(exc).__name__}: {exc}", retry_in_s=self.outage_backoff_s)
            self._store_down_until = time.monotonic() + self.outage_backoff_s

    def _resolve(self, name: str) -> str:
        """`name` -> its active version, looked up at most every `resolve_ttl_s`; the last answer while the store is away."""
        now = time.monotonic()
        known = self._resolved.get(name)
        if known is not None and now - known[1] < self.resolve_ttl_s:
            return known[0]
        if self.active_version is None:
            raise InputError(ErrorKind.VALIDATION, f"vocabulary {name!r} is not served here (no vocabulary store configured)")
        try:
            self._check_store(name)
            version = self.active_version(name)
        except VocabularyError as exc:
            raise InputError(ErrorKind.VALIDATION, f"vocabulary {name!r}: {exc}") from exc
        except Exception as exc:
            self._mark_down(exc)
            if known is not None:
                return known[0]
            self.metrics.vocab_cache.labels(outcome="unavailable").inc()
            raise InputError(ErrorKind.FETCH, f"vocabulary {name!r}: store unavailable ({type(exc).__name__}: {exc})") from exc
        if version is None:
            raise InputError(ErrorKind.VALIDATION, f"vocabulary {name!r} has no active version")
        self._resolved[name] = (version, now)
        return version


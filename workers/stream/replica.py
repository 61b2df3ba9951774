"""One replica: a RAM++ model, one Kafka consumer-group member, and the pipeline between them.

`Replica` is a plain class (tests run it in-process); `ReplicaActor` is the same thing as a Ray actor that
runs its pipeline on a thread from the constructor on, so that when Ray restarts a crashed actor (the
constructor runs again) it rejoins the group and carries on with no one calling it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import threading
from typing import Any

import redis
import structlog
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ramplus_core import RamPlus, Vocabulary, load_checkpoint
from workers.stream.engine import TaggingEngine
from workers.io.fetchers import UriFetcher
from workers.stream.kafka_codecs import check_codecs
from workers.stream.dead_letters import KafkaDeadLetters
from workers.stream.group_admin import instance_id
from workers.stream.kafka_io import KafkaSource
from workers.metrics import ReplicaMetrics
from workers.stream.pipeline import StreamPipeline
from workers.stream.s3_sink import S3ResultSink
from workers.vocab.canary_results import S3CanarySink
from workers.settings import Settings
from workers.vocab.store import VocabStore
from workers.vocab.watcher import VocabularyWatcher

log = structlog.get_logger("ramplus.replica")


def load_model(settings: Settings) -> RamPlus:
    m = settings.model
    if m.checkpoint is None:
        from ramplus_core.registry import OFFICIAL_WEIGHTS_HELP

        raise ValueError(f"no checkpoint configured (RAMPLUS_MODEL__CHECKPOINT). {OFFICIAL_WEIGHTS_HELP}")
    from workers.train.artifacts import resolve_checkpoint

    return load_checkpoint(
        resolve_checkpoint(m.checkpoint, settings.s3), m.variant, m.image_size, vocabulary=m.vocabulary, tag_list=m.tag_list,
        thresholds=m.thresholds, trust_pickle=m.trust_checkpoint,
    )


class Replica:
    def __init__(self, settings: Settings, index: int = 0, *, model: RamPlus | None = None) -> None:
        # Before anything slow: a replica that cannot decode a codec would stop at its first batch in it.
        check_codecs()
        self.settings = settings
        self.index = index
        self.name = f"{socket.gethostname()}/replica-{index}/{os.getpid()}"
        self.metrics = ReplicaMetrics()
        self.log = log.bind(replica=index)
        f, fleet = settings.fetch, settings.fleet
        # The client connects on first use: a fleet that never names a vocabulary never talks to Redis.
        # Few, short retries: callers (the watcher, the vocabulary cache) have their own backoff, and a
        # call that retries for seconds would hold a fetch thread while Redis is away.
        self.vocab_store = VocabStore(redis.Redis.from_url(
            settings.redis.url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        ))
        self.engine = TaggingEngine(
            model or load_model(settings), device=settings.model.device, precision=settings.model.precision,
            fast=settings.model.fast_preprocess, max_bytes=f.max_bytes, max_pixels=f.max_pixels,
            vocab_store=self.vocab_store, vocab_cache_size=settings.redis.cache_size,
            vocab_resolve_ttl_s=settings.redis.poll_interval_s, metrics=self.metrics, decode=settings.model.decode,
            compile_buckets=settings.model.buckets_for(fleet.batch_size), **settings.model.head_options(),
        )
        if self.engine.buckets:
            # Before the consumer subscribes (KafkaSource below): compiling inside the first batch would
            # hold its partitions for a minute, long enough for the group to count this member as gone.
            seconds = self.engine.warm_up()
            self.metrics.warmup_seconds.set(seconds)
            self.log.info("replica.warmed_up", seconds=round(seconds, 1), buckets=self.engine.buckets)
        self.fetcher = UriFetcher(f, settings.s3)
        window = 4 * (fleet.max_in_flight + settings.kafka.max_poll_records) + 1000
        self.sink = S3ResultSink(settings.s3, recovery_window=window)
        self.dead_letters = KafkaDeadLetters(settings.kafka, client_id=f"ramplus-dlq-{index}", metrics=self.metrics)
        self.source = KafkaSource(
            settings.kafka, client_id=f"ramplus-replica-{index}", metrics=self.metrics,
            instance_id=instance_id(settings.kafka, index),
        )
        self.pipeline = StreamPipeline(
            self.source, self.sink, self.dead_letters, self.engine, self.fetcher,
            worker=self.name, batch_size=fleet.batch_size, max_batch_wait_s=fleet.max_batch_wait_s,
            max_in_flight=fleet.max_in_flight, fetch_concurrency=f.concurrency,
            drain_timeout_s=fleet.drain_timeout_s, stuck_after_s=fleet.stuck_after_s,
            max_request_bytes=settings.kafka.max_request_bytes,
            dead_letter_original_bytes=settings.kafka.dead_letter_original_bytes, metrics=self.metrics,
            canary_sink=S3CanarySink(settings.s3, client=self.sink.client) if settings.redis.vocabulary else None,
        )
        self.source.hooks = self.pipeline
        self.source.on_assigned = self.sink.recover
        self.stop_event = threading.Event()
        self.watcher: VocabularyWatcher | None = None
        if settings.redis.vocabulary:
            self.watcher = self._watch_vocabulary(settings)
        self.log.info(
            "replica.ready", model=self.engine.model_id, vocab=self.engine.vocabulary.ref,
            device=str(self.engine.device), topic=settings.kafka.topic, group=settings.kafka.group_id,
        )

    def _watch_vocabulary(self, settings: Settings) -> VocabularyWatcher:
        assert settings.redis.vocabulary is not None
        watcher = VocabularyWatcher(
            self.vocab_store, settings.redis.vocabulary, self.engine.set_vocabulary,
            current=lambda: self.engine.vocabulary.ref, dim=self.engine.model.config.text_dim,
            poll_interval_s=settings.redis.poll_interval_s, metrics=self.metrics, cached=self.engine.cache.peek,
            prefetch=self._prefetch if settings.redis.prefetch else None,
            set_canary=self.engine.set_canary, current_canary=lambda: self.engine.canary,
        )
        try:
            watcher.check()  # start on the active version when Redis is there; else the model's own, until it is
        except Exception as exc:
            self.log.warning("vocab.initial_load_failed", error=f"{type(exc).__name__}: {exc}")
        watcher.start()
        return watcher

    def _prefetch(self, vocabulary: Vocabulary) -> None:
        self.engine.cache.put(self.engine.prepare_vocabulary(vocabulary))

    def run(self) -> None:
        """Until `stop_event` is set; then drain, commit and close."""
        try:
            self.pipeline.run(self.stop_event)
        finally:
            self.close()

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        for closer in (self.source.close, self.dead_letters.close, self.fetcher.close, self.vocab_store.redis.close):
            try:
                closer()
            except Exception as exc:
                self.log.warning("replica.close_failed", error=str(exc))
        self.log.info("replica.stopped", **self.pipeline.stats)

    def stats(self) -> dict[str, Any]:
        undecodable = self.source.undecodable()
        return {
            "replica": self.index, "name": self.name, "vocab": self.engine.vocabulary.ref, "cached_vocabs": self.engine.cache.refs(),
            "canary": self.engine.canary.ref if self.engine.canary is not None else None,
            "in_flight": self.pipeline.tracker.in_flight(), **self.pipeline.stats,
            "partitions": sorted(p for _, p in self.source.assignment()),
            # Not ready: a partition it owns is paused at a batch it cannot decode (README, "undecodable").
            "ready": not undecodable, "undecodable": [dataclasses.asdict(u) for u in undecodable],
        }


class ReplicaActor:
    """Ray actor body. Decorated with resources by the fleet (`ray.remote(num_gpus=...)`)."""

    def __init__(self, settings_json: dict[str, Any], index: int) -> None:
        from workers.logs import configure_logging

        configure_logging()
        self.replica = Replica(Settings(**settings_json), index)
        self.failed: str | None = None
        self.thread = threading.Thread(target=self._run, name="ramplus-replica", daemon=True)
        self.thread.start()
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (a node draining, an operator): finish what was polled, commit, then exit.
            signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=self._terminate, daemon=True).start())

    def _run(self) -> None:
        try:
            self.replica.run()
        except BaseException as exc:  # surface it, then die so that Ray restarts us
            self.failed = f"{type(exc).__name__}: {exc}"
            log.exception("replica.crashed", replica=self.replica.index)
            os._exit(1)

    def _terminate(self) -> None:
        self.stop()
        os._exit(0)

    def ready(self) -> dict[str, Any]:
        return self.replica.stats()

    def stats(self) -> dict[str, Any]:
        return {**self.replica.stats(), "alive": self.thread.is_alive(), "failed": self.failed}

    def metrics(self) -> bytes:
        return self.replica.metrics.exposition()

    def pid(self) -> int:
        return os.getpid()

    def stop(self, timeout_s: float | None = None) -> dict[str, Any]:
        self.replica.stop_event.set()
        self.thread.join(timeout_s or self.replica.settings.fleet.drain_timeout_s + 10)
        return self.replica.stats()

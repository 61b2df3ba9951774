"""Dead letters into Kafka: a letter always fits the topic, and a letter refused for good skips its record.

kafka-python 3.0 (pinned). Used by the pipeline's fetch threads (`KafkaProducer` is thread-safe).
"""

from __future__ import annotations

from typing import Any

import structlog
from kafka import KafkaProducer
from kafka import errors as KafkaErrors

from workers.errors import DeadLetterRefused
from workers.metrics import ReplicaMetrics
from workers.schemas import DeadLetter
from workers.settings import KafkaSettings

log = structlog.get_logger("ramplus.kafka")


# What a record adds on the wire to its key, value and headers (record and batch headers, varints), with room.
RECORD_OVERHEAD = 512
# A producer's key is kept on its dead letter (same partitioning downstream) unless it is this large.
MAX_DEAD_LETTER_KEY = 1024
# Broker answers that mean this record will never be taken as it is; anything else is worth another try.
_REFUSED = (
    KafkaErrors.MessageSizeTooLargeError, KafkaErrors.RecordListTooLargeError, KafkaErrors.InvalidRecordError,
    KafkaErrors.CorruptRecordError, KafkaErrors.PolicyViolationError,
)


def topic_max_message_bytes(settings: KafkaSettings, topic: str, *, timeout_ms: int = 5_000) -> int | None:
    """The topic's `max.message.bytes` (None when it cannot be read: no such topic yet, no permission)."""
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=settings.bootstrap_servers.split(","), request_timeout_ms=timeout_ms, **settings.client_options
        )
    except Exception as exc:
        log.warning("dead_letter.limit_unknown", topic=topic, error=f"{type(exc).__name__}: {exc}")
        return None
    try:
        configs = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, configs=["max.message.bytes"])], config_filter="all"
        )
        value = configs.get("topic", {}).get(topic, {}).get("max.message.bytes", {}).get("value")
        return int(value) if value is not None else None
    except Exception as exc:
        log.warning("dead_letter.limit_unknown", topic=topic, error=f"{type(exc).__name__}: {exc}")
        return None
    finally:
        admin.close()


class KafkaDeadLetters:
    """Sends a dead letter and waits for the broker's acknowledgement (acks=all).

    A letter always fits: it is measured against the producer's `max_request_size` and the topic's
    `max.message.bytes` before it is sent, and cut down to its minimum (reason, position, size, digest;
    `DeadLetter.minimal`) when it does not. Should the broker still refuse it for good (a smaller limit
    than we read, a policy), the minimal letter is tried once, then `DeadLetterRefused`: the pipeline skips
    the record instead of retrying for ever. Transient failures (broker away, timeouts) raise as they are.
    """

    def __init__(
        self, settings: KafkaSettings, *, client_id: str, timeout_s: float = 30.0, metrics: ReplicaMetrics | None = None,
        topic_limit: int | None = None, producer: Any = None,
    ) -> None:
        self.topic = settings.dead_letter_topic
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.producer = producer or KafkaProducer(
            bootstrap_servers=settings.bootstrap_servers.split(","),
            client_id=client_id,
            acks="all",
            linger_ms=5,
            request_timeout_ms=int(timeout_s * 1000) // 2,
            **settings.client_options,
        )
        if topic_limit is None and producer is None:
            topic_limit = topic_max_message_bytes(settings, self.topic)
        limits = [self.producer.config["max_request_size"]] + ([topic_limit] if topic_limit else [])
        self.max_record_bytes = min(limits) - RECORD_OVERHEAD

    def send(self, letter: DeadLetter, key: bytes | None) -> None:
        if key is not None and len(key) > MAX_DEAD_LETTER_KEY:
            key = letter.letter_id.encode()
        value = letter.model_dump_json().encode()
        if self._size(key, value, letter) > self.max_record_bytes:
            log.warning("dead_letter.cut", letter_id=letter.letter_id, bytes=len(value), limit=self.max_record_bytes)
            letter, value = self._cut(letter)
        try:
            self._send(letter, key, value)
        except _REFUSED as exc:
            if letter.encoding in ("omitted", "none") and letter.original == "":
                raise DeadLetterRefused(f"{self.topic} refused even the minimal dead letter: {type(exc).__name__}: {exc}") from exc
            log.warning("dead_letter.refused", letter_id=letter.letter_id, error=f"{type(exc).__name__}: {exc}",
                        detail="sending it without the record's value")
            letter, value = self._cut(letter)
            try:
                self._send(letter, key, value)
            except _REFUSED as again:
                raise DeadLetterRefused(
                    f"{self.topic} refused even the minimal dead letter: {type(again).__name__}: {again}"
                ) from again

    def _cut(self, letter: DeadLetter) -> tuple[DeadLetter, bytes]:
        if self.metrics is not None:
            self.metrics.dead_letters_cut.inc()
        minimal = letter.minimal()
        return minimal, minimal.model_dump_json().encode()

    @staticmethod
    def _headers(letter: DeadLetter) -> list[tuple[str, bytes]]:
        return [("ramplus-error-kind", letter.error.kind.value.encode()), ("ramplus-letter-id", letter.letter_id.encode())]

    def _size(self, key: bytes | None, value: bytes, letter: DeadLetter) -> int:
        return len(value) + len(key or b"") + sum(len(k) + len(v) for k, v in self._headers(letter))

    def _send(self, letter: DeadLetter, key: bytes | None, value: bytes) -> None:
        future = self.producer.send(self.topic, key=key, value=value, headers=self._headers(letter))
        future.get(timeout=self.timeout_s)

    def close(self) -> None:
        self.producer.close(timeout=5)

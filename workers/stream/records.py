"""A record as the pipeline sees it, whatever the source (a Kafka topic or a local list)."""

from __future__ import annotations

from dataclasses import dataclass

from workers.schemas import SourceRef

TopicPartition = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    timestamp_ms: int | None = None

    @property
    def tp(self) -> TopicPartition:
        return (self.topic, self.partition)

    @property
    def source(self) -> SourceRef:
        return SourceRef(topic=self.topic, partition=self.partition, offset=self.offset)

"""The pipeline without servers, for unit tests: requests from a list, results and dead letters in memory.

Same pipeline, same messages, same commit rules as the Kafka/S3 fleet.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable

from workers.stream.records import Record, TopicPartition
from workers.schemas import DeadLetter, ResultLine, TagRequest, TagResult


class LocalSource:
    """Requests (or raw payload bytes, to test malformed ones) as one partition of topic `local`."""

    def __init__(self, items: Iterable[TagRequest | bytes | None], *, topic: str = "local", max_poll_records: int = 64) -> None:
        self.topic = topic
        self._records = [
            Record(topic, 0, offset, item.model_dump_json(exclude_none=True).encode() if isinstance(item, TagRequest) else item)
            for offset, item in enumerate(items)
        ]
        self._position = 0
        self.max_poll_records = max_poll_records
        self.committed: dict[TopicPartition, int] = {}
        self.paused = False
        self.pause_count = 0
        self._lock = threading.Lock()

    def poll(self, timeout_s: float) -> list[Record]:
        if self.paused or self._position >= len(self._records):
            threading.Event().wait(min(timeout_s, 0.01))
            return []
        batch = self._records[self._position : self._position + self.max_poll_records]
        self._position += len(batch)
        return batch

    @property
    def exhausted(self) -> bool:
        return self._position >= len(self._records)

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        with self._lock:
            self.committed.update(offsets)

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused = True
        self.pause_count += 1

    def resume(self, tps: list[TopicPartition]) -> None:
        self.paused = False

    def assignment(self) -> list[TopicPartition]:
        return [(self.topic, 0)]

    def write_allowed(self) -> bool:
        return True  # nobody else can own the partition

    def close(self) -> None:
        pass

    def __len__(self) -> int:
        return len(self._records)


class MemorySink:
    """Results by partition, in write calls; `results` flattens them."""

    def __init__(self) -> None:
        self.writes: list[tuple[TopicPartition, list[ResultLine]]] = []
        self.handles: list[str] = []  # one per write, unique: what `withdraw` takes
        self._written = 0
        self._lock = threading.Lock()

    def write(self, tp: TopicPartition, results: list[ResultLine]) -> str:
        with self._lock:
            self.writes.append((tp, list(results)))
            self._written += 1
            self.handles.append(f"w{self._written}")
            return self.handles[-1]

    def withdraw(self, handle: str) -> None:
        with self._lock:
            if handle in self.handles:
                i = self.handles.index(handle)
                del self.writes[i], self.handles[i]

    @property
    def results(self) -> list[TagResult]:
        """What was written, read back as a consumer would (each line validated against the schema)."""
        return [TagResult.model_validate_json(r.json) for _, rs in self.writes for r in rs]


class MemoryCanarySink:
    """Canary lines by canary ref, as a reader of the canary prefix would parse them."""

    def __init__(self) -> None:
        self.lines: dict[str, list[dict]] = {}
        self._lock = threading.Lock()

    def write(self, ref: str, tp: TopicPartition, offsets: list[int], lines: list[str]) -> str:
        with self._lock:
            self.lines.setdefault(ref, []).extend(json.loads(line) for line in lines)
            return f"{ref}/{tp[1]}/{min(offsets)}"


class MemoryDeadLetters:
    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []
        self._lock = threading.Lock()

    def send(self, letter: DeadLetter, key: bytes | None) -> None:
        with self._lock:
            self.letters.append(letter)

    def kinds(self) -> dict[str | None, str]:
        return {letter.id: letter.error.kind.value for letter in self.letters}

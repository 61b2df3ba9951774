"""What the stream pipeline needs of its surroundings: a source of records, a result sink, a dead-letter
sink, a fetcher and an engine. The fleet plugs in Kafka, S3 and the tagging engine (workers/stream/replica.py);
tests plug in fakes (tests/fakes.py).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ramplus_core.preprocess import EncodedImage
from ramplus_core.tagging import ImageTags
from workers.errors import InputError
from workers.schemas import DeadLetter, ResultLine
from workers.stream.records import Record, TopicPartition


class Source(Protocol):
    def poll(self, timeout_s: float) -> list[Record]: ...
    def commit(self, offsets: dict[TopicPartition, int]) -> None: ...
    def pause(self, tps: list[TopicPartition]) -> None: ...
    def resume(self, tps: list[TopicPartition]) -> None: ...
    def assignment(self) -> list[TopicPartition]: ...
    def write_allowed(self) -> bool:
        """False while this replica cannot be sure it still owns its partitions (see KafkaSource)."""
    def close(self) -> None: ...


class ResultSink(Protocol):
    def write(self, tp: TopicPartition, results: list[ResultLine]) -> str:
        """Durable when it returns; the same records written again overwrite, never duplicate.
        Returns a handle for `withdraw`."""
    def withdraw(self, handle: str) -> None:
        """Remove what one `write` of this sink wrote, and nothing else (idempotent)."""


class CanarySink(Protocol):
    def write(self, ref: str, tp: TopicPartition, offsets: list[int], lines: list[str]) -> str:
        """Canary result lines of one partition for the canary `ref`, apart from the consumers' results."""


class DeadLetterSink(Protocol):
    def send(self, letter: DeadLetter, key: bytes | None) -> None:
        """Acknowledged when it returns; `DeadLetterRefused` when it can never be (anything else is retried)."""


class Fetcher(Protocol):
    def fetch(self, uri: str) -> bytes:
        """The bytes, an `InputError` (the request's fault) or `SourceUnavailable` (retried until it is back)."""


class Engine(Protocol):
    model_id: str
    canary: Any  # workers.vocab.canary.Canary | None: what `run` scores the chosen rows with too

    def decode(self, data: bytes, name: str) -> torch.Tensor | EncodedImage:
        """Pixels, or a checked JPEG left for `stage` to decode with its batch; `InputError` if it is no image."""
    def vocabulary_for(self, ref: str) -> Any: ...
    def stage(self, pixels: list[torch.Tensor | EncodedImage]) -> Any:
        """The batch made ready for the model (decoded, resized, on the device), on the staging thread."""
    def run(self, staged: Any, vocabularies: list[Any] | None = None, canary: Any = None) -> list[ImageTags | InputError]:
        """Per image: its tags, or the `InputError` of an image that could not be decoded after all; with a
        `CanaryBatch`, its rows' canary tags into `canary.tags`."""

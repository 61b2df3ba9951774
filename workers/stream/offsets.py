"""Which offsets are safe to commit: everything below the first record that is not finished yet.

Records finish out of order (fetches race, dead letters skip the model), but a Kafka commit says
"everything before N is done". So per partition we keep the polled offsets in order and commit up to the
first unfinished one. Used by the polling thread, and by the rebalance listener while that thread is blocked
inside `poll` (see workers/stream/kafka_io.py): never by two threads at once.
"""

from __future__ import annotations

import time
from collections import deque

from workers.stream.records import TopicPartition


class OffsetTracker:
    def __init__(self) -> None:
        self._pending: dict[TopicPartition, deque[int]] = {}
        self._polled_at: dict[TopicPartition, dict[int, float]] = {}  # monotonic time each pending offset was polled
        self._done: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}  # the offset to commit: all below it are finished
        self._committed: dict[TopicPartition, int] = {}
        # Bumped when a partition is forgotten, so that a late completion from before a revocation is not
        # mistaken for the same offset polled again after the partition came back.
        self._epoch: dict[TopicPartition, int] = {}

    def add(self, tp: TopicPartition, offset: int, polled_at: float | None = None) -> int:
        """Track a polled offset; returns the epoch to hand back to `done`."""
        pending = self._pending.setdefault(tp, deque())
        if pending and offset <= pending[-1]:
            raise ValueError(f"{tp}: offset {offset} polled after {pending[-1]} (seek without forget?)")
        pending.append(offset)
        self._polled_at.setdefault(tp, {})[offset] = time.monotonic() if polled_at is None else polled_at
        self._done.setdefault(tp, set())
        return self._epoch.get(tp, 0)

    def done(self, tp: TopicPartition, offset: int, epoch: int = 0) -> None:
        if tp not in self._pending or epoch != self._epoch.get(tp, 0):
            return  # the partition was revoked or lost meanwhile: its new owner redoes it
        self._done[tp].add(offset)
        pending, done = self._pending[tp], self._done[tp]
        while pending and pending[0] in done:
            finished = pending.popleft()
            done.discard(finished)
            self._polled_at[tp].pop(finished, None)
            self._next[tp] = finished + 1

    def oldest(self) -> list[tuple[TopicPartition, int, float]]:
        """Per partition, the first offset not yet done and when it was polled: what holds its commits back."""
        return [(tp, pending[0], self._polled_at[tp][pending[0]]) for tp, pending in self._pending.items() if pending]

    def epoch(self, tp: TopicPartition) -> int:
        """Read from other threads too (a dict lookup is atomic): has the partition been forgotten since?"""
        return self._epoch.get(tp, 0)

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets that advanced since the last `mark_committed`."""
        return {tp: n for tp, n in self._next.items() if self._committed.get(tp) != n}

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def in_flight(self, tp: TopicPartition | None = None) -> int:
        """Polled but not yet committable (the memory the pipeline holds for them)."""
        if tp is not None:
            return len(self._pending.get(tp, ()))
        return sum(len(p) for p in self._pending.values())

    def partitions(self) -> list[TopicPartition]:
        return list(self._pending)

    def forget(self, tps: list[TopicPartition] | None = None) -> None:
        """Drop partitions we no longer own (revoked, lost) or that were seeked."""
        for tp in list(self._pending) if tps is None else tps:
            for table in (self._pending, self._polled_at, self._done, self._next, self._committed):
                table.pop(tp, None)
            self._epoch[tp] = self._epoch.get(tp, 0) + 1


class DeliveryGuard:
    """Per partition, the next offset we expect from the client; anything below it was delivered before.

    A Kafka client may move a partition's position back by itself (kafka-python: offset validation after a
    leader change, an out-of-range reset). What it delivers again is already in the pipeline or written,
    and redoing it would write it twice. Our own seeks say where delivery restarts (`reset`).
    """

    def __init__(self) -> None:
        self._next: dict[TopicPartition, int] = {}

    def admit(self, tp: TopicPartition, offset: int) -> bool:
        if offset < self._next.get(tp, -1):
            return False
        self._next[tp] = offset + 1
        return True

    def reset(self, tp: TopicPartition, offset: int) -> None:
        self._next[tp] = offset

    def forget(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            self._next.pop(tp, None)

"""The consumer-group source of requests (dead letters go out through workers/stream/dead_letters.py;
whether writes are still ours is workers/stream/membership.py).

kafka-python 3.0 (pinned), and who runs what:
- the pipeline's polling thread calls `poll`, `commit`, `pause`, `resume` (the consumer is not thread-safe);
- kafka-python's own IO thread runs the group protocol, heartbeats included, and the rebalance listener.
  The polling thread is blocked inside `consumer.poll()` for as long as a listener runs, so the listener
  may touch what the polling thread owns (the offset tracker, the consumer's assignment) without a race.
- The listener is a coroutine (`AsyncConsumerRebalanceListener`): while a revocation waits for records in
  flight to finish, it awaits short sleeps on the IO loop instead of blocking it, so heartbeats go on and
  a slow batch during a rebalance cannot get the member evicted. The wait is bounded by the fleet's
  `drain_timeout_s`, which settings keep below the rebalance timeout (`max_poll_interval_ms`); what is not
  finished by then is forgotten, and the partition's next owner redoes it (once, see workers/stream/s3_sink.py).
"""

from __future__ import annotations

import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from kafka import AsyncConsumerRebalanceListener, KafkaConsumer
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as KafkaTopicPartition

from workers.metrics import ReplicaMetrics
from workers.stream.membership import MembershipLease
from workers.stream.offsets import DeliveryGuard
from workers.stream.records import Record, TopicPartition
from workers.settings import KafkaSettings

log = structlog.get_logger("ramplus.kafka")
# Offset lookups run on the polling thread: with the broker away they must fail fast (and be retried at
# the next poll) rather than hold the loop for kafka-python's default request timeout of minutes.
LOOKUP_TIMEOUT_MS = 5_000
class PartitionHooks(Protocol):
    """What the pipeline does when partitions move (called on kafka-python's IO thread, from the listener,
    while the polling thread is blocked inside `poll`). None of these block."""

    drain_timeout_s: float

    def drain_left(self, tps: list[TopicPartition] | None = None) -> int | None:
        """Take what finished; how many records of `tps` are still in flight (None: the pipeline failed)."""
    def end_drain(self, *, commit: bool = True) -> bool: ...
    def forget(self, tps: list[TopicPartition]) -> None: ...


def _tp(tp: TopicPartition) -> KafkaTopicPartition:
    return KafkaTopicPartition(tp[0], tp[1])


class _Listener(AsyncConsumerRebalanceListener):
    """Coroutines on kafka-python's IO loop (see the module docstring)."""

    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.source._revoked([(tp.topic, tp.partition) for tp in revoked])

    async def on_partitions_lost(self, lost: Any) -> None:
        self.source._lost([(tp.topic, tp.partition) for tp in lost])

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.source._assigned([(tp.topic, tp.partition) for tp in assigned])


@dataclass(frozen=True)
class Undecodable:
    """A partition paused at a batch the client cannot decode: where, and why."""

    topic: str
    partition: int
    offset: int
    cause: str


# Where kafka-python turns fetched bytes into records: an exception raised through these is about the data of
# one partition (a codec it cannot run, a corrupt or unreadable batch), not about the consumer or the cluster.
_DECODING_FILES = ("kafka/record/", "kafka/codec.py")
_DECODING_FUNCTIONS = {"_unpack_records", "_parse_fetched_data", "take"}
_NAMED_PARTITION = re.compile(r"TopicPartition\(topic='([^']*)', partition=(\d+)\)\W+(\d+)")


def is_decoding_error(exc: BaseException) -> bool:
    for frame in traceback.extract_tb(exc.__traceback__):
        name = frame.filename.replace("\\", "/")
        if any(part in name for part in _DECODING_FILES) or (
            name.endswith("kafka/consumer/fetcher.py") and frame.name in _DECODING_FUNCTIONS
        ):
            return True
    return False


class KafkaSource:
    """A consumer-group member over one topic. `hooks` and `on_assigned` are set by whoever runs it."""

    def __init__(
        self, settings: KafkaSettings, *, client_id: str, metrics: ReplicaMetrics | None = None, instance_id: str | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.hooks: PartitionHooks | None = None
        # Before a partition is consumed: clean up results written past its committed offset (S3 sink).
        self.on_assigned: Callable[[TopicPartition, int], None] | None = None
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers.split(","),
            group_id=settings.group_id,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset=settings.auto_offset_reset,
            max_poll_records=settings.max_poll_records,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=max(1000, settings.session_timeout_ms // 5),
            max_poll_interval_ms=settings.max_poll_interval_ms,
            # Static membership: a restarted replica (same index) takes its partitions back without a
            # rebalance, and a broker restart does not reshuffle them, so no partition ever has a
            # still-writing previous owner; a second process with the same id is fenced by the broker.
            group_instance_id=instance_id,
            **settings.client_options,
        )
        self.lease = MembershipLease(self.consumer._coordinator.heartbeat, settings.session_timeout_ms / 1000)
        # The listener awaits on kafka-python's loop (`sleep`) and its commit futures (`wait_for`); both are
        # internals of the pinned version: refuse a client without them rather than block its IO thread.
        loop, manager = getattr(self.consumer, "_net", None), getattr(self.consumer, "_manager", None)
        if not (hasattr(loop, "sleep") and hasattr(manager, "wait_for")):
            raise TypeError("this kafka-python has no awaitable IO loop (consumer._net.sleep): unsupported version")
        self._loop, self._manager = loop, manager
        self.consumer.subscribe(topics=[settings.topic], listener=_Listener(self))
        self._last_lag = 0.0
        # Newly assigned partitions stay paused until the polling thread has cleaned up and seeked them; the
        # listener (IO thread) may not make blocking consumer calls, so it only commits asynchronously.
        self._in_callback = False
        self._callback_commits: list[Any] = []
        self._recovering: set[TopicPartition] = set()
        self._paused_all = False
        self._delivered = DeliveryGuard()
        self._undecodable: dict[TopicPartition, Undecodable] = {}

    # -- the Source protocol ------------------------------------------------------------------------------

    def poll(self, timeout_s: float) -> list[Record]:
        try:
            batches = self.consumer.poll(timeout_ms=int(timeout_s * 1000))
        except Exception as exc:
            if not self._set_aside(exc):
                raise
            return []
        records: list[Record] = []
        for ktp in sorted(batches, key=lambda t: (t.topic, t.partition)):
            tp = (ktp.topic, ktp.partition)
            if tp in self._recovering:
                continue  # refetched after the seek
            for m in batches[ktp]:
                if not self._delivered.admit(tp, m.offset):
                    self._skip_replayed(tp, m.offset)
                    continue
                records.append(Record(
                    m.topic, m.partition, m.offset, m.value, m.key, m.timestamp if m.timestamp and m.timestamp > 0 else None
                ))
        if self._recovering:
            self._recover()
        if self.metrics is not None and time.monotonic() - self._last_lag > 5:
            self._update_lag()
        return records

    def _skip_replayed(self, tp: TopicPartition, offset: int) -> None:
        if self.metrics is not None:
            self.metrics.replayed_skipped.inc()
        log.warning("record.replayed_by_client", partition=tp[1], offset=offset, detail="already taken: not redone")

    def undecodable(self) -> list[Undecodable]:
        return list(self._undecodable.values())

    def _set_aside(self, exc: Exception) -> bool:
        """A batch the client cannot decode: pause its partition (and only it) and say so, instead of failing.

        kafka-python raises such an error out of `poll()` every time it reaches that batch, so letting it
        through would stop every partition this member owns (and a restarted replica fetches the same batch
        again). Its committed offset stays before the batch: nothing is lost, and nothing after it is read
        until an operator acts (README, "A partition paused as undecodable"). False when `exc` is not one.
        """
        if not is_decoding_error(exc):
            return False
        where = self._failing_partition(exc)
        if where is None:
            return False
        ktp, offset = where
        tp = (ktp.topic, ktp.partition)
        cause = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        self.consumer.pause(ktp)
        self._undecodable[tp] = Undecodable(ktp.topic, ktp.partition, offset, cause)
        if self.metrics is not None:
            self.metrics.undecodable.labels(topic=ktp.topic, partition=str(ktp.partition), offset=str(offset)).set(1)
            self.metrics.ready.set(0)
        log.error("partition.undecodable", topic=ktp.topic, partition=ktp.partition, offset=offset, cause=cause,
                  detail="this partition is paused here; the others go on")
        return True

    def _failing_partition(self, exc: Exception) -> tuple[KafkaTopicPartition, int] | None:
        fetcher = getattr(self.consumer, "_fetcher", None)
        current = getattr(fetcher, "_next_partition_records", None)
        if current:
            # The records being read when it failed. Their iterator is dead now: drained, so that the client
            # does not spin on it should the partition ever be resumed (it refetches and fails again instead).
            ktp, offset = current.topic_partition, current.next_fetch_offset
            current.drain()
            return ktp, offset
        for arg in exc.args[1:]:  # RecordTooLargeError(message, {tp: offset})
            if isinstance(arg, dict) and len(arg) == 1:
                ktp, offset = next(iter(arg.items()))
                if isinstance(ktp, KafkaTopicPartition) and isinstance(offset, int):
                    return ktp, offset
        named = _NAMED_PARTITION.search(str(exc))  # "Failed to make progress reading messages at TopicPartition(...)=N"
        if named is not None:
            return KafkaTopicPartition(named.group(1), int(named.group(2))), int(named.group(3))
        return None

    def _release(self, tps: list[TopicPartition]) -> None:
        """Partitions no longer ours: whoever owns them next meets the batch (and sets it aside) for itself."""
        for tp in tps:
            gone = self._undecodable.pop(tp, None)
            if gone is not None and self.metrics is not None:
                self.metrics.undecodable.remove(gone.topic, str(gone.partition), str(gone.offset))
        if self.metrics is not None and not self._undecodable:
            self.metrics.ready.set(1)

    def write_allowed(self) -> bool:
        valid, changed = self.lease.check()
        if changed:
            if valid:
                log.info("membership.confirmed")
            else:
                if self.metrics is not None:
                    self.metrics.ownership_lapses.inc()
                log.warning("membership.unconfirmed", lease_s=round(self.lease.length_s, 1),
                            detail="holding writes until the group confirms this member")
        return valid

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        kafka_offsets = {_tp(tp): OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}
        if self._in_callback:
            # On the IO thread: send it and let the listener await it. Should it fail, the next owner finds
            # our results past its committed offset when it recovers the partition, removes and redoes them.
            self._callback_commits.append(self.consumer.commit_async(kafka_offsets))
        else:
            self.consumer.commit(kafka_offsets)

    def pause(self, tps: list[TopicPartition]) -> None:
        self._paused_all = True
        self.consumer.pause(*[_tp(tp) for tp in tps])

    def resume(self, tps: list[TopicPartition]) -> None:
        self._paused_all = False
        self.consumer.resume(*[_tp(tp) for tp in tps if tp not in self._recovering and tp not in self._undecodable])

    def assignment(self) -> list[TopicPartition]:
        return [(tp.topic, tp.partition) for tp in self.consumer.assignment()]

    def close(self) -> None:
        self.consumer.close(autocommit=False)

    # -- rebalances ---------------------------------------------------------------------------------------

    async def _revoked(self, tps: list[TopicPartition]) -> None:
        """Handed over cleanly: finish what is in flight for them (bounded), commit, forget the rest."""
        self._recovering.difference_update(tps)
        self._release(tps)
        self._delivered.forget(tps)
        if not tps or self.hooks is None:
            return
        started = time.monotonic()
        deadline = started + self.hooks.drain_timeout_s
        self._in_callback = True
        try:
            while (left := self.hooks.drain_left(tps)) and time.monotonic() < deadline:
                await self._loop.sleep(0.01)  # the IO loop runs on meanwhile: heartbeats keep us in the group
            self.hooks.end_drain(commit=True)
            for future in self._callback_commits:
                try:
                    await self._manager.wait_for(future, LOOKUP_TIMEOUT_MS)
                except Exception as exc:  # the next owner cleans up past whatever offset did get committed
                    log.warning("partitions.revoke_commit_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._in_callback = False
            self._callback_commits.clear()
        self.hooks.forget(tps)
        waited = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.rebalances.labels(event="revoked").inc(len(tps))
            self.metrics.rebalance_drain_seconds.observe(waited)
        log.info("partitions.revoked", partitions=[p for _, p in tps], waited_s=round(waited, 3),
                 abandoned=left or 0, **({"pipeline": "failed"} if left is None else {}))

    def _lost(self, tps: list[TopicPartition]) -> None:
        """Lost (evicted): the group has already given them to someone else, who redoes everything
        uncommitted; finishing our in-flight records would only write them a second time."""
        self._recovering.difference_update(tps)
        self._release(tps)
        self._delivered.forget(tps)
        if not tps or self.hooks is None:
            return
        self.hooks.forget(tps)
        if self.metrics is not None:
            self.metrics.rebalances.labels(event="lost").inc(len(tps))
        log.warning("partitions.lost", partitions=[p for _, p in tps])

    def _assigned(self, tps: list[TopicPartition]) -> None:
        self.lease.joined()
        if not tps:
            return
        if self.metrics is not None:
            self.metrics.rebalances.labels(event="assigned").inc(len(tps))
        if self.on_assigned is not None:
            self._recovering.update(tps)
            self.consumer.pause(*[_tp(tp) for tp in tps])
        log.info("partitions.assigned", partitions=[p for _, p in tps])

    def _recover(self) -> None:
        """On the polling thread: clean up past each new partition's committed offset, seek there, resume."""
        assigned = set(self.assignment())
        self._recovering &= assigned
        for tp in sorted(self._recovering):
            try:
                committed = self.consumer.committed(_tp(tp), timeout_ms=LOOKUP_TIMEOUT_MS)
                start = committed if committed is not None else self._reset_offset(tp)
                self.on_assigned(tp, start)
                if committed is None and self.settings.auto_offset_reset == "latest":
                    # Pinned at once: a replica that died before its first commit must not let the next owner
                    # start at a later end and skip what was produced in between.
                    self.consumer.commit({_tp(tp): OffsetAndMetadata(start, "", -1)})
            except Exception as exc:  # Kafka or S3 away: the partition stays paused, we try again next poll
                log.warning("partition.recovery_failed", partition=tp[1], error=f"{type(exc).__name__}: {exc}")
                continue
            self.consumer.seek(_tp(tp), start)  # explicit: the same offset the cleanup assumed
            self._delivered.reset(tp, start)
            self._recovering.discard(tp)
            if not self._paused_all and tp not in self._undecodable:
                self.consumer.resume(_tp(tp))

    def _reset_offset(self, tp: TopicPartition) -> int:
        """Where a partition the group never committed starts (`RAMPLUS_KAFKA__AUTO_OFFSET_RESET`): its first
        record (earliest) or its end when assigned (latest: only what is produced from now on)."""
        lookup = self.consumer.end_offsets if self.settings.auto_offset_reset == "latest" else self.consumer.beginning_offsets
        return lookup([_tp(tp)], timeout_ms=LOOKUP_TIMEOUT_MS)[_tp(tp)]

    def _update_lag(self) -> None:
        self._last_lag = time.monotonic()
        assigned = list(self.consumer.assignment())
        if not assigned:
            return
        try:
            ends = self.consumer.end_offsets(assigned, timeout_ms=1_000)
            for tp in assigned:
                position = self.consumer.committed(tp, timeout_ms=1_000)
                if position is None:
                    continue
                self.metrics.lag.labels(topic=tp.topic, partition=str(tp.partition)).set(max(0, ends[tp] - position))
        except Exception as exc:  # lag is for graphs: never fail the stream over it
            log.debug("lag.failed", error=str(exc))

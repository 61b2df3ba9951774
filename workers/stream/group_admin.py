"""The driver's view of the consumer group: whose static members to remove, and how far behind the group is.

Replicas join as static members (`<group>-replica-<i>`): a replica restarted in place takes its partitions back
without a rebalance. The price is that a member that is gone for good keeps its partitions until the broker's
session timeout (`kafka.session_timeout_ms`, 45 s by default) runs out. The driver knows sooner (Ray declares a
node dead in about 15 s, an actor's death at once) and removes the member itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import structlog

from workers.settings import KafkaSettings

log = structlog.get_logger("ramplus.group")


def instance_id(kafka: KafkaSettings, index: int) -> str | None:
    """Replica `index`'s static member name (None when static membership is off)."""
    return f"{kafka.group_id}-replica-{index}" if kafka.static_membership else None


def _admin(kafka: KafkaSettings) -> Any:
    from kafka.admin import KafkaAdminClient

    return KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers.split(","), request_timeout_ms=5_000, **kafka.client_options)


def remove_static_members(kafka: KafkaSettings, indices: Iterable[int], *, reason: str) -> dict[str, str]:
    """Ask the broker to drop replicas' static members now, so that their partitions go to the others.

    Best effort: the members expire after the session timeout anyway. A member that is not there (it left,
    or never joined) is no error. Returns member -> outcome (an error class name, or "removed").
    """
    from kafka.admin import MemberToRemove

    members = [m for m in (instance_id(kafka, i) for i in indices) if m is not None]
    if not members:
        return {}
    try:
        admin = _admin(kafka)
        try:
            answers = admin.remove_group_members(
                kafka.group_id, [MemberToRemove(group_instance_id=m, reason=f"ramplus: {reason}") for m in members]
            )
        finally:
            admin.close()
        outcome = {
            getattr(m, "group_instance_id", str(m)): ("removed" if e.__name__ == "NoError" else e.__name__) for m, e in answers.items()
        }
        log.info("group.members_removed", group=kafka.group_id, reason=reason, members=outcome)
        return outcome
    except Exception as exc:  # the broker away: the members expire after session_timeout_ms anyway
        log.warning("group.remove_members_failed", group=kafka.group_id, reason=reason, error=f"{type(exc).__name__}: {exc}")
        return {m: type(exc).__name__ for m in members}


@dataclasses.dataclass(frozen=True)
class GroupLag:
    """Records of the topic that the group has not committed yet, all partitions together."""

    records: int
    partitions: int


class LagProbe:
    """Measures the group's lag from outside the group (no membership): end offsets minus committed offsets.

    A partition the group never committed counts from its beginning with `auto_offset_reset=earliest`
    (where the group will start) and as no lag with `latest`.
    """

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self._consumer: Any = None
        self._admin: Any = None

    def _connect(self) -> None:
        from kafka import KafkaConsumer

        if self._consumer is None:
            self._consumer = KafkaConsumer(
                bootstrap_servers=self.kafka.bootstrap_servers.split(","), group_id=None, enable_auto_commit=False,
                client_id="ramplus-lag-probe", request_timeout_ms=10_000, **self.kafka.client_options,
            )
        if self._admin is None:
            self._admin = _admin(self.kafka)

    def measure(self) -> GroupLag:
        from kafka import TopicPartition

        self._connect()
        ids = self._consumer.partitions_for_topic(self.kafka.topic) or set()
        tps = [TopicPartition(self.kafka.topic, p) for p in sorted(ids)]
        if not tps:
            return GroupLag(0, 0)
        ends = self._consumer.end_offsets(tps)
        offsets = self._admin.list_group_offsets({self.kafka.group_id: tps}).get(self.kafka.group_id, {})
        committed = {tp: meta.offset for tp, meta in offsets.items()}
        starts = self._consumer.beginning_offsets(tps) if self.kafka.auto_offset_reset == "earliest" else ends
        total = 0
        for tp in tps:
            position = committed.get(tp)
            if position is None or position < 0:
                position = starts[tp]
            total += max(0, ends[tp] - position)
        return GroupLag(total, len(tps))

    def close(self) -> None:
        for client in (self._consumer, self._admin):
            if client is not None:
                try:
                    client.close()
                except Exception:  # closing a client whose broker is gone
                    pass
        self._consumer = self._admin = None

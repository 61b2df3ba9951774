"""Whether each replica actor is alive where Ray placed it, and when the driver should give its partitions away.

Ray knows before Kafka does: an actor whose process died is RESTARTING at once, and one whose node died is
restarted (or left pending, with nowhere to go) as soon as the GCS declares the node dead, about 15 s after
its last heartbeat with Ray's defaults. The broker only drops the replica's static member after
`kafka.session_timeout_ms`. `LostReplicas` turns Ray's view into "remove this member now".
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import ray


class ActorState(str, enum.Enum):
    ALIVE = "alive"
    PENDING = "pending"  # waiting for resources or for its constructor (first start)
    RESTARTING = "restarting"  # its process or node died; Ray starts it again where it can
    DEAD = "dead"  # killed for good, or out of restarts
    UNKNOWN = "unknown"  # the GCS did not answer


_RAY_STATES = {
    "ALIVE": ActorState.ALIVE, "PENDING_CREATION": ActorState.PENDING, "DEPENDENCIES_UNREADY": ActorState.PENDING,
    "RESTARTING": ActorState.RESTARTING, "DEAD": ActorState.DEAD,
}


@dataclasses.dataclass(frozen=True)
class ActorHealth:
    state: ActorState
    node_id: str | None = None
    node_alive: bool | None = None  # None: not placed, or the node is unknown to the GCS


def actor_health(actor: Any, alive_nodes: set[str] | None = None) -> ActorHealth:
    """Ray's record of one actor (from the GCS, so it works without the dashboard's state API).

    `ray._private.state.actors` is the GCS accessor behind `ray list actors`; it is private, so this is the
    one place that calls it, and a Ray without it fails here loudly rather than leaving lost nodes unnoticed.
    """
    from ray._private import state

    try:
        record = state.actors(actor_id=actor._actor_id.hex())
    except Exception:  # the GCS restarting, the connection lost: say so rather than guess
        return ActorHealth(ActorState.UNKNOWN)
    node = (record.get("Address") or {}).get("NodeID") or None
    if alive_nodes is None:
        alive_nodes = live_nodes()
    return ActorHealth(
        _RAY_STATES.get(str(record.get("State", "")), ActorState.UNKNOWN), node,
        (node in alive_nodes) if node else None,
    )


def live_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


class LostReplicas:
    """Decides, watch after watch, which replicas' group members to remove.

    A replica is lost when the node it last ran on is dead (Ray reports the actor RESTARTING or pending, and
    the member's partitions would otherwise idle until the session timeout), when Ray has it dead, or when
    it has not been alive for `grace_s` since it last was. A restart in place on a live node usually comes
    back within the grace, keeping static membership's promise of no rebalance. Each loss is reported once,
    and again only after the replica was seen alive in between.
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._alive_at: dict[int, float] = {}
        self._node: dict[int, str] = {}
        self._removed: set[int] = set()

    def seen(self, index: int, health: ActorHealth, now: float, live: set[str] | None = None) -> str | None:
        """The reason to remove replica `index`'s member now, or None. `live`: the nodes Ray has alive."""
        if health.state is ActorState.ALIVE and health.node_alive is not False:
            self._alive_at[index] = now
            if health.node_id:
                self._node[index] = health.node_id
            self._removed.discard(index)
            return None
        if index in self._removed or health.state is ActorState.UNKNOWN:
            return None
        if index not in self._alive_at:
            # Never alive yet (a first start, pending or loading): it holds no partitions to give away.
            return "its actor is dead" if health.state is ActorState.DEAD and self._mark(index) else None
        since = self._alive_at[index]
        last_node = self._node.get(index)
        reason = None
        if health.node_alive is False:
            reason = f"its node {health.node_id[:12] if health.node_id else '?'} is dead"
        elif last_node is not None and live is not None and last_node not in live:
            reason = f"the node it ran on ({last_node[:12]}) is dead; Ray has it {health.state.value}"
        elif health.state is ActorState.DEAD:
            reason = "its actor is dead"
        elif now - since >= self.grace_s:
            reason = f"{health.state.value} for {now - since:.0f} s"
        if reason is not None:
            self._removed.add(index)
        return reason

    def _mark(self, index: int) -> bool:
        self._removed.add(index)
        return True

    def forget(self, index: int) -> None:
        """The replica was retired on purpose (scaled down): nothing to watch any more."""
        self._alive_at.pop(index, None)
        self._node.pop(index, None)
        self._removed.discard(index)

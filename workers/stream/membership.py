"""Whether this consumer may still write for its partitions: a lease on group membership (see `MembershipLease`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# Of the session timeout, how much a membership lease keeps back for a write already started and for
# clock granularity; the lease is the rest, counted from the last heartbeat the broker acknowledged.
LEASE_MARGIN = 0.25
# How far before the JoinGroup/SyncGroup answer (seen in the assignment callback) the broker may have
# started our new session: a round trip on the cluster network, with room to spare.
JOIN_RTT_S = 1.0


class MembershipLease:
    """Whether the broker can still count this consumer as a member of its group, from our side.

    The broker evicts a member whose heartbeats stop for `session_timeout`, and gives its partitions to
    others, who clean up past the committed offsets and redo them. The evicted member learns of it only at
    its next successful contact, and until then it would happily write results for partitions it lost:
    duplicates no cleanup sees any more. So writes are allowed only inside the session the broker last
    confirmed: an acknowledged heartbeat sent at t (or a join answered at t) keeps us in until
    t + session_timeout at least; we stop short of that by a margin.

    kafka-python 3 keeps those times on the coordinator's `Heartbeat` (`last_send`, `last_receive`; a
    heartbeat's send and receive alternate on one loop, so a receive after the last send acknowledges it).
    The version is pinned; the constructor refuses a consumer without them, rather than guess.
    """

    def __init__(self, heartbeat: Any, session_timeout_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not all(hasattr(heartbeat, a) for a in ("last_send", "last_receive")):
            raise TypeError(f"{type(heartbeat).__name__} has no last_send/last_receive: unsupported kafka-python")
        self.heartbeat = heartbeat
        self.length_s = session_timeout_s * (1 - LEASE_MARGIN)
        self.clock = clock
        self._confirmed_at = float("-inf")  # the latest send time the broker acknowledged
        self._was_valid = True

    def joined(self) -> None:
        """The group just answered our join (called from the assignment callback)."""
        self._confirmed_at = max(self._confirmed_at, self.clock() - JOIN_RTT_S)

    def valid(self) -> bool:
        sent, received = self.heartbeat.last_send, self.heartbeat.last_receive
        if received >= sent:
            self._confirmed_at = max(self._confirmed_at, sent)
        return self.clock() < self._confirmed_at + self.length_s

    def check(self) -> tuple[bool, bool]:
        """(valid now, changed since the last check): for logging transitions once."""
        valid = self.valid()
        changed, self._was_valid = valid != self._was_valid, valid
        return valid, changed

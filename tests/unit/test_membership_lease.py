"""Writes only inside the session the broker last confirmed (MembershipLease), on a fake clock."""

from types import SimpleNamespace

import pytest

from workers.stream.membership import JOIN_RTT_S, LEASE_MARGIN, MembershipLease


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(session_s: float = 10.0):
    clock = Clock()
    heartbeat = SimpleNamespace(last_send=float("-inf"), last_receive=float("-inf"))
    return MembershipLease(heartbeat, session_s, clock=clock), heartbeat, clock


def test_no_lease_before_the_group_confirmed_anything():
    lease, _, _ = make()
    assert not lease.valid()


def test_an_acknowledged_heartbeat_counts_from_when_it_was_sent():
    lease, hb, clock = make(10.0)
    hb.last_send, hb.last_receive = 1000.0, 1003.0  # a slow answer: the session started at the send
    clock.now = 1003.0
    assert lease.valid()
    clock.now = 1000.0 + 10.0 * (1 - LEASE_MARGIN) - 0.01
    assert lease.valid()
    clock.now = 1000.0 + 10.0 * (1 - LEASE_MARGIN) + 0.01
    assert not lease.valid()


def test_a_heartbeat_without_an_answer_extends_nothing():
    lease, hb, clock = make(10.0)
    hb.last_send, hb.last_receive = 1000.0, 1000.1
    assert lease.valid()
    hb.last_send = 1002.0  # sent, never answered (the broker is away)
    clock.now = 1008.0
    assert not lease.valid()
    hb.last_receive = 1008.5  # answered at last: the session runs from 1002
    clock.now = 1008.5
    assert lease.valid()


def test_a_join_answer_opens_a_lease_at_once():
    lease, _, clock = make(10.0)
    lease.joined()
    assert lease.valid()
    clock.now += 10.0 * (1 - LEASE_MARGIN) - JOIN_RTT_S
    assert not lease.valid()


def test_transitions_are_reported_once():
    lease, hb, clock = make(10.0)
    hb.last_send, hb.last_receive = 1000.0, 1000.0
    assert lease.check() == (True, False)
    clock.now = 1100.0
    assert lease.check() == (False, True)
    assert lease.check() == (False, False)


def test_a_client_without_heartbeat_times_is_refused():
    with pytest.raises(TypeError, match="unsupported kafka-python"):
        MembershipLease(object(), 10.0)

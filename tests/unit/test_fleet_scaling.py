"""The fleet's scaling policy and its judgement of lost replicas, as pure functions of time (no Ray, no Kafka)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from workers.settings import FleetSettings
from workers.stream.autoscale import Scaler, ScalingPolicy
from workers.stream.replica_health import ActorHealth, ActorState, LostReplicas

POLICY = ScalingPolicy(min_replicas=1, max_replicas=3, target_lag_per_replica=100, scale_up_delay_s=10, scale_down_delay_s=60)


@pytest.mark.parametrize(("lag", "partitions", "wanted"), [
    (0, 4, 1), (100, 4, 1), (101, 4, 2), (250, 4, 3), (10_000, 4, 3),  # bounded by max_replicas
    (10_000, 2, 2),  # never more replicas than partitions
    (10_000, 0, 3),  # partitions unknown: the bound is max_replicas
])
def test_the_lag_asks_for_replicas_within_the_bounds(lag, partitions, wanted):
    assert POLICY.wanted(lag, partitions) == wanted


def test_a_policy_with_bounds_upside_down_is_refused():
    with pytest.raises(ValueError, match="min_replicas"):
        ScalingPolicy(3, 2, 100, 0, 0)
    with pytest.raises(ValidationError, match="min_replicas"):
        FleetSettings(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError, match="both"):
        FleetSettings(min_replicas=1)


def test_scaling_waits_for_its_delay_and_a_lull_in_between_restarts_the_clock():
    scaler = Scaler(POLICY)
    assert scaler.decide(1, 1_000, 4, now=0) is None  # a burst starts: wait 10 s
    assert scaler.decide(1, 1_000, 4, now=9) is None
    assert scaler.decide(1, 50, 4, now=9.5) is None  # drained by itself: the wish is gone
    assert scaler.decide(1, 1_000, 4, now=12) is None  # a new burst: a new 10 s
    up = scaler.decide(1, 1_000, 4, now=22)
    assert up is not None and up.replicas == 3 and "scale up" in up.reason and "lag 1000" in up.reason
    assert up.waited_s == 10
    # down takes the longer delay, and only after the lag has stayed low all that time
    assert scaler.decide(3, 0, 4, now=30) is None
    assert scaler.decide(3, 0, 4, now=80) is None
    assert scaler.decide(3, 500, 4, now=85) is None  # lag back: no shrinking
    assert scaler.decide(3, 0, 4, now=90) is None
    down = scaler.decide(3, 0, 4, now=150)
    assert down is not None and down.replicas == 1 and "scale down" in down.reason


def test_a_size_out_of_bounds_is_fixed_at_once():
    scaler = Scaler(POLICY)
    fix = scaler.decide(4, 10_000, 2, now=0)  # two partitions for four replicas
    assert fix is not None and fix.replicas == 2 and "out of bounds" in fix.reason


def test_fixed_or_scaling_settings_and_where_they_start():
    assert not FleetSettings(replicas=2).scales and FleetSettings(replicas=2).initial_replicas == 2
    scaling = FleetSettings(min_replicas=1, max_replicas=3)
    assert scaling.scales and scaling.initial_replicas == 1
    assert FleetSettings(replicas=5, min_replicas=1, max_replicas=3).initial_replicas == 3


def alive(node="n1"):
    return ActorHealth(ActorState.ALIVE, node, True)


def test_a_replica_on_a_dead_node_is_lost_at_once_and_reported_once():
    lost = LostReplicas(grace_s=10)
    assert lost.seen(0, alive(), now=0) is None
    reason = lost.seen(0, ActorHealth(ActorState.RESTARTING, "n1", False), now=1)
    assert reason is not None and "dead" in reason
    assert lost.seen(0, ActorHealth(ActorState.PENDING, None, None), now=5) is None  # already given away
    assert lost.seen(0, alive("n2"), now=30) is None  # back on another node
    assert lost.seen(0, ActorHealth(ActorState.RESTARTING, "n2", False), now=40) is not None  # lost again: again


def test_a_restart_in_place_keeps_its_partitions_within_the_grace():
    lost = LostReplicas(grace_s=10)
    assert lost.seen(1, alive(), now=0) is None
    assert lost.seen(1, ActorHealth(ActorState.RESTARTING, "n1", True), now=2) is None
    assert lost.seen(1, ActorHealth(ActorState.RESTARTING, "n1", True), now=9) is None
    assert lost.seen(1, alive(), now=11) is None  # came back: no rebalance
    assert lost.seen(1, ActorHealth(ActorState.PENDING, None, None), now=12) is None
    reason = lost.seen(1, ActorHealth(ActorState.PENDING, None, None), now=22)
    assert reason is not None and "pending for 11 s" in reason  # since it was last seen alive


def test_a_replica_restarting_after_its_node_died_is_lost_at_once():
    """Ray reports the actor RESTARTING (or pending) somewhere else: what counts is the node it ran on."""
    lost = LostReplicas(grace_s=10)
    assert lost.seen(0, alive("n1"), now=0, live={"n1", "n2"}) is None
    assert lost.seen(0, ActorHealth(ActorState.RESTARTING, "n2", True), now=1, live={"n1", "n2"}) is None  # in place?
    reason = lost.seen(0, ActorHealth(ActorState.RESTARTING, "n2", True), now=2, live={"n2"})
    assert reason is not None and "n1" in reason and "dead" in reason


def test_an_unknown_state_removes_nobody_and_a_first_start_is_no_loss():
    lost = LostReplicas(grace_s=0)
    assert lost.seen(2, alive(), now=0) is None
    assert lost.seen(2, ActorHealth(ActorState.UNKNOWN), now=100) is None
    assert lost.seen(2, ActorHealth(ActorState.DEAD), now=100) == "its actor is dead"
    # a new replica loading or waiting for a node has joined no group yet: nothing to give away
    assert lost.seen(3, ActorHealth(ActorState.PENDING, None, None), now=0) is None
    assert lost.seen(3, ActorHealth(ActorState.PENDING, None, None), now=1_000) is None

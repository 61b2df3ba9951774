"""How many replicas the lag asks for: the fleet's scaling policy, as data and a pure function of time.

In the manner of KEDA's Kafka scaler and Ray Serve's autoscaler: a target backlog per replica, never fewer
than `min_replicas` nor more than `max_replicas` or the topic's partitions (a replica without a partition
only holds a GPU), and a change only after the wish has lasted `scale_up_delay_s` (growing) or
`scale_down_delay_s` (shrinking), so that a burst or a lull does not make the fleet flap.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class ScalingPolicy:
    min_replicas: int
    max_replicas: int
    target_lag_per_replica: int
    scale_up_delay_s: float
    scale_down_delay_s: float

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas} and {self.max_replicas}")
        if self.target_lag_per_replica < 1:
            raise ValueError("target_lag_per_replica must be at least 1")

    def ceiling(self, partitions: int) -> int:
        """The most replicas worth running: max_replicas, or fewer when the topic has fewer partitions."""
        return max(self.min_replicas, min(self.max_replicas, partitions or self.max_replicas))

    def wanted(self, lag: int, partitions: int) -> int:
        """Replicas for this backlog, within the bounds (the bounds win over the lag)."""
        return max(self.min_replicas, min(self.ceiling(partitions), math.ceil(lag / self.target_lag_per_replica)))


@dataclasses.dataclass(frozen=True)
class ScalingDecision:
    replicas: int  # the new size
    reason: str
    waited_s: float = 0.0  # how long the lag had asked for it


class Scaler:
    """Applies a `ScalingPolicy` over time: remembers since when the lag has asked for another size."""

    def __init__(self, policy: ScalingPolicy) -> None:
        self.policy = policy
        self._wish: int | None = None
        self._since = 0.0

    def decide(self, current: int, lag: int, partitions: int, now: float) -> ScalingDecision | None:
        wanted = self.policy.wanted(lag, partitions)
        if not self.policy.min_replicas <= current <= self.policy.ceiling(partitions):
            self._wish = None  # out of bounds (a setting changed, partitions fewer): fix at once
            return ScalingDecision(wanted, f"{current} replicas out of bounds [{self.policy.min_replicas}, {self.policy.max_replicas}] "
                                           f"with {partitions} partitions")
        if wanted == current:
            self._wish = None
            return None
        if self._wish is None or (self._wish > current) != (wanted > current):
            self._since = now  # a new wish, or it turned around: its delay starts now
        self._wish = wanted
        delay = self.policy.scale_up_delay_s if wanted > current else self.policy.scale_down_delay_s
        if now - self._since < delay:
            return None
        self._wish = None
        direction = "up" if wanted > current else "down"
        return ScalingDecision(wanted, f"scale {direction}: lag {lag} records for {now - self._since:.0f} s, "
                                       f"target {self.policy.target_lag_per_replica} per replica, {partitions} partitions",
                               now - self._since)

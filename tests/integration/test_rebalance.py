"""A rebalance while a batch is slow: the member stays in the group, and what it held is written once.

Two replicas in this process (no Ray: the point is the consumer group), a model that sleeps through one
batch for more than twice the session timeout, and a second replica joining meanwhile. The revocation
waits for the slow batch; the member must keep heartbeating while it waits (kafka-python runs rebalance
listeners on its IO loop, where a blocking wait would stop heartbeats and get the member evicted).
"""

from __future__ import annotations

import threading
import time

import pytest
from kafka.admin import KafkaAdminClient

from fleet_kit import assert_each_once, committed_reaches_end, fleet_settings, publish_image_requests, result_ids, wait_for_ids
from infra.local.kit import wait_until
from workers.stream.replica import Replica

pytestmark = pytest.mark.integration
SESSION_MS = 6_000  # the broker's smallest (group.min.session.timeout.ms)
SLOW_S = 15.0  # one batch: 2.5 sessions


class SlowOnce:
    """Wraps `engine.run` (the model step of the pipeline): the first batch after `arm()` sleeps SLOW_S before it is tagged."""

    def __init__(self, infer) -> None:  # noqa: ANN001
        self.infer = infer
        self.armed = False
        self.sleeping = threading.Event()
        self.lock = threading.Lock()

    def arm(self) -> None:
        self.armed = True

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        with self.lock:
            slow, self.armed = self.armed, False
        if slow:
            self.sleeping.set()
            time.sleep(SLOW_S)
        return self.infer(*args, **kwargs)


def members(admin: KafkaAdminClient, group: str) -> dict[str, str]:
    """group.instance.id -> member id, as the broker sees the group now."""
    described = admin.describe_groups([group])[group]
    return {m["group_instance_id"]: m["member_id"] for m in described["members"]}


def test_a_slow_batch_during_a_rebalance_keeps_the_member_and_writes_what_it_held_once(
    stack, aws_env, tiny_model_dir, s3_client, s3_bucket
):
    topic, _, ids = publish_image_requests(stack, s3_client, s3_bucket, "rebal", "b", 400, images=10)
    settings = fleet_settings(
        stack, tiny_model_dir, s3_bucket, topic, kafka={"session_timeout_ms": SESSION_MS, "max_poll_interval_ms": 90_000},
        max_in_flight=32, drain_timeout_s=40,
    )
    group, instance = settings.kafka.group_id, f"{settings.kafka.group_id}-replica-0"
    first = Replica(settings, 0)
    slow = first.engine.run = SlowOnce(first.engine.run)
    second: Replica | None = None
    threads = [threading.Thread(target=first.run, name="replica-0", daemon=True)]
    threads[0].start()
    admin = KafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    try:
        assert wait_until(lambda: len(result_ids(s3_client, s3_bucket)) >= 40, 120, interval_s=0.5)
        member_before = members(admin, group)[instance]
        slow.arm()
        assert slow.sleeping.wait(60), "no batch reached the model after arming"
        second = Replica(settings, 1)  # joins the group: every partition of the first replica is revoked
        threads.append(threading.Thread(target=second.run, name="replica-1", daemon=True))
        threads[1].start()
        seen_members: list[dict[str, str]] = []
        deadline = time.monotonic() + SLOW_S + 10
        while time.monotonic() < deadline:  # through the slow batch and past it: is the member ever dropped?
            seen_members.append(members(admin, group))
            time.sleep(0.5)
        seen = wait_for_ids(s3_client, s3_bucket, set(ids), timeout_s=180)
        assert wait_until(lambda: committed_reaches_end(stack.kafka_bootstrap, group, topic), 60)
        seen = result_ids(s3_client, s3_bucket)
        member_after = members(admin, group).get(instance)
    finally:
        first.stop_event.set()
        if second is not None:
            second.stop_event.set()
        for t in threads:
            t.join(60)
        admin.close()

    assert all(instance in m for m in seen_members), [sorted(m) for m in seen_members if instance not in m][:3]
    assert member_after == member_before  # never evicted: an evicted static member comes back with a new member id
    events = {e: first.metrics.rebalances.labels(event=e)._value.get() for e in ("revoked", "lost")}
    assert events["lost"] == 0 and events["revoked"] >= 1, events
    # the revocation did wait for the slow batch (and heartbeats went on meanwhile)
    assert first.metrics.rebalance_drain_seconds._sum.get() >= SLOW_S / 2
    assert second.metrics.rebalances.labels(event="assigned")._value.get() >= 1
    assert_each_once(s3_client, s3_bucket, seen, ids)

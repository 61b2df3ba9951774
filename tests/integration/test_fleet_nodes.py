"""The fleet on a Ray cluster of several nodes (tests/ray_nodes.py): a node lost for good, lag scaling.

Replicas ask for one `ramplus_test_slot`, which only the added nodes have (one each), so each replica lands
on its own node and a dead node's replica has nowhere to go until another node joins.
"""

from __future__ import annotations

import threading
from datetime import datetime
import time
import uuid

import pytest

from fleet_kit import (
    assert_each_once, committed_reaches_end, fleet_settings, make_topics, publish, request, result_ids, result_lines,
    upload_images, wait_for_ids,
)
from infra.local.kit import wait_until
from ray_nodes import SLOT
from workers.stream.fleet import Fleet

pytestmark = pytest.mark.integration


class SteadyProducer(threading.Thread):
    """Publishes `rate` requests a second until stopped: a stream that goes on through a node's death."""

    def __init__(self, stack, topic: str, uris: list[str], prefix: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.stack, self.topic, self.uris, self.prefix, self.rate = stack, topic, uris, prefix, rate
        self.ids: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            burst = [f"{self.prefix}{n + i:05d}" for i in range(int(self.rate))]
            publish(self.stack.kafka_bootstrap, self.topic, [request(i, self.uris[k % len(self.uris)]) for k, i in enumerate(burst)])
            self.ids.extend(burst)
            n += len(burst)
            self.halt.wait(1.0)


def partitions_by_replica(fleet: Fleet) -> dict[int, list[int]]:
    return {s["replica"]: s.get("partitions", []) for s in fleet.stats() if "partitions" in s}


def test_a_lost_node_gives_its_partitions_away_in_seconds_and_its_replica_returns_on_a_new_node(
    stack, ray_nodes, tiny_model_dir, s3_client, s3_bucket
):
    node_a, node_b = ray_nodes.add(), ray_nodes.add()
    topic, _ = make_topics(stack.kafka_bootstrap, f"nodes-{uuid.uuid4().hex[:8]}")
    uris = [f"s3://{s3_bucket}/{k}" for k in upload_images(s3_client, s3_bucket, 20)]
    # The production session timeout (45 s): what the driver saves is waiting it out.
    settings = fleet_settings(stack, tiny_model_dir, s3_bucket, topic, kafka={"session_timeout_ms": 45_000},
                              resources_per_replica={SLOT: 1}, max_in_flight=64, watch_interval_s=1.0)
    producer = SteadyProducer(stack, topic, uris, "n", rate=10)
    fleet = Fleet(settings)
    fleet.start()
    try:
        producer.start()
        assert wait_until(lambda: all(partitions_by_replica(fleet).get(i) for i in (0, 1)), 120), fleet.stats()
        owned = partitions_by_replica(fleet)
        on_b = next(i for i, a in fleet.actors.items() if _node_of(a) == node_b.node_id)
        lost_partitions = set(owned[on_b])
        assert wait_until(lambda: len(result_ids(s3_client, s3_bucket)) >= 50, 120)

        killed_at = time.time()
        ray_nodes.kill(node_b)

        def served_again() -> float | None:
            written = [datetime.fromisoformat(r["ts"]).timestamp() for _, r in result_lines(s3_client, s3_bucket)
                       if r["source"]["partition"] in lost_partitions]
            later = [t for t in written if t > killed_at]
            return min(later) if later else None

        assert wait_until(lambda: served_again() is not None, 60), "the lost partitions gave no result in 60 s"
        back_after = served_again() - killed_at
        print(f"\nnode killed (every process, SIGKILL): its partitions {sorted(lost_partitions)} gave results again "
              f"after {back_after:.1f} s (Kafka session timeout 45 s)")
        assert back_after < 25, back_after
        assert fleet.metrics.members_removed._value.get() >= 1

        # A replacement node: the replica comes back there and takes partitions back.
        node_c = ray_nodes.add()
        joined_at = time.time()
        assert wait_until(lambda: len(partitions_by_replica(fleet).get(on_b, [])) > 0, 180)
        assert _node_of(fleet.actors[on_b]) == node_c.node_id
        print(f"replacement node joined: replica {on_b} consuming there again after {time.time() - joined_at:.1f} s")
        assert node_a.node_id != node_c.node_id
        time.sleep(5)
        producer.halt.set()
        producer.join()
        seen = wait_for_ids(s3_client, s3_bucket, set(producer.ids), timeout_s=240)
        assert wait_until(lambda: committed_reaches_end(stack.kafka_bootstrap, f"g-{topic}", topic), 120)
        seen = result_ids(s3_client, s3_bucket)
    finally:
        producer.halt.set()
        fleet.stop()
    assert_each_once(s3_client, s3_bucket, seen, producer.ids)


def test_the_fleet_grows_with_the_lag_and_shrinks_back_after_the_delay(stack, ray_nodes, tiny_model_dir, s3_client, s3_bucket):
    for _ in range(3):
        ray_nodes.add()
    topic, _ = make_topics(stack.kafka_bootstrap, f"scale-{uuid.uuid4().hex[:8]}")
    uris = [f"s3://{s3_bucket}/{k}" for k in upload_images(s3_client, s3_bucket, 20)]
    settings = fleet_settings(
        stack, tiny_model_dir, s3_bucket, topic, replicas=1, resources_per_replica={SLOT: 1}, max_in_flight=64,
        min_replicas=1, max_replicas=3, target_lag_per_replica=200, scale_up_delay_s=2, scale_down_delay_s=15,
        watch_interval_s=1.0,
    )
    fleet = Fleet(settings)
    fleet.start()
    try:
        assert len(fleet.actors) == 1
        ids = [f"s{i:05d}" for i in range(3000)]
        burst_at = time.monotonic()
        publish(stack.kafka_bootstrap, topic, [request(i, uris[n % len(uris)]) for n, i in enumerate(ids)])
        assert wait_until(lambda: fleet.metrics.ready._value.get() == 3, 180), fleet.stats()
        grown_after = time.monotonic() - burst_at
        seen = wait_for_ids(s3_client, s3_bucket, set(ids), timeout_s=300)
        assert wait_until(lambda: len(fleet.actors) == 1, 120), fleet.stats()
        shrunk_after = time.monotonic() - burst_at
        (up_at, up_from, up), (_, down_from, down) = fleet.decisions[0], fleet.decisions[-1]
        print(f"\nburst of {len(ids)}: scale-up decided {up_at - burst_at:.1f} s after it ({up_from} -> {up.replicas}), "
              f"3 replicas ready after {grown_after:.1f} s; scale-down decided after {down.waited_s:.1f} s without lag "
              f"({down_from} -> {down.replicas}), back to 1 replica {shrunk_after:.1f} s after the burst")
        assert (up_from, up.replicas) == (1, 3) and (down_from, down.replicas) == (3, 1)
        assert up.waited_s >= 2 and down.waited_s >= 15  # the delays held: no flapping
        assert fleet.metrics.scalings.labels(direction="up")._value.get() >= 1
        assert fleet.metrics.scalings.labels(direction="down")._value.get() >= 1
        assert wait_until(lambda: committed_reaches_end(stack.kafka_bootstrap, f"g-{topic}", topic), 120)
        seen = result_ids(s3_client, s3_bucket)
    finally:
        fleet.stop()
    assert_each_once(s3_client, s3_bucket, seen, ids)


def _node_of(actor) -> str | None:
    from workers.stream.replica_health import actor_health

    return actor_health(actor).node_id

"""`RAMPLUS_KAFKA__AUTO_OFFSET_RESET` (issue 24): a partition the group never committed starts at its first
record (earliest) or at its end when the group first gets it (latest), and with latest that start is
committed at once, so a replica that dies before its first result cannot let a later end skip records."""

from __future__ import annotations

import threading

import pytest

from fleet_kit import assert_each_once, committed_reaches_end, fleet_settings, publish, publish_image_requests, request, wait_for_ids
from infra.local.kit import wait_until
from workers.stream.replica import Replica

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("reset", ["earliest", "latest"])
def test_a_new_group_starts_where_auto_offset_reset_says(stack, aws_env, tiny_model_dir, s3_client, s3_bucket, reset):
    topic, _, before = publish_image_requests(stack, s3_client, s3_bucket, f"reset-{reset}", "old", 40, images=5)
    settings = fleet_settings(stack, tiny_model_dir, s3_bucket, topic, kafka={"auto_offset_reset": reset})
    replica = Replica(settings, 0)
    thread = threading.Thread(target=replica.run, name="replica", daemon=True)
    thread.start()
    try:
        # Positioned: earliest commits as the old records are tagged, latest pins each partition's end at once.
        assert wait_until(lambda: committed_reaches_end(stack.kafka_bootstrap, settings.kafka.group_id, topic), 120, interval_s=0.5)
        after = [f"new{i:04d}" for i in range(20)]
        publish(stack.kafka_bootstrap, topic, [request(i, f"s3://{s3_bucket}/images/{n % 5:04d}.jpg") for n, i in enumerate(after)])
        wait_for_ids(s3_client, s3_bucket, set(after), 120)
        assert wait_until(lambda: committed_reaches_end(stack.kafka_bootstrap, settings.kafka.group_id, topic), 60, interval_s=0.5)
    finally:
        replica.stop_event.set()
        thread.join(60)
    seen = wait_for_ids(s3_client, s3_bucket, set(after), 10)
    assert_each_once(s3_client, s3_bucket, seen, (before if reset == "earliest" else []) + after)

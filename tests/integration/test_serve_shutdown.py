"""`ramplus serve` stopped the way Kubernetes stops it: SIGTERM mid-stream, SIGKILL a grace period later.

The driver must drain (finish what was polled, write, commit), stop its replicas, leave the consumer group
and exit 0 within the Deployment's terminationGracePeriodSeconds; a restart then loses and duplicates
nothing. The driver is a real `ramplus serve` process joining the test session's Ray cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient
from kafka.structs import TopicPartition

from fleet_kit import (
    PARTITIONS, committed_reaches_end, duplicate_report, fleet_settings, make_topics, publish, request, result_ids,
    result_lines, upload_images, wait_for_ids,
)
from infra.local.kit import wait_until
from workers.stream.fleet import Fleet

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def grace_period_s() -> int:
    docs = yaml.safe_load_all((ROOT / "infra" / "k8s" / "fleet.yaml").read_text())
    (deployment,) = [d for d in docs if d and d["kind"] == "Deployment"]
    return deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) or 0 for p in range(PARTITIONS)}
    finally:
        consumer.close(autocommit=False)


def test_sigterm_mid_stream_drains_commits_leaves_the_group_and_exits_0_and_a_restart_finishes_exactly_once(
    stack, ray_cluster, tiny_model_dir, s3_client, s3_bucket, tmp_path
):
    topic, _ = make_topics(stack.kafka_bootstrap, f"term-{uuid.uuid4().hex[:8]}")
    keys = upload_images(s3_client, s3_bucket, 20)
    ids = [f"t{i:04d}" for i in range(4000)]
    publish(stack.kafka_bootstrap, topic, [request(i, f"s3://{s3_bucket}/{keys[n % 20]}") for n, i in enumerate(ids)])
    gcs = ray_cluster.get_runtime_context().gcs_address
    settings = fleet_settings(stack, tiny_model_dir, s3_bucket, topic, max_in_flight=64, drain_timeout_s=30)
    config = tmp_path / "serve.json"
    config.write_text(settings.model_dump_json())
    env = {**os.environ, **{k: v for k, v in stack.env.items() if k.startswith("AWS_")}, "RAMPLUS_LOG__FORMAT": "json"}
    env.pop("RAMPLUS_CONFIG", None)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "ramplus"), "serve", "--config", str(config), "--ray-address", gcs,
             "--no-create-topics"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
        )
    try:
        assert wait_until(lambda: len(result_ids(s3_client, s3_bucket)) >= 200 or proc.poll() is not None, 240)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        rc = proc.wait(timeout=grace_period_s())
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_path.read_text()
    assert rc == 0, output[-3000:]
    assert "fleet.stopped" in output and "stopped on SIGTERM" in output, output[-3000:]
    assert "SIGTERM received" not in output  # Ray's own handler did not take the signal

    # every result written before the exit is committed: a restart redoes nothing of it
    offsets = committed(stack.kafka_bootstrap, settings.kafka.group_id, topic)
    lines = [r for _, r in result_lines(s3_client, s3_bucket)]
    late = [(r["source"]["partition"], r["source"]["offset"]) for r in lines if r["source"]["offset"] >= offsets[r["source"]["partition"]]]
    assert late == [], f"written but not committed: {late[:10]} (committed {offsets})"
    assert 0 < len(lines) < len(ids), f"SIGTERM was not mid-stream ({len(lines)} of {len(ids)} done in {took:.0f} s)"
    admin = KafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    try:
        assert admin.describe_groups([settings.kafka.group_id])[settings.kafka.group_id]["members"] == []
    finally:
        admin.close()

    fleet = Fleet(settings)  # the restart: the same group, topic and bucket
    fleet.start()
    try:
        seen = wait_for_ids(s3_client, s3_bucket, set(ids), timeout_s=300)
        assert wait_until(lambda: committed_reaches_end(stack.kafka_bootstrap, settings.kafka.group_id, topic), 60)
        seen = result_ids(s3_client, s3_bucket)
    finally:
        fleet.stop()
    assert set(seen) == set(ids)
    assert [i for i, n in seen.items() if n != 1] == [], duplicate_report(s3_client, s3_bucket, seen)

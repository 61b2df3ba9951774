"""Fixtures for the real local stack (infra/local/stack.py): Kafka 4.3 in KRaft mode, redis-server, s3proxy.

The stack is brought up once per session (installed the first time, which takes about a minute) and reused
when it already runs; services this session started are stopped at the end, data kept. Each test gets fresh
names (topics, buckets, key prefixes), so tests never see each other's data.

RAMPLUS_STACK_HOME (default <repo>/var/stack) and RAMPLUS_STACK_{KAFKA,REDIS,S3}_PORT choose the stack.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from infra.local import stack as stack_module


class Stack:
    """Addresses of the running stack, and stop/start for fault injection (data survives a restart)."""

    def __init__(self, module: ModuleType, config) -> None:  # noqa: ANN001
        self.module, self.config = module, config
        self.kafka_bootstrap: str = config.kafka_bootstrap
        self.redis_url: str = config.redis_url
        self.s3_endpoint: str = config.s3_endpoint
        self.env: dict[str, str] = module.env(config)
        self.s3_credentials: dict[str, str] = {
            "aws_access_key_id": config.s3_access_key,
            "aws_secret_access_key": config.s3_secret_key,
            "region_name": config.region,
        }

    def stop(self, service: str) -> None:
        self.module.stop(service, self.config)

    def start(self, service: str) -> None:
        self.module.start(service, self.config)

    def restart(self, service: str) -> None:
        self.stop(service)
        self.start(service)

    def is_ready(self, service: str) -> bool:
        return self.module.is_ready(self.config, service)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    module = stack_module
    config = module.StackConfig.from_env()
    already = {s for s in module.SERVICES if module.is_ready(config, s)}
    try:
        module.up(config)
    except module.StackError as exc:
        pytest.fail(f"the local stack did not come up (infra/local/stack.py up):\n{exc}", pytrace=False)
    yield Stack(module, config)
    started_here = [s for s in module.SERVICES if s not in already]
    if started_here:
        module.down(config, started_here)


# ------------------------------------------------------------------------------------------------ S3


@pytest.fixture(scope="session")
def s3_client(stack: Stack):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=stack.s3_endpoint, config=Config(s3={"addressing_style": "path"}), **stack.s3_credentials
    )


@pytest.fixture
def s3_bucket(s3_client) -> Iterator[str]:
    """A fresh, empty bucket; emptied and deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    yield name
    try:
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3_client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        s3_client.delete_bucket(Bucket=name)
    except Exception:  # noqa: BLE001 - cleanup only; a stopped server must not fail the test
        pass


@pytest.fixture
def aws_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The stack's credentials in the environment, where the AWS chain (and Ray workers) find them."""
    for key, value in stack.env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    return stack.env


# --------------------------------------------------------------------------------------------- Kafka


@pytest.fixture
def kafka_topic(stack: Stack) -> Iterator[Callable[..., str]]:
    """Factory: ``kafka_topic(partitions=4, prefix="t")`` creates a uniquely named topic and returns its name.

    The topic exists with all partitions led when it returns; the test's topics are deleted afterwards.
    """
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap, client_id="ramplus-tests")
    created: list[str] = []

    def make(partitions: int = 4, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        admin.create_topics([NewTopic(name, partitions, 1)])
        created.append(name)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            meta = admin.describe_topics([name])
            parts = meta[0].get("partitions", []) if meta else []
            if len(parts) == partitions and all(p.get("leader_id", -1) >= 0 for p in parts):
                return name
            time.sleep(0.1)
        raise TimeoutError(f"topic {name} has no leaders after 30 s")

    yield make
    try:
        if created and stack.is_ready("kafka"):
            admin.delete_topics(created)
    except Exception:  # noqa: BLE001 - cleanup only
        pass
    finally:
        admin.close()


# --------------------------------------------------------------------------------------------- Redis


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own; redis_client deletes its keys afterwards."""
    return f"test:{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def redis_client(stack: Stack, redis_prefix: str):
    import redis

    client = redis.Redis.from_url(stack.redis_url)
    yield client
    try:
        keys = list(client.scan_iter(match=redis_prefix + "*", count=500))
        if keys:
            client.delete(*keys)
    except Exception:  # noqa: BLE001 - cleanup only
        pass
    client.close()


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.timeout(int(os.environ.get("RAMPLUS_INTEGRATION_TIMEOUT", "600"))))


@pytest.fixture(scope="session")
def ray_head(stack):
    """The session's Ray cluster: a head node with 4 CPUs, to which tests may add nodes (`ray_nodes`)."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # Replicas inherit the environment of the processes that start them: S3 credentials go in before Ray
    # starts its nodes.
    for key, value in stack.env.items():
        if key.startswith("AWS_"):
            os.environ[key] = value
    from ray._common.utils import get_ray_address_file

    # Cluster writes its address to /tmp/ray/ray_current_cluster "for convenience", and a bare `ray.init()`
    # then joins it: the programs tests start as a user would (jobs/backfill.py, the demo, `ramplus serve`)
    # would join this session's cluster, with its environment, instead of starting their own Ray. Put the
    # file back as it was (CI saw the backfill job exit 1 when it joined another session's cluster).
    address_file = Path(get_ray_address_file(None))
    before = address_file.read_text() if address_file.exists() else None
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    if before is None:
        address_file.unlink(missing_ok=True)
    else:
        address_file.write_text(before)
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_cluster(ray_head):
    import ray

    ray.init(address=ray_head.address, namespace=f"test-{uuid.uuid4().hex[:6]}", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_nodes(ray_cluster, ray_head):
    """Extra nodes for one test (tests/ray_nodes.py); every one left is killed after it."""
    from ray_nodes import RayNodes

    nodes = RayNodes(ray_head)
    yield nodes
    nodes.remove_all()

"""Helpers for code that drives the local stack: tests, the demo, the benches. Not library code."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for metrics endpoints and servers a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.5) -> bool:
    """Poll `predicate` until it is true or `timeout_s` has passed; its last answer decides."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def local_stack(services: list[str] | None = None) -> dict[str, str]:
    """Bring the local stack up (all of it, or `services`), export its AWS_* credentials into this process
    (boto3's standard chain finds them, as in production) and return its environment: the RAMPLUS_* addresses."""
    import os

    from infra.local import stack

    config = stack.StackConfig.from_env()
    stack.up(config, services)
    env = stack.env(config)
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    return env


def dead_letters(bootstrap: str, topic: str, expected: int, timeout_s: float = 60, *, unique: bool = False) -> list[dict]:
    """The letters on a dead-letter topic, read from its start with plain kafka-python (as a user's tools
    would) until `expected` are in or `timeout_s` passed. `unique`: one per `letter_id` (the topic is
    at-least-once: a replica restarted between a send and its commit sends the letter again)."""
    import json

    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
                             group_id=None, consumer_timeout_ms=2000)
    letters: list[dict] = []
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and len(letters) < expected:
            for message in consumer:
                letter = json.loads(message.value)
                if unique and letter.get("letter_id") in seen:
                    continue
                seen.add(letter.get("letter_id"))
                letters.append(letter)
    finally:
        consumer.close()
    return letters


PARTITIONS = 4  # of a request topic made by make_topics: enough for two replicas to share


def make_topics(
    bootstrap: str, name: str, configs: dict[str, str] | None = None, *, partitions: int = PARTITIONS,
) -> tuple[str, str]:
    """A request topic (`partitions`, with topic `configs`) and its dead-letter topic `<name>.dlq`."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs or {}), NewTopic(name + ".dlq", 1, 1)])
        # Created is not yet led: a consumer that joins before every partition has a leader can be given
        # no partitions of it ("No partition metadata for topic") and wait for the next rebalance.
        def led() -> bool:
            described = admin.describe_topics([name, name + ".dlq"])
            return len(described) == 2 and all(
                t.get("error_code", 0) == 0 and len(t["partitions"]) == (partitions if t["name"] == name else 1)
                and all(p["leader_id"] >= 0 for p in t["partitions"])
                for t in described
            )
        if not wait_until(led, 30, interval_s=0.1):
            raise RuntimeError(f"topics {name} and {name}.dlq were created but have no leaders after 30 s")
    finally:
        admin.close()
    return name, name + ".dlq"

"""Fixtures for the real local stack (infra/local/stack.py): Kafka in KRaft mode, redis-server, s3proxy.

The stack is started once per session (installed the first time) and reused when it already runs; a
session that started it stops it at the end. Each test gets fresh names (topics, buckets, key prefixes).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_stack_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ramplus_local_stack", ROOT / "infra" / "local" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


class Stack:
    def __init__(self, module: ModuleType, config) -> None:  # noqa: ANN001
        self._m, self.config = module, config
        self.kafka_bootstrap = f"127.0.0.1:{config.kafka_port}"
        self.redis_url = f"redis://127.0.0.1:{config.redis_port}/0"
        self.s3_endpoint = f"http://127.0.0.1:{config.s3_port}"
        self.env = module.env(config)
        self.s3_credentials = {
            "aws_access_key_id": config.s3_identity, "aws_secret_access_key": config.s3_credential, "region_name": "us-east-1",
        }

    def stop(self, service: str) -> None:
        self._m.stop(self.config, service)

    def start(self, service: str) -> None:
        self._m.start(self.config, service)

    def is_ready(self, service: str) -> bool:
        return self._m.is_ready(self.config, service)


@pytest.fixture(scope="session")
def stack() -> Stack:
    module = _load_stack_module()
    config = module.StackConfig.from_env()
    already = [s for s in module.SERVICES if module.running_pid(config, s) is not None and module.is_ready(config, s)]
    module.up(config)
    yield Stack(module, config)
    started = [s for s in module.SERVICES if s not in already]
    module.down(config, started)


@pytest.fixture(scope="session")
def s3_client(stack: Stack):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=stack.s3_endpoint, config=Config(s3={"addressing_style": "path"}), **stack.s3_credentials)


@pytest.fixture
def s3_bucket(s3_client) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def aws_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The stack's credentials in the environment, where the AWS chain (and Ray workers) find them."""
    for key, value in stack.env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    return stack.env


@pytest.fixture
def redis_client(stack: Stack):
    import redis

    client = redis.Redis.from_url(stack.redis_url)
    yield client
    client.close()


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = str(Path(__file__).parent)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.timeout(int(os.environ.get("RAMPLUS_INTEGRATION_TIMEOUT", "600"))))

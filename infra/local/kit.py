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

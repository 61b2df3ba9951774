"""SIGTERM and SIGINT for a long-running driver: the first asks for a clean stop, a second one exits at once.

Kubernetes sends SIGTERM on every rollout and SIGKILL `terminationGracePeriodSeconds` later; an operator
presses Ctrl-C. The first signal only sets an event that the driver's loop watches (a handler that raised
could land anywhere, and Python drops exceptions raised in some places, e.g. a `__del__`); the driver then
drains, commits and exits 0. A second signal means "now": exit with 128 + its number, leaving what is
uncommitted to be redone.

`ray.init` installs SIGTERM handlers of its own (a Python one that exits, and the core worker's, which
aborts the process): call `install()` again after it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

import structlog

log = structlog.get_logger("ramplus.shutdown")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ShutdownSignals:
    def __init__(self, stop: threading.Event | None = None, *, exit_now: Callable[[int], None] = os._exit) -> None:
        self.stop = stop or threading.Event()
        self.received: str | None = None
        self._exit_now = exit_now

    def install(self) -> None:
        """(Re)install the handlers; only the main thread can."""
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            log.warning("shutdown.now", signal=name, detail="second signal: exiting without draining")
            self._exit_now(128 + signum)
            return
        self.received = name
        log.info("shutdown.requested", signal=name, hint="draining; send it again to exit at once")
        self.stop.set()

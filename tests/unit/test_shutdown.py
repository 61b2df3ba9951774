"""The driver's signals: the first asks for a clean stop, the second exits at once, and Ray cannot take them."""

from __future__ import annotations

import os
import signal

import pytest

from workers.stream.shutdown import ShutdownSignals


@pytest.fixture
def restore_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_the_first_signal_asks_to_stop_and_the_second_exits_at_once(restore_handlers):
    exits: list[int] = []
    signals = ShutdownSignals(exit_now=exits.append)
    signals.install()
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.stop.wait(5) and signals.received == "SIGTERM" and exits == []
    os.kill(os.getpid(), signal.SIGINT)
    assert exits == [128 + signal.SIGINT]


def test_installing_again_takes_the_signals_back_from_whoever_replaced_them(restore_handlers):
    signals = ShutdownSignals(exit_now=lambda code: None)
    signals.install()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(15)))  # what ray.init does
    signals.install()
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.stop.wait(5)

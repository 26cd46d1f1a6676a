"""StopRequest: the first signal is recorded, a second one acts as if it were not installed."""

from __future__ import annotations

import signal
import threading

import pytest

from calibrated_lm.training.stop import StopRequest


def test_first_sigint_is_recorded_second_reaches_the_previous_handler():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.requested()
        signal.raise_signal(signal.SIGINT)
        assert stop.requested() and stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # Python's own SIGINT handler
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_requested_is_summed_over_ranks():
    stop = StopRequest()
    assert not stop.requested(lambda v: v + 0.0)
    assert stop.requested(lambda v: v + 1.0)  # another rank was signalled
    stop.request()
    assert stop.requested(lambda v: v)


def test_inert_outside_the_main_thread():
    seen = {}

    def body():
        with StopRequest() as stop:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["requested"] = stop.requested()

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"handler": signal.getsignal(signal.SIGTERM), "requested": False}


def test_an_ignored_signal_stays_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequest() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            assert not stop.requested()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)

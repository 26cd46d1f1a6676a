"""StopRequest: the first signal is recorded; a repeat within the window is the same stop; a
later second one acts as if it were not installed."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import pytest

from calibrated_lm.training import stop as stop_mod
from calibrated_lm.training.stop import StopRequest


def test_first_sigint_is_recorded_second_reaches_the_previous_handler(monkeypatch):
    monkeypatch.setattr(stop_mod, "REPEAT_WINDOW_S", 0.0)  # every repeat counts as a second stop
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


def test_a_repeat_within_the_window_is_the_same_stop(monkeypatch):
    # GNU timeout signals the command and then its process group: the same SIGTERM twice,
    # microseconds apart. The second must not end the process while the checkpoint is written.
    clock = iter([100.0, 100.0002, 101.5])
    monkeypatch.setattr(stop_mod, "_clock", lambda: next(clock))
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)  # at 100.0: recorded
        signal.raise_signal(signal.SIGINT)  # at 100.0002: the same stop again, ignored
        assert stop.requested() and stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # at 101.5: a person's second Ctrl-C
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_timeout_delivers_its_signal_twice_and_the_run_survives_it(tmp_path):
    # The mechanism, end to end: GNU timeout calls kill(child, SIGTERM), then kill(0, SIGTERM).
    # Where the child handled the first before the second arrived, it gets the signal twice.
    # The child makes that order certain (the group kill after the first is handled) and must
    # still finish its "checkpoint".
    script = tmp_path / "child.py"
    script.write_text(
        "import os, signal, sys\n"
        "from calibrated_lm.training.stop import StopRequest\n"
        "with StopRequest() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    assert stop.requested()\n"
        "    os.killpg(0, signal.SIGTERM)  # timeout's second delivery, to the group\n"
        "    print('checkpoint written', flush=True)\n"
    )
    # A new session: the group kill reaches only the child, not pytest.
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60,
        start_new_session=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "checkpoint written"


def test_a_repeat_that_re_enters_the_handler_while_it_records_the_first_is_folded_in(
    monkeypatch,
):
    # The group's signal can land while the handler of the first is still running: the window
    # must already be open when the stop is visible as recorded.
    with StopRequest() as stop:
        fired = []

        def clock_that_is_interrupted() -> float:
            if not fired:
                fired.append(1)
                signal.raise_signal(signal.SIGINT)  # re-enters _handle mid-record
            return 100.0

        monkeypatch.setattr(stop_mod, "_clock", clock_that_is_interrupted)
        signal.raise_signal(signal.SIGINT)
        assert stop.requested() and fired == [1]


def test_a_signal_soon_after_request_is_the_same_stop(monkeypatch):
    monkeypatch.setattr(stop_mod, "_clock", lambda: 5.0)
    with StopRequest() as stop:
        stop.request(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # inside the window of the request: ignored
        assert stop.requested()

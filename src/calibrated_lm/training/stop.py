"""Stop a training run on SIGTERM/SIGINT at the end of the current step, with a checkpoint.

Schedulers (``timeout``, Slurm's pre-emption, ``kill``) end a job with SIGTERM, and an
interactive user with Ctrl-C. Python's defaults end the process at once and lose every step
since the last periodic checkpoint. :class:`StopRequest` instead records the signal; the loop
asks :meth:`StopRequest.requested` after each optimizer step, writes a checkpoint and raises
:class:`TrainingStopped`, so ``--resume`` continues from that very step. A second signal while
the checkpoint is being written falls back to the previous handler (an impatient second Ctrl-C
still ends the process), unless it comes within ``REPEAT_WINDOW_S`` of the first (either
signal after either): one stop often arrives twice. GNU ``timeout`` sends its signal to the
command and then to the whole process group, so the command receives it twice, microseconds
apart; where Python ran the handler for the first before the second arrived, the second used to
end the run at once, before its stop checkpoint and without a line of output. That was
suspected for session 25's first claim-3 chunk
(``experiments/results/sft_claim3/device_logs/commands.txt``) and is not confirmed: on the CPU
the two deliveries coalesce into one handler call, with or without this window
(``tests/test_training_loop.py``, the ``gnu-timeout`` case). The window is timed when the
handler runs, which Python delays while the main thread is inside a long C call; a repeat that
arrives during such a call is folded into the first by Python itself.

In a distributed run the signal may reach only some ranks: the flag is summed over ranks, so
all stop at the same step (a collective per step; a float, negligible beside the step).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from calibrated_lm.errors import UserError

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A repeat within this many seconds of the first signal is the same stop delivered twice (a
# process-group kill), not a user's second Ctrl-C: a person's repeat takes longer.
REPEAT_WINDOW_S = 1.0
_clock = time.monotonic  # tests replace it


class TrainingStopped(UserError):
    """Raised after a stop request once the checkpoint of ``step`` is on disk."""

    def __init__(self, message: str, step: int, signum: int) -> None:
        super().__init__(message)
        self.step = step
        self.signum = signum


class StopRequest:
    """Context manager: while active, SIGTERM and SIGINT (unless ignored) set a flag instead of
    ending the process. Handlers can only be installed from the main thread; elsewhere (a
    trainer run in a worker thread) it is inert and :meth:`requested` is False unless
    :meth:`request` is called."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0  # _clock() at the first signal
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                if signal.getsignal(s) is signal.SIG_IGN:
                    continue  # ignored on purpose (nohup, a shell's background job): stays so
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and _clock() - self._first_at < REPEAT_WINDOW_S:
            return  # the first stop delivered again (see the module's docstring)
        if self.signum is not None:  # a later second signal: behave as if we were not here
            previous = self._previous.get(signum, signal.SIG_DFL)
            self.__exit__()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.raise_signal(signum)
            return
        self._record(signum)

    def _record(self, signum: int) -> None:
        # The time first: a repeat that re-enters the handler between the two assignments must
        # find the window already open, not a recorded signal at time 0 (a "second" stop).
        self._first_at = _clock()
        self.signum = signum

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as a signal would (used by tests and by embedding code)."""
        self._record(signum)

    def requested(self, all_reduce: Callable[[float], float] | None = None) -> bool:
        """Whether any rank was asked to stop (``all_reduce`` sums a float over ranks)."""
        local = 1.0 if self.signum is not None else 0.0
        return (all_reduce(local) if all_reduce is not None else local) > 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a stop request"

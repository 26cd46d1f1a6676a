"""launcher.on_every_rank: a UserError on one rank stops every rank at the same point, and
they leave the process group together (two gloo ranks on the CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from calibrated_lm.errors import UserError
from calibrated_lm.launcher import StoppedTogether, on_every_rank

SCRIPT = """
import sys
import torch.distributed as dist
from calibrated_lm.errors import UserError
from calibrated_lm.launcher import on_every_rank, own_process_group

def step():
    if dist.get_rank() == int(sys.argv[1]):
        raise UserError("cannot read this rank's file")
    return "read"

try:
    with own_process_group():
        dist.init_process_group("gloo")
        print("result:", on_every_rank(step))
except UserError as exc:
    print(type(exc).__name__, "|", exc, "| group alive:", dist.is_initialized())
    sys.exit(3)
print("finished | group alive:", dist.is_initialized())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(failing: int) -> list[tuple[int, str]]:
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT, str(failing)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outs)]


def test_one_process_calls_fn_and_keeps_its_error() -> None:
    assert on_every_rank(lambda: 7) == 7

    def fail() -> None:
        raise UserError("plain")

    with pytest.raises(UserError, match="plain") as info:
        on_every_rank(fail)
    assert not isinstance(info.value, StoppedTogether)


@pytest.mark.xdist_group("ranks")
def test_an_error_on_one_rank_stops_both_and_they_leave_together() -> None:
    (rc0, out0), (rc1, out1) = _two_ranks(failing=1)
    # Rank 0's step succeeded, yet it stops too, naming the rank that failed.
    assert rc0 == 3 and "StoppedTogether | rank 1: cannot read" in out0, out0[-2000:]
    assert rc1 == 3 and "StoppedTogether | cannot read this rank's file" in out1, out1[-2000:]
    assert "group alive: False" in out0 and "group alive: False" in out1
    for rc, out in _two_ranks(failing=-1):  # no rank fails: each gets its own result
        assert rc == 0 and "result: read" in out and "group alive: False" in out, out[-2000:]

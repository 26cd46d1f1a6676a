"""Sharded eval: two gloo ranks on CPU split the questions and rank 0 merges, matching one
process exactly (item set) and numerically (scores)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_tiny_lm import build_tiny_lm

from calibrated_lm.evaluation.distributed import DistInfo, merge_rank_files, rank_file, shard
from calibrated_lm.evaluation.runner import EvalConfig, run_eval

SCRIPT = """
import sys
from pathlib import Path
from calibrated_lm.evaluation.runner import EvalConfig, run_eval
run_eval(EvalConfig(model=sys.argv[1], tasks=[sys.argv[2]], output=Path(sys.argv[3]),
                    bootstrap=20, progress=False, device="cpu", chat_template="off",
                    batch_size=3))
"""


def test_shard_is_a_partition() -> None:
    items = list(range(11))
    parts = [shard(items, DistInfo(rank=r, world=3, local_rank=r)) for r in range(3)]
    assert sorted(x for p in parts for x in p) == items
    assert parts[1] == [1, 4, 7, 10]


def test_merge_skips_duplicates_and_partial_lines(tmp_path: Path) -> None:
    def rec(i: str) -> str:  # a journal holds whole records: the reader checks each one
        return json.dumps({"task": "t", "id": i, "choice_logprobs": [-1.0, -2.0], "label": 0})

    main = tmp_path / "samples.jsonl"
    main.write_text(rec("a") + "\n")
    rank_file(main, 0).write_text(rec("a") + "\n" + rec("b") + "\n")
    rank_file(main, 1).write_text(rec("c") + "\n" + '{"task": "t", "i')
    assert merge_rank_files(main) == 2
    ids = [json.loads(x)["id"] for x in main.read_text().splitlines()]
    assert ids == ["a", "b", "c"]
    assert not rank_file(main, 0).exists() and not rank_file(main, 1).exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Multi-process ranks: one xdist worker runs all of them (`--dist loadgroup`), so two rank sets
# never share the two cores at once.
@pytest.mark.xdist_group("ranks")
@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    model = build_tiny_lm(tmp_path / "model")
    task = tmp_path / "quiz.jsonl"
    lines = [
        json.dumps(
            {
                "context": f"Question {i}:\nAnswer:",
                "choices": ["water", "the sun", "Paris"][: 2 + i % 2],
                "label": i % 2,
                "id": f"q{i}",
            }
        )
        for i in range(13)
    ]
    task.write_text("\n".join(lines) + "\n")
    single = tmp_path / "single"
    run_eval(
        EvalConfig(
            model=str(model),
            tasks=[str(task)],
            output=single,
            bootstrap=20,
            progress=False,
            device="cpu",
            chat_template="off",
            batch_size=3,
        )
    )
    multi = tmp_path / "multi"
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", SCRIPT, str(model), str(task), str(multi)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-2000:]
    one = {r["id"]: r for r in map(json.loads, (single / "samples.jsonl").read_text().splitlines())}
    two = [json.loads(x) for x in (multi / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in two) == sorted(one)  # every item once, none twice
    for r in two:
        assert r["choice_logprobs"] == pytest.approx(one[r["id"]]["choice_logprobs"], abs=2e-5)
    assert not list(multi.glob("samples.rank*.jsonl"))
    s1 = json.loads((single / "summary.json").read_text())["tasks"]["quiz"]
    s2 = json.loads((multi / "summary.json").read_text())
    assert s2["tasks"]["quiz"]["ece"] == pytest.approx(s1["ece"], abs=1e-6)
    assert s2["protocol"]["world_size"] == 2


NO_WEIGHTS_SCRIPT = """
import sys
from pathlib import Path
from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.runner import EvalConfig, run_eval
from calibrated_lm.models import loading

def fail(opened):
    raise UserError("weights unreadable in this test")

loading.load_weights = fail
import torch.distributed as dist
try:
    run_eval(EvalConfig(model=sys.argv[1], tasks=[sys.argv[2]], output=Path(sys.argv[3]),
                        bootstrap=20, progress=False, device="cpu", chat_template="off",
                        batch_size=3))
except UserError as exc:
    print("stopped:", exc, "| group alive:", dist.is_initialized())
    sys.exit(3)
print("finished | group alive:", dist.is_initialized())
"""


def _two_ranks(script: str, *args: str) -> list[tuple[int, str]]:
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", script, *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outs)]


@pytest.mark.xdist_group("ranks")
def test_two_ranks_without_weights_rerun_or_stop_together(tmp_path: Path) -> None:
    """A rerun with nothing left reads no weights on any rank; with a question left and weights
    that cannot be read, every rank stops at the same point (none waits at a barrier) and the
    journal is as it was."""
    model = build_tiny_lm(tmp_path / "model")
    task = tmp_path / "quiz.jsonl"
    rows = [{"context": f"Question {i}:\nAnswer:", "choices": ["water", "the sun"],
             "label": i % 2, "id": f"q{i}"} for i in range(5)]  # fmt: skip
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    run_eval(EvalConfig(model=str(model), tasks=[str(task)], output=out, bootstrap=20,
                        progress=False, device="cpu", chat_template="off", batch_size=3))  # fmt: skip
    before = (out / "samples.jsonl").read_bytes()
    # Each rank leaves the process group before it exits, after a finished run and after a
    # stop alike, and after a barrier in both (launcher.on_every_rank): a gloo group alive at
    # exit once aborted a rank that had stopped cleanly (rc -6, "terminate called without an
    # active exception"), and later, rarely, a rank that left it alone after its peer.
    for rc, text in _two_ranks(NO_WEIGHTS_SCRIPT, str(model), str(task), str(out)):
        assert rc == 0, text[-2000:]  # nothing left: the failing load_weights is never called
        assert "finished | group alive: False" in text, text[-2000:]
    rows[2]["context"] += " (edited)"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = _two_ranks(NO_WEIGHTS_SCRIPT, str(model), str(task), str(out))
    for rc, text in results:
        assert rc == 3 and "weights unreadable" in text, text[-2000:]
        assert "group alive: False" in text, text[-2000:]
    assert (out / "samples.jsonl").read_bytes() == before

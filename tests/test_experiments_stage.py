"""experiments/claim_stage.sh (claim 2 and 3's device staging) up to its plan and checks.

With STAGE_PLAN_ONLY=1 it restores the committed results into a temporary work folder, plans
the profile and checks that no run with committed evaluations would be trained again; the
next session's first training units are what its device procedure assumes.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers_results import results_left_out

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "claim_stage.sh"

pytestmark = [
    pytest.mark.skipif(
        not (ROOT / ".venv" / "bin" / "python").exists(), reason="the script runs .venv's python"
    ),
    # A device call's slim tree (experiments/device_tree.sh slim) leaves the results out.
    pytest.mark.skipif(
        results_left_out("sft_control"),
        reason="the committed results are not in this tree",
    ),
]


def _stage(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "STAGE_PLAN_ONLY": "1"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300
    )


def _first_pending(stdout: str) -> list[str]:
    tail = stdout.split("first pending training units:")[1]
    return re.findall(r"train/(\S+)\s+pending", tail)


def test_claim2_restores_every_committed_run_and_trains_the_next_ones() -> None:
    done = {  # every claim-2 run with a committed evaluation
        p.name.split("__")[0]
        for p in (ROOT / "experiments/results/sft_claim2/records/evals").iterdir()
    }
    res = _stage("claim2")
    assert res.returncode == 0, res.stderr
    restored = res.stdout.split("restored runs:")[1].splitlines()[0].split()
    assert set(restored) == done | {"sft_lr8e-05_ep3_eps0_s1"}
    pending = _first_pending(res.stdout)
    assert not set(pending) & set(restored)
    # Run order: seed 1's eps 0.05, 0.1, 0.2, then seed 2's four, then seed 3's.
    order = [f"sft_lr8e-05_ep3_eps{e}_s{s}" for s in (1, 2, 3) for e in ("0", "0.05", "0.1", "0.2")]
    todo = [r for r in order if r not in restored]
    assert pending == todo[: len(pending)] and bool(pending) == bool(todo)  # none once all ran


def test_claim3_restores_the_control_base_and_starts_with_the_smallest_subset() -> None:
    res = _stage("claim3")
    assert res.returncode == 0, res.stderr
    # The script lists the units not done: the control's base evaluations were restored.
    assert not re.search(r"^eval/base/(trained|plain) ", res.stdout, re.M)
    # The base under each subset: restored once committed (session 14), pending before.
    committed = ROOT / "experiments/results/sft_claim3/records/evals"
    for v in (24576, 65536):
        for fmt in ("trained", "plain"):
            done = (committed / f"base_V{v}__{fmt}" / "done.json").is_file()
            assert (f"eval/base_V{v}/{fmt} " in res.stdout) != done, (v, fmt)
    # The profile's order starts with the smallest subset, seed by seed; the runs whose
    # evaluations are committed (seed 1's, session 21) are restored, not trained again.
    order = [
        f"sft_lr8e-05_ep3_eps{eps}_V{v}_s{seed}"
        for v in (24576, 65536)
        for seed in (1, 2)
        for eps in ("0", "0.1")
    ]
    trained = {r for r in order if (committed / f"{r}__trained" / "done.json").is_file()}
    assert _first_pending(res.stdout)[:2] == [r for r in order if r not in trained][:2]
    assert not trained & set(_first_pending(res.stdout))


def test_an_unknown_profile_is_refused() -> None:
    res = _stage("claim9")
    assert res.returncode == 2 and "claim2 or claim3" in res.stderr


def test_claim3_done_only_writes_the_finished_units_and_no_pieces(tmp_path) -> None:
    import tarfile

    env = {**os.environ, "STAGE_DONE_ONLY": "1"}
    res = subprocess.run(
        ["bash", str(SCRIPT), "claim3", str(tmp_path / "c0")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "c0").iterdir()) == ["done_units_claim3.tgz"]
    with tarfile.open(tmp_path / "c0" / "done_units_claim3.tgz") as tar:
        names = set(tar.getnames())
    # The control's base evaluations travel; sft_device.sh pair restores them for claim 3.
    assert {"./evals/base__trained/done.json", "./evals/base__plain/done.json"} <= names


DEVICE = ROOT / "experiments" / "sft_device.sh"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pair", "60", "claim2", "claim2"], "the two profiles must differ"),
        (["pair", "60", "claim2", "claim3"], "done_units_claim3.tgz is missing"),
    ],
)
def test_device_pair_refuses_before_touching_the_machine(tmp_path, args, message) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "OUT": str(tmp_path / "out")}
    res = subprocess.run(
        ["bash", str(DEVICE), *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2 and message in res.stderr
    assert not (tmp_path / "out").exists()


def _pair(
    tmp_path: Path,
    fail: str | None = None,
    code: int = 1,
    smi: str = "FAKE GPU, 1 MiB",
    args: tuple[str, ...] = ("pair", "100", "claim2", "claim3"),
    extra_env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `sft_device.sh ARGS` (by default `pair 100 claim2 claim3`) with stand-ins for
    nvidia-smi (which prints ``smi``) and python3 (its `run` of profile ``fail`` exits
    ``code``); returns the result and the paths used."""
    import tarfile

    home, out, bin_ = tmp_path / "home", tmp_path / "out", tmp_path / "bin"
    stash = home / "sft_stash"
    for d in (stash, home / "sft_site", home / "sft_data" / "toks", out, bin_):
        d.mkdir(parents=True)
    (home / "sft_site" / ".gemma").touch()  # installed by an earlier `prep`
    for name, marker in (("done_units.tgz", "from_a"), ("done_units_claim3.tgz", "from_b")):
        src = tmp_path / marker
        src.mkdir()
        (src / f"{marker}.txt").write_text(marker)
        with tarfile.open(stash / name, "w:gz") as tar:
            tar.add(src, arcname=".")
    (bin_ / "nvidia-smi").write_text(f"#!/bin/sh\necho '{smi}'\n")
    # python3 stand-in: records each call's arguments; `bundle` writes its --out file.
    (bin_ / "python3").write_text(
        "#!/bin/sh\n"
        'echo "$@" >> "$CALLS"\n'
        f'case "$*" in *"--profile {fail} "*) echo "Traceback: boom"; exit {code};; esac\n'
        'case "$2" in bundle) while [ $# -gt 0 ]; do [ "$1" = --out ] && echo x > "$2"; '
        "shift; done;; esac\n"
    )
    for f in bin_.iterdir():
        f.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {
        **os.environ,
        "HOME": str(home),
        "OUT": str(out),
        "CALLS": str(calls),
        "PATH": f"{bin_}:{os.environ['PATH']}",
        **(extra_env or {}),
    }
    res = subprocess.run(
        ["bash", str(DEVICE), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    return res, {"home": home, "out": out, "calls": calls}


def test_device_pair_runs_each_profile_in_its_own_work_folder(tmp_path) -> None:
    """`pair` with stand-ins for nvidia-smi and python3: the plumbing only (work folders, each
    profile's finished units restored, GPU share, what comes back under $OUT)."""
    res, p = _pair(tmp_path)
    home, out, calls = p["home"], p["out"], p["calls"]
    assert res.returncode == 0, res.stderr
    assert (home / "sft_work" / "from_a.txt").exists()
    assert (home / "sft_work_claim3" / "from_b.txt").exists()
    assert not (home / "sft_work" / "from_b.txt").exists()
    runs = [c for c in calls.read_text().splitlines() if " run " in f" {c} "]
    assert len(runs) == 2
    for profile, work in (("claim2", "sft_work"), ("claim3", "sft_work_claim3")):
        (line,) = [c for c in runs if f"--profile {profile} " in c]
        assert f"--work {home / work} " in line and "--gpu-memory-fraction 0.48" in line
    back = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert back == [
        "claim2/gpu_use.txt",
        "claim2/run_log.txt",
        "claim2/run_log_w1.txt",
        "claim2/sft_results.tgz",
        "claim3/run_log.txt",
        "claim3/run_log_w1.txt",
        "claim3/sft_results.tgz",
    ]
    assert "==== claim2" in res.stdout and "==== claim3" in res.stdout


def test_device_pair_fails_when_one_profile_fails_and_keeps_the_other(tmp_path) -> None:
    res, p = _pair(tmp_path, fail="claim3")
    assert res.returncode == 1
    assert "pair: claim2 exit 0, claim3 exit" in res.stdout
    assert (p["out"] / "claim2" / "sft_results.tgz").exists()
    assert "Traceback" in (p["out"] / "claim3" / "run_log.txt").read_text()


def test_device_pair_takes_a_chunk_stopped_by_its_timeout_as_normal(tmp_path) -> None:
    # A worker whose training stopped cleanly at the chunk's SIGTERM exits 0; 124 (a worker's
    # own) is accepted too: neither is a failure.
    res, _ = _pair(tmp_path, fail="claim3", code=124)
    assert res.returncode == 0, res.stdout


def test_device_run_flags_a_worker_killed_by_the_chunks_sigterm(tmp_path) -> None:
    # 143: the SIGTERM ended the worker before its stop checkpoint (session 25's first chunk).
    res, p = _pair(tmp_path, fail="claim3", code=143, args=("run", "100", "claim3"))
    assert res.returncode == 1
    log = (p["out"] / "run_log.txt").read_text()
    assert "worker 1 exit status: 143: killed by the chunk's SIGTERM" in log
    assert (p["out"] / "sft_results.tgz").exists()  # the bundle still comes back


@pytest.mark.parametrize(("left", "expect"), [(200, "155"), (1000, "500")])
def test_device_run_ends_its_chunk_before_the_calls_deadline(tmp_path, left, expect) -> None:
    """SFT_CALL_END caps `run 500` to the call's time left less 45 s (the stop checkpoint and
    the bundle), and leaves it alone when the call has room; the worker's --time-limit is 40 s
    under the cap. Session 26: `run 520` after 75 s of stash and prep in a 595 s call lost its
    stop checkpoint to the device tool's kill."""
    import time

    end = str(int(time.time()) + left)
    res, p = _pair(tmp_path, args=("run", "500", "claim3"), extra_env={"SFT_CALL_END": end})
    assert res.returncode == 0, res.stderr
    (line,) = [c for c in p["calls"].read_text().splitlines() if " run " in f" {c} "]
    # A second may pass between setting the deadline and reading the clock.
    words = line.split()
    got = int(words[words.index("--time-limit") + 1])
    assert int(expect) - 40 - 2 <= got <= int(expect) - 40, line
    log = (p["out"] / "run_log.txt").read_text()
    assert ("SECONDS cut from 500" in log) == (left < 500)


def test_device_run_refuses_a_chunk_the_calls_deadline_leaves_no_room_for(tmp_path) -> None:
    import time

    end = str(int(time.time()) + 80)
    res, p = _pair(tmp_path, args=("run", "500", "claim3"), extra_env={"SFT_CALL_END": end})
    assert res.returncode == 2 and "too little for a chunk" in res.stderr
    assert not p["calls"].exists()  # nothing installed or run


@pytest.mark.parametrize(("mib", "fits"), [("81559", False), ("143771", True)])
def test_device_pair_refuses_when_two_runs_do_not_fit_the_gpu(tmp_path, mib, fits) -> None:
    """Session 21: two claim-3 workers at half an H100 (80 GB) ran out of memory at step 2.
    `pair` must refuse on such a GPU before restoring or running anything; an H200 runs both."""
    res, p = _pair(tmp_path, smi=mib)
    if fits:
        assert res.returncode == 0, res.stderr
        assert (p["home"] / "sft_work_claim3" / "from_b.txt").exists()
    else:
        assert res.returncode == 2 and "two runs do not fit" in res.stderr
        assert not p["calls"].exists()  # python3 never ran: no install, no run
        assert not (p["home"] / "sft_work").exists()


@pytest.mark.parametrize(("mib", "workers"), [("81559", 1), ("143771", 2)])
def test_device_run_lowers_the_workers_to_what_the_gpu_holds(tmp_path, mib, workers) -> None:
    """`run 100 claim3 2`: on an H100's 81,559 MiB only one claim-3 worker fits (session 21's
    out-of-memory errors), so one runs, with the whole GPU, and the note says so on stderr and
    in run_log.txt; an H200 runs both, each on its share."""
    res, p = _pair(tmp_path, smi=mib, args=("run", "100", "claim3", "2"))
    assert res.returncode == 0, res.stderr
    runs = [c for c in p["calls"].read_text().splitlines() if " run " in f" {c} "]
    assert len(runs) == workers
    assert all("--profile claim3 " in c for c in runs)
    log = (p["out"] / "run_log.txt").read_text()
    if workers == 1:
        assert "2 workers need ~46080 MiB each" in res.stderr and "running 1" in log
        assert not any("--gpu-memory-fraction" in c for c in runs)
        assert sorted(f.name for f in p["out"].glob("run_log_w*.txt")) == ["run_log_w1.txt"]
    else:
        assert "running" not in res.stderr + log
        # The share itself comes from python3, a stand-in here: only its presence is checked.
        assert all("--gpu-memory-fraction" in c for c in runs)

"""benchmarks/memory_peak.py: replaying an allocator trace finds the peak and what is alive
there (synthetic traces in the layout of torch.cuda.memory._snapshot()'s device_traces)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import memory_peak as mp  # noqa: E402

MIB = 2**20


def _ev(action: str, addr: int, size_mib: float, where: str = "") -> dict:
    frames = [
        {"filename": "/usr/lib/python3/site-packages/torch/_tensor.py", "line": 1, "name": "x"},
        {"filename": f"/w/src/calibrated_lm/{where}.py", "line": 7, "name": where},
    ]
    return {"action": action, "addr": addr, "size": int(size_mib * MIB), "frames": frames}


def test_the_peak_and_its_live_blocks_are_found():
    trace = [
        _ev("alloc", 1, 100, "acts"),
        _ev("alloc", 2, 300, "grad_w"),
        {"action": "segment_alloc", "addr": 9, "size": 10**9},  # maps memory, allocates none
        _ev("alloc", 3, 600, "block"),  # peak here: 1,000 MiB
        _ev("free_requested", 3, 600),  # not yet free
        _ev("free_completed", 3, 600, "block"),
        _ev("alloc", 4, 500, "fp32_copy"),  # 900 MiB: below the peak
        _ev("free_completed", 1, 100),
    ]
    peak = mp.replay(trace)
    assert peak.peak_bytes == 1000 * MIB and peak.event == 3
    assert [s // MIB for s, _ in peak.live] == [600, 300, 100]
    # Only the kept frames (this project, not torch internals) name a block.
    assert peak.live[0][1] == ["calibrated_lm/block.py:7 block"]
    text = mp.report("v", peak, baseline=2 * 2**30, top=2)
    assert "peak 2.977 GiB" in text and "1,000.0 MiB allocated in the step" in text
    assert "100.0 MiB  in 1 smaller blocks" in text


def test_blocks_freed_from_before_the_recording_and_sites_summed():
    # A free of a block allocated before recording began lowers the count below 0.
    trace = [_ev("free_completed", 5, 50), _ev("alloc", 1, 20, "a"), _ev("alloc", 2, 20, "a")]
    peak = mp.replay(trace)
    assert peak.peak_bytes == 0 and peak.event == -1 and peak.live == []
    trace = [_ev("alloc", 1, 20, "a"), _ev("alloc", 2, 30, "a"), _ev("alloc", 3, 40, "b")]
    sites = mp.summed_by_site(mp.replay(trace).live)
    assert [(b // MIB, site) for b, site in sites] == [
        (50, "calibrated_lm/a.py:7 a"),
        (40, "calibrated_lm/b.py:7 b"),
    ]

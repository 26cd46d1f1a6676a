"""What is alive at a step's CUDA memory peak, from the allocator's recorded history.

``torch.cuda.memory._record_memory_history()`` logs every allocation and free with its Python
stack; ``torch.cuda.memory._snapshot()["device_traces"][device]`` is that log. Replaying it
gives the allocated bytes after each event (on top of ``baseline``, what was allocated when
recording began), the event at which they peak, and the blocks alive at that moment. Each
block is reported with its size and the innermost stack frames from the files that matter
here (this project, TRL, transformers, torch.autograd), so two variants' peaks can be told
apart line by line (benchmarks/bench_trl_step.py --memory DIR).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Frames from these paths name where a block came from; the rest (torch internals) do not.
KEEP_FRAMES = ("calibrated_lm", "trl/", "transformers/", "torch/autograd", "bench_")


@dataclass
class Peak:
    """The replayed peak: bytes above the baseline, the event index, and the live blocks."""

    peak_bytes: int
    event: int
    live: list[tuple[int, list[str]]] = field(default_factory=list)  # (size, frames), largest first


def _frames(entry: dict[str, Any], depth: int) -> list[str]:
    out = []
    for fr in entry.get("frames") or []:
        name = str(fr.get("filename", ""))
        if any(k in name for k in KEEP_FRAMES):
            short = name.split("site-packages/")[-1].split("/src/")[-1]
            out.append(f"{short}:{fr.get('line')} {fr.get('name')}")
            if len(out) == depth:
                break
    return out


def replay(trace: Sequence[dict[str, Any]], depth: int = 3) -> Peak:
    """Replay ``trace`` (allocator events: ``action`` "alloc" or "free_completed", ``addr``,
    ``size``, ``frames``); other actions (segment maps, free requests) change no allocated
    byte. Blocks allocated before recording began are not in the trace: a free of one lowers
    the count below 0 and is counted."""
    cur = best = 0
    best_at = -1
    for i, e in enumerate(trace):
        act = e.get("action")
        if act == "alloc":
            cur += int(e["size"])
        elif act == "free_completed":
            cur -= int(e["size"])
        else:
            continue
        if cur > best:
            best, best_at = cur, i
    live: dict[int, dict[str, Any]] = {}
    for e in trace[: best_at + 1]:
        act = e.get("action")
        if act == "alloc":
            live[int(e["addr"])] = e
        elif act == "free_completed":
            live.pop(int(e["addr"]), None)
    blocks = sorted(((int(e["size"]), _frames(e, depth)) for e in live.values()), reverse=True)
    return Peak(peak_bytes=best, event=best_at, live=blocks)


def report(name: str, peak: Peak, baseline: int, top: int = 12) -> str:
    """A text block: the peak above the baseline and the largest blocks alive there."""
    mib = 2**20
    lines = [
        f"{name}: peak {(baseline + peak.peak_bytes) / 2**30:.3f} GiB = baseline "
        f"{baseline / 2**30:.3f} + {peak.peak_bytes / mib:,.1f} MiB allocated in the step "
        f"(event {peak.event}); largest blocks alive there:"
    ]
    for size, frames in peak.live[:top]:
        lines.append(f"  {size / mib:10,.1f} MiB  " + (" <- ".join(frames) or "(no kept frame)"))
    rest = peak.live[top:]
    if rest:
        lines.append(f"  {sum(s for s, _ in rest) / mib:10,.1f} MiB  in {len(rest)} smaller blocks")
    return "\n".join(lines)


def summed_by_site(blocks: Iterable[tuple[int, list[str]]]) -> list[tuple[int, str]]:
    """Live bytes per innermost kept frame, largest first (a site allocating many blocks)."""
    sums: dict[str, int] = {}
    for size, frames in blocks:
        key = frames[0] if frames else "(no kept frame)"
        sums[key] = sums.get(key, 0) + size
    return sorted(((v, k) for k, v in sums.items()), reverse=True)

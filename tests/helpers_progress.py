"""A stand-in for tqdm's bar that records what each bar was told (for tests of progress)."""

from __future__ import annotations

from typing import Any


def recording_bars(monkeypatch: Any) -> list[dict]:
    """Replace ``tqdm.tqdm`` by a bar that records each bar's desc, total and the sum of its
    updates; returns the list the bars are appended to, in order of creation."""
    import tqdm

    bars: list[dict] = []

    class Bar:
        def __init__(self, iterable=None, total=None, desc="", **kw):
            self.iterable, self.seen = iterable, {"desc": desc, "total": total, "n": 0}
            bars.append(self.seen)

        def __iter__(self):
            return iter(self.iterable)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n: int = 1) -> None:
            self.seen["n"] += n

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    return bars

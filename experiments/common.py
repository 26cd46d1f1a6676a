"""Small helpers shared by the experiment scripts: data mixing, result transport, timing.

Nothing here trains or evaluates; the scripts call ``calibrated_lm`` for that.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# Fields of an Alpaca-style record that ``calibrated-lm train`` reads; other fields of the
# source files (AlpacaEval's ``dataset``/``generator``) are provenance only.
ALPACA_FIELDS = ("instruction", "input", "output", "history", "system")
# Fields of a samples.jsonl record that metrics and ``compare`` need; the prompt and choice texts
# are dropped for transport (they are rebuilt from the task data at any time).
SLIM_FIELDS = (
    "task",
    "id",
    "choice_logprobs",
    "label",
    "subject",
    "choice_char_lengths",
    "choice_token_counts",
    "split",
    "request_sha256",  # eval's resume check: without it a shipped-back journal is refused
)
# What the reports commit of a finished evaluation: the same less the request hashes. Only
# finished evaluations are committed and restored, and a finished one is never resumed, so the
# hashes (64 random hex digits per question, the same in every run of one format: half of a
# compressed file) would only make the working tree that travels with every device call grow.
COMMIT_FIELDS = tuple(f for f in SLIM_FIELDS if f != "request_sha256")


def mix_instruction_data(
    paths: Sequence[str | Path], out_dir: Path, *, holdout_frac: float, seed: int = 0
) -> dict[str, Any]:
    """Concatenate Alpaca-style JSON files, shuffle with ``seed`` and split off a held-out slice.

    Writes ``out_dir/train.json`` and ``out_dir/heldout.json`` (JSON lists of Alpaca records)
    and ``out_dir/data.json`` describing the mix; returns that description. The held-out slice
    is ``round(holdout_frac * n)`` records (at least 1 when ``holdout_frac > 0``).
    """
    records: list[dict[str, Any]] = []
    sources: dict[str, int] = {}
    for p in paths:
        path = Path(p)
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        for r in data:
            rec = {k: r[k] for k in ALPACA_FIELDS if r.get(k)}
            rec["_source"] = path.name
            records.append(rec)
        sources[path.name] = len(data)
    rng = random.Random(seed)
    rng.shuffle(records)
    n_hold = round(holdout_frac * len(records))
    if holdout_frac > 0:
        n_hold = max(1, n_hold)
    heldout, train = records[:n_hold], records[n_hold:]
    out_dir.mkdir(parents=True, exist_ok=True)

    def strip(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rs]

    (out_dir / "train.json").write_text(json.dumps(strip(train)), encoding="utf-8")
    (out_dir / "heldout.json").write_text(json.dumps(strip(heldout)), encoding="utf-8")
    info = {
        "sources": sources,
        "n_train": len(train),
        "n_heldout": len(heldout),
        "holdout_frac": holdout_frac,
        "shuffle_seed": seed,
        "heldout_by_source": _count(r["_source"] for r in heldout),
    }
    (out_dir / "data.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return info


def _count(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def slim_samples(path: Path, fields: Sequence[str] = SLIM_FIELDS) -> bytes:
    """The records of a samples.jsonl file with only ``fields`` (default :data:`SLIM_FIELDS`,
    for transport; the reports commit :data:`COMMIT_FIELDS`), as JSONL bytes.

    A trailing line cut short by a crash is skipped (the eval journal's own rule).
    """
    lines = []
    for raw in path.read_bytes().splitlines():
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        lines.append(json.dumps({k: rec[k] for k in fields if k in rec}))
    return ("\n".join(lines) + "\n").encode() if lines else b""


# What travels back from a device run: everything small; never model weights or checkpoints.
# Unit locks (run_units) are empty files that only mean something while a worker runs.
# token_cache/: the tokenized training data (train --token-cache), as little ours to ship as
# train.json, and tens of MiB.
_SKIP_DIRS = {"final", "checkpoints", ".tmp-final", ".old-final", "locks", "token_cache"}
_SKIP_DATA = {"train.json", "heldout.json"}  # copies of the instruction data (not ours to ship)
_SKIP_SUFFIXES = {".safetensors", ".bin", ".pt", ".svg"}


def bundle(
    work: Path,
    out_file: Path,
    newer_than: float | None = None,
    only: Sequence[str] | None = None,
) -> list[str]:
    """Pack the transportable results under ``work`` into ``out_file`` (tar.gz).

    Samples files are slimmed (:func:`slim_samples`); weights, checkpoints, SVGs and the
    copies of the training data (``data/train.json``, ``data/heldout.json``) are left out;
    with ``newer_than`` (a POSIX time) so are files last modified before it (results that
    came from here and need not travel back); with ``only``, just the files under those
    folders of ``work`` (e.g. ``evals/base__trained``: finished units to restore into another
    work folder). Returns the archived member names.
    """
    names: list[str] = []
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out_file, "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            rel = path.relative_to(work)
            if not path.is_file() or any(part in _SKIP_DIRS for part in rel.parts):
                continue
            if rel.parts[0] == "data" and path.name in _SKIP_DATA:
                continue
            if path.suffix in _SKIP_SUFFIXES:
                continue
            if newer_than is not None and path.stat().st_mtime < newer_than:
                continue
            if only is not None and not any(
                rel.parts[: len(Path(o).parts)] == Path(o).parts for o in only
            ):
                continue
            if path.name.startswith("samples") and path.suffix == ".jsonl":
                data = slim_samples(path)
            else:
                data = path.read_bytes()
            info = tarfile.TarInfo(str(rel))
            info.size = len(data)
            info.mtime = int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
            names.append(str(rel))
    return names


def unbundle(archive: Path, work: Path) -> list[str]:
    """Extract a :func:`bundle` archive into ``work`` (regular files only, no paths outside)."""
    work.mkdir(parents=True, exist_ok=True)
    names = []
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            target = (work / m.name).resolve()
            if not m.isfile() or not target.is_relative_to(work.resolve()):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            fh = tar.extractfile(m)
            assert fh is not None  # regular file
            target.write_bytes(fh.read())
            names.append(m.name)
    return names


class Clock:
    """Wall time since construction, against an optional limit in seconds."""

    def __init__(self, limit_s: float | None) -> None:
        self.t0 = time.monotonic()
        self.limit_s = limit_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def fits(self, estimate_s: float) -> bool:
        """Whether a job of ``estimate_s`` seconds started now ends within the limit."""
        return self.limit_s is None or self.elapsed() + estimate_s <= self.limit_s


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))

"""Rebuild finished units of an earlier SFT experiment from its committed results.

A device machine keeps nothing between sessions, and a bundle never carries weights, so the
units that a later profile reuses (issue 12's claim 2 reuses the control's eps-0 seed-1 run and
its base evaluations) are rebuilt from what the control's report committed:
``records/evals/<unit>/`` (done marker, summary, run record, command) and
``samples/<unit>.jsonl.gz`` (every question's per-choice scores), ``records/heldout_base/``,
``records/runs/<run>/`` (training records) where committed. Several results folders can feed
one work folder (the control's, then claim 2's own from earlier sessions).

The training unit of a restored evaluation gets a ``done.json`` that says it was restored (its
weights are gone; nothing downstream needs them once the evaluations are done), so the
scheduler does not train it again.

    python experiments/restore_units.py --results experiments/results/sft_control \
        --units base sft_lr8e-05_ep3_eps0_s1 --work runs/claim2 [--tgz done_units.tgz]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tarfile
from pathlib import Path

# In every restored folder: the results folder it came from (reports leave these out of
# what they commit, since the evidence is already committed there).
RESTORED = "restored_from.txt"


def restore(results: Path, names: list[str], work: Path) -> list[Path]:
    """Write the finished units of ``names`` (``base`` or SFT run names) from ``results`` into
    ``work``: every committed evaluation format, the held-out statistics of ``base``, and for
    a run its training unit (its committed records, or a marker saying it was restored).
    Returns the files written, relative to ``work``; each restored folder gets ``RESTORED``."""
    records = results / "records"
    if not (records / "evals").is_dir():
        raise SystemExit(f"error: {records / 'evals'} does not exist")
    written: list[Path] = []

    def mark(dst: Path) -> None:
        (dst / RESTORED).write_text(f"{results}\n", encoding="utf-8")
        written.extend(p.relative_to(work) for p in sorted(dst.iterdir()))

    found: set[str] = set()
    for src in sorted((records / "evals").iterdir()):
        name = src.name.split("__")[0]
        if name not in names:
            continue
        samples = results / "samples" / f"{src.name}.jsonl.gz"
        if not (src / "done.json").exists() or not samples.exists():
            raise SystemExit(f"error: {src} lacks done.json or {samples} is missing")
        dst = work / "evals" / src.name
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            shutil.copy2(f, dst / f.name)
        (dst / "samples.jsonl").write_bytes(gzip.decompress(samples.read_bytes()))
        mark(dst)
        found.add(name)
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"error: no committed evaluations of {', '.join(missing)} in {records}")
    if "base" in names and (records / "heldout_base" / "done.json").exists():
        dst = work / "heldout_base"
        shutil.copytree(records / "heldout_base", dst, dirs_exist_ok=True)
        mark(dst)
    for run in names:
        if run == "base":
            continue
        dst = work / "runs" / run
        src = records / "runs" / run
        if (src / "done.json").exists():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            dst.mkdir(parents=True, exist_ok=True)
            marker = {
                "restored_from": str(results),
                "note": "training unit restored from committed evaluations; weights not kept",
            }
            (dst / "done.json").write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        mark(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--results", type=Path, required=True, help="a committed report folder")
    ap.add_argument(
        "--units", nargs="+", required=True, help="'base' and/or SFT run names to restore"
    )
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--tgz", type=Path, default=None, help="also pack the files for transport")
    args = ap.parse_args(argv)
    files = restore(args.results, args.units, args.work)
    if args.tgz:
        with tarfile.open(args.tgz, "w:gz") as tar:
            for rel in files:
                tar.add(args.work / rel, arcname=str(rel))
    print(
        f"restored {len(files)} files into {args.work}"
        + (f", packed {args.tgz}" if args.tgz else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

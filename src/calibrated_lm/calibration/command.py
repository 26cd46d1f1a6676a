"""``calibrated-lm metrics FILE...``: calibration summary of existing model outputs."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from calibrated_lm.calibration.jsonfile import write_json
from calibrated_lm.errors import UserError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "metrics",
        help="calibration metrics and reliability diagrams from per-choice log-likelihoods",
        description=(
            "Read per-question choice log-likelihoods (our samples JSONL, or lm-evaluation-"
            "harness --log_samples files, detected automatically), print a calibration table, "
            "and write DIR/summary.json and one reliability diagram (PNG and SVG) per task."
        ),
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="samples files (.jsonl)")
    p.add_argument(
        "--normalization",
        choices=("none", "chars", "tokens"),
        default="none",
        help="score per choice: summed log-likelihood (none), divided by the choice's "
        "character length (chars, lm-eval's acc_norm) or by its token count (tokens, needs "
        "choice_token_counts); default none",
    )
    p.add_argument("--n-bins", type=int, default=15, help="confidence bins (default 15)")
    p.add_argument(
        "--binning",
        choices=("width", "mass"),
        default="width",
        help="equal-width or equal-mass bins (default width)",
    )
    p.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="bootstrap draws (default 1000)"
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument(
        "--output",
        type=Path,
        default=Path("runs/metrics"),
        metavar="DIR",
        help="where summary.json and the diagrams go (default runs/metrics)",
    )
    p.add_argument(
        "--example",
        type=Path,
        metavar="PATH",
        help="first write a synthetic samples file (simulated over-confident model) to PATH, "
        "then include it in the report",
    )
    p.set_defaults(run=run)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MAX_BINS = 1000
# 1 / (1 - 0.95): the fewest draws whose 2.5th and 97.5th percentiles are not the two extremes.
MIN_DRAWS = 20


def check_counts(
    *, n_bins: Any = None, bootstrap: Any = None, seed: Any = None, binning: Any = None
) -> None:
    """The shared checks of ``--n-bins``, ``--bootstrap``, ``--seed`` and ``--binning``
    (metrics, eval, compare): one sentence naming the option; None skips an option."""
    if n_bins is not None and (not _is_int(n_bins) or not 1 <= n_bins <= MAX_BINS):
        # Far more bins than questions leaves nearly every bin empty, and the bootstrap's
        # per-bin arrays grow with the count (a million bins took 24 GB and a kill).
        raise UserError(f"--n-bins must be from 1 to {MAX_BINS}, got {n_bins!r}")
    if bootstrap is not None and (
        not _is_int(bootstrap) or bootstrap < 0 or 0 < bootstrap < MIN_DRAWS
    ):
        raise UserError(
            f"--bootstrap must be 0 (no intervals) or at least {MIN_DRAWS}, got {bootstrap!r}: "
            "with fewer draws a 95% interval's ends are single draws, not percentiles"
        )
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise UserError(f"--seed must be 0 or more, got {seed!r}")
    if binning is not None and binning not in ("width", "mass"):
        raise UserError(f"--binning must be width or mass, not {binning!r}")


def utf8_error(paths: Sequence[str | Path]) -> UserError | None:
    """A sentence naming the first file and line of ``paths`` that is not UTF-8 text (None if
    all are, or cannot be read: reading them again reports that)."""
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError:
            continue
        for lineno, raw in enumerate(data.split(b"\n"), start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return UserError(
                    f"{p}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                    f"{exc.start + 1}); save the file as UTF-8"
                )
    return None


def read_samples_checked(files: Sequence[str | Path], *, normalization: str = "none") -> dict:
    """:func:`~calibrated_lm.calibration.samples.read_samples`, with a file that is not UTF-8
    reported as a sentence (file and line) instead of a traceback.

    ``read_samples`` decodes while it iterates over the file's lines, outside the ``try``
    that turns a ``UnicodeDecodeError`` into its "not UTF-8 text" sentence, so the error
    escapes it; this finds the offending line instead.
    """
    from calibrated_lm.calibration.samples import read_samples

    try:
        return read_samples(list(files), normalization=normalization)
    except UnicodeDecodeError as exc:
        raise (
            utf8_error(files) or UserError(f"a samples file is not UTF-8 text ({exc})")
        ) from None


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "task"


def format_table(tasks: dict[str, dict]) -> str:
    """Plain-text table: one row per task, ``all`` last; the columns are the registry's
    ``metrics`` view (:mod:`calibrated_lm.calibration.registry`), with short headings."""
    from calibrated_lm.calibration.registry import metrics

    shown = metrics("metrics")
    header = ["task", "n"] + [m.heading("metrics", short=True) for m in shown]
    rows = [
        [name, str(s["n"])] + [m.cell(s, "metrics") for m in shown] for name, s in tasks.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells))
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _refuse_foreign_summary(out: Path) -> None:
    """Refuse an output folder whose summary.json is not an earlier metrics summary (a
    capacity result, say, or a file that cannot be read): metrics would replace it."""
    from calibrated_lm.run_folders import existing_summary

    old = existing_summary(out)
    if old is None:
        return
    protocol = old.get("protocol")
    tool = protocol.get("tool") if isinstance(protocol, dict) else None
    if not (isinstance(tool, str) and tool.endswith(" metrics")):
        raise UserError(
            f"--output {out} holds a summary.json that is not a metrics summary (another "
            "command's results); metrics would replace it, so give another --output folder"
        )


def run(args: argparse.Namespace) -> int:
    from calibrated_lm.calibration.example import ExampleExistsError, write_example
    from calibrated_lm.run_folders import refuse_other_runs
    from calibrated_lm.runlock import run_lock

    # Every option before any file is read or written.
    check_counts(n_bins=args.n_bins, bootstrap=args.bootstrap, seed=args.seed, binning=args.binning)
    files = [Path(f) for f in args.files]
    # In eval's folder, metrics would replace eval's summary.json and diagrams, leaving its
    # report.md about other numbers.
    refuse_other_runs(args.output, "metrics")
    _refuse_foreign_summary(Path(args.output))
    if args.example is not None:
        try:
            files.insert(0, write_example(args.example, seed=0))
        except ExampleExistsError:
            raise UserError(
                f"--example {args.example}: that file exists and is not the example file, so it "
                "was left as it was; give a new path for the example"
            ) from None
        except OSError as exc:
            raise UserError(f"cannot write the example to {args.example}: {exc.strerror}") from None
        print(f"wrote synthetic example samples (simulated over-confident model) to {args.example}")
    if not files:
        raise UserError("give at least one samples FILE (or --example PATH for a synthetic one)")

    samples = read_samples_checked(files, normalization=args.normalization)
    out = Path(args.output)
    # One writer per output folder: a second metrics (or eval, compare) writing here is refused
    # before any work. The lock creates the folder (and removes it again if nothing is written).
    with ExitStack() as stack:
        try:
            stack.enter_context(run_lock(out))
        except OSError as exc:
            raise UserError(f"cannot write to {out}: {exc.strerror}") from None
        summary = _summarize(args, files, samples)
        return _write_outputs(args, out, summary, samples)


def _summarize(args: argparse.Namespace, files: list[Path], samples: dict) -> dict:
    from calibrated_lm import __version__
    from calibrated_lm.calibration.report import summarize_tasks
    from calibrated_lm.calibration.samples import task_groups

    groups = task_groups(samples)
    tasks = {name: (t.choice_scores, t.labels) for name, t in samples.items()}
    lengths = None
    if args.normalization in ("chars", "tokens"):
        lengths = {name: t.lengths(args.normalization) for name, t in samples.items()}
    protocol = {
        "tool": f"calibrated-lm {__version__} metrics",
        "files": [str(f) for f in files],
        "confidence": "softmax over each item's choices of the per-choice scores "
        "(summed log-likelihoods; divided by choice character length when normalization=chars, "
        "by choice token count when normalization=tokens)",
        "ci": "95% percentile bootstrap over items",
    }
    try:
        return summarize_tasks(
            tasks,
            protocol=protocol,
            choice_char_lengths=lengths,
            normalization=args.normalization,
            n_bins=args.n_bins,
            binning=args.binning,
            bootstrap=args.bootstrap,
            seed=args.seed,
            groups=groups,
            progress=True,
        )
    except UserError:
        raise
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _write_outputs(args: argparse.Namespace, out: Path, summary: dict, samples: dict) -> int:
    from tqdm import tqdm

    from calibrated_lm.calibration.diagrams import reliability_diagram
    from calibrated_lm.calibration.samples import task_groups
    from calibrated_lm.calibration.scores import choice_log_probabilities

    groups = task_groups(samples)

    try:
        write_json(out / "summary.json", summary, indent=2)
    except OSError as exc:
        raise UserError(f"cannot write to {out}: {exc.strerror}") from None

    print(format_table(summary["tasks"]))
    print(f"\nwrote {out / 'summary.json'}")

    # Diagrams: each task, each group and the pooled entry; plus the tasks overlaid when few.
    def series_of(names: list[str]) -> tuple:
        import numpy as np

        scores = [s for n in names for s in samples[n].choice_scores]
        lens = None
        if args.normalization in ("chars", "tokens"):
            lens = [x for n in names for x in samples[n].lengths(args.normalization)]
        logp, _ = choice_log_probabilities(
            scores, choice_char_lengths=lens, normalization=args.normalization
        )
        labels = np.concatenate([np.asarray(samples[n].labels) for n in names])
        conf = np.exp(logp.max(axis=1))
        return conf, (logp.argmax(axis=1) == labels)

    figures: list[tuple[str, dict]] = [(name, {name: series_of([name])}) for name in samples]
    figures += [(g, {g: series_of(members)}) for g, members in groups.items()]
    if len(samples) > 1:
        figures.append(("all", {"all": series_of(list(samples))}))
    leaves = [n for n in samples if samples[n].group is None] + list(groups)
    if 2 <= len(leaves) <= 6:
        overlay = {}
        for n in leaves:
            overlay[n] = series_of(groups.get(n, [n]))
        figures.append(("tasks_overlaid", overlay))
    written = []
    for stem, series in tqdm(figures, desc="diagrams", unit="fig"):
        title = f"Reliability: {stem}" if stem != "tasks_overlaid" else "Reliability by task"
        try:
            written += reliability_diagram(
                series, out / f"reliability_{_safe_name(stem)}", n_bins=args.n_bins,
                binning=args.binning, title=title, normalization=args.normalization,
            )  # fmt: skip
        except OSError as exc:
            raise UserError(
                f"cannot write diagrams to {out} ({exc.strerror}); summary.json is written"
            ) from None
    from calibrated_lm.run_folders import remove_stale_figures

    stale = remove_stale_figures(out, "reliability_", written)
    print(f"wrote {len(written)} diagram files under {out}/")
    if stale:
        print(f"removed {len(stale)} diagram files of an earlier run's other tasks")
    return 0

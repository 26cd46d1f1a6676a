"""``calibrated-lm eval`` end to end: load, score what is not yet scored, summarise.

Resume is by construction: questions already in ``samples.jsonl`` are not recomputed, new ones
are appended batch by batch, and the summary is rebuilt from the journal. A stored score is
reused only when everything that determines it is unchanged:

* the model: ``run.json`` pins a fingerprint of the weights (:func:`model_fingerprint`: each
  config, weight and tokenizer file's size, modification time and a sha256 of its first and
  last MiB; for a hub id, the id), the dtype, whether and which chat template renders the
  prompts (``chat_template_sha256``), the few-shot count, the BOS convention, and each task's
  split. A rerun into the folder that differs in any of them is refused with one sentence
  naming what changed (``--overwrite`` starts over; another ``--output`` keeps both);
* the question: every record carries ``request_sha256``, a hash of its (context,
  continuation) requests and is reused only while that hash and its split match the question
  as built now. An edited task file therefore re-scores exactly the questions whose prompts or
  choices changed; before scoring, their superseded records are removed from the journal by an
  atomic rewrite (so it never holds two records of one question), and records whose gold label
  or subject changed without a change of prompt are corrected in the same rewrite.

With a head subset (``--head-subset FILE``, or a ``head_subset.json`` in the model folder, which
``calibrated-lm train --head-subset`` saves there) every score is a log-softmax over the kept
tokens only (``scoring``); ``run.json`` and the summary's protocol record the file's path,
sha256 and V', and a rerun with another subset (or none) is refused like another model.
``--uncovered skip`` leaves out the questions the subset cannot score, counted per task
(:mod:`calibrated_lm.evaluation.uncovered`); ``--logit-softcap C`` / ``--logit-temperature T``
score ``log_softmax(C tanh(z / C) / T)`` (:mod:`calibrated_lm.evaluation.logit_transform`).
Both are pinned in ``run.json`` like the subset: a rerun with another value is refused.

Journals or ``run.json`` files of older versions (no fingerprint, no question hashes) cannot be
checked, so they are refused with a sentence suggesting ``--overwrite``. Every argument is
checked before any task data is read, any model is loaded or any folder is created; the run
folder is locked (:mod:`calibrated_lm.runlock`) for the life of the run.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from calibrated_lm.calibration.jsonfile import write_json
from calibrated_lm.calibration.record import SampleRecord
from calibrated_lm.errors import UserError
from calibrated_lm.evaluation import distributed as D
from calibrated_lm.evaluation.chat_format import (
    chat_wrapper,
    read_chat_template_file,
    use_chat_template,
)
from calibrated_lm.evaluation.items import Item
from calibrated_lm.evaluation.logit_transform import LogitTransform
from calibrated_lm.evaluation.run_file import (
    FIT_SAMPLES,
    SAMPLES,
    check_journal_hashes,
    check_run_file,
    early_key,
    json_digest,
    model_fingerprint,
    protocol_key,
    start_over,
    transform_of,
    write_questions,
    write_run_file,
)
from calibrated_lm.evaluation.samples_file import (
    SamplesWriter,
    latest_records,
    read_records,
    record_key,
    rewrite_records,
)
from calibrated_lm.evaluation.tasks import Task
from calibrated_lm.models.head_subset import SubsetFile

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EvalConfig:
    model: str
    tasks: list[str]
    output: Path
    limit: int | float | None = None  # below 1: a fraction of each task/subject
    split: str | None = None
    num_fewshot: int = 0
    chat_template: str = "off"  # off (the harness' default) | on | auto | a Jinja file
    normalization: str = "none"
    n_bins: int = 15
    binning: str = "width"
    bootstrap: int = 1000
    batch_size: str | int = "auto"
    device: str = "auto"
    dtype: str = "auto"
    fit_split: bool = False
    progress: bool = True
    seed: int = 0
    overwrite: bool = False  # start over: drop the folder's earlier results once set up
    # head_subset.json (or a folder holding one): the softmax over its kept tokens only; by
    # default the model folder's own head_subset.json, if any (resolve_head_subset).
    head_subset: str | None = None
    # error: a question with a choice token outside the head subset is refused; skip: such
    # questions are left out and counted per task (evaluation/uncovered.py). Subset only.
    uncovered: str = "error"
    # Scoring-time logit transforms, z -> C tanh(z / C) then / T (evaluation/logit_transform.py):
    # a model trained with a training temperature or softcap scored with it applied.
    logit_softcap: float | None = None
    logit_temperature: float | None = None
    extra_protocol: dict[str, Any] = field(default_factory=dict)
    # Called once, on rank 0, when the first window of scored questions is on disk, with the
    # timing phases so far (the summary's keys); benchmarks/bench_eval_startup.py stops there.
    on_first_batch: Callable[[dict[str, Any]], None] | None = None


def _record(
    item: Item, scores: Sequence[float], token_counts: Sequence[int] | None = None
) -> SampleRecord:
    return SampleRecord(
        task=item.task,
        id=item.id,
        choice_logprobs=tuple(float(s) for s in scores),
        label=item.label,
        subject=item.subject or None,
        choice_char_lengths=tuple(item.choice_char_lengths),
        choice_token_counts=(None if token_counts is None else tuple(int(n) for n in token_counts)),
        choices=tuple(item.choices),
        prompt=item.requests[0][0],
        split=item.split,
        request_sha256=item.requests_sha256,
    )


def _batch_plan(batch_size: str | int, device: str) -> tuple[int, int | None, int, bool]:
    """(rows per batch, padded-token budget, questions per journal flush, auto?)."""
    on_gpu = device.startswith("cuda")
    if batch_size == "auto":
        if on_gpu:
            return 256, 65536, 512, True
        # On the CPU a forward's cost per token is flat from ~200 to ~1,600 tokens, so rows
        # go 8 to a batch, where the padding to the widest row is least; windows of 64
        # questions give score_rows more rows to sort by length (ARC-Easy, SmolLM2: 8.6k
        # padded tokens for 7.8k real, against 12.1k with 32-row batches in windows of 16;
        # benchmarks/eval_cpu_shapes.py, results/session15/eval_cpu_shapes.txt).
        return 8, 4096, 64, True
    try:
        n = int(batch_size)
    except (TypeError, ValueError):
        raise UserError(
            f"--batch-size must be auto or a positive integer, not {batch_size!r}"
        ) from None
    if n < 1:
        raise UserError(f"--batch-size must be positive, got {n}")
    return n, None, max(16, 2 * n), False


def window_bounds(n: int, window_n: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each window of ``n`` questions: the first ``max(1, window_n // 64)``
    questions, then twice as many each time, up to ``window_n`` a window.

    Each window is scored, then written to the journal. Questions run longest first, so a
    full first window would hold the longest ones. The ramp puts the first results on disk
    after a few of them (8 questions on the GPU, 1 on the CPU), so progress shows early and a
    rerun resumes from there. Only the first ~window_n questions go in smaller pieces.
    """
    bounds: list[tuple[int, int]] = []
    size, start = max(1, window_n // 64), 0
    while start < n:
        end = min(n, start + size)
        bounds.append((start, end))
        start, size = end, min(window_n, 2 * size)
    return bounds


def _row_chars(item: Item, packs: bool) -> int:
    """Characters of ``item``'s widest forward row, the length it is sorted by before any
    tokenising: with packing, a question whose choices share one context is one row (the
    context, then every continuation); otherwise each request is its own row."""
    reqs = item.requests
    if packs and reqs and all(c == reqs[0][0] for c, _ in reqs):
        return len(reqs[0][0]) + sum(len(k) for _, k in reqs)
    return max((len(c) + len(k) for c, k in reqs), default=0)


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg
    )


def _score_with_backoff(
    model,
    encoder,
    window,
    state,
    max_len,
    score_items=None,
    token_counts=None,
    head_subset=None,
    transform: LogitTransform | None = None,
):
    """Score one window; on out-of-memory halve an automatic batch, else explain and stop.

    ``score_items`` defaults to :func:`calibrated_lm.evaluation.scoring.score_items`
    (``benchmarks/bench_scoring.py`` passes an earlier version's). ``token_counts``, a list,
    receives each item's per-choice continuation token counts, ``head_subset`` restricts
    the softmax and ``transform`` maps the logits (default scorer only)."""
    extra: dict[str, Any] = {}
    if transform is not None and transform.is_identity:
        transform = None
    if score_items is None:
        from calibrated_lm.evaluation.scoring import score_items

        extra = {"token_counts": token_counts} if token_counts is not None else {}
        if head_subset is not None:
            extra["head_subset"] = head_subset
        if transform is not None:
            extra["transform"] = transform
    elif head_subset is not None or transform is not None:
        raise ValueError("a head subset or logit transform needs the default scorer")

    while True:
        try:
            if token_counts is not None:
                del token_counts[:]  # a retry after out-of-memory starts the window over
            return score_items(
                model,
                encoder,
                window,
                batch_size=state["batch"],
                max_len=max_len,
                max_tokens=state["tokens"],
                **extra,
            )
        except Exception as exc:
            if not _is_oom(exc):
                raise
            _free_cache()
            if state["auto"] and state["batch"] > 1:
                state["batch"] = max(1, state["batch"] // 2)
                state["tokens"] = max(256, (state["tokens"] or 4096) // 2)
                continue
            raise UserError(
                f"out of memory at batch size {state['batch']}; rerun with a smaller "
                f"--batch-size (e.g. {max(1, state['batch'] // 2)}); results so far are kept"
            ) from None


def _free_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- arguments


def parse_batch_size(value: Any) -> str | int:
    """``--batch-size``: ``auto`` or a positive whole number (a string from the command line)."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool):
        n = None
    elif isinstance(value, int):
        n = value
    else:
        try:
            n = int(str(value).strip())
        except ValueError:
            n = None
    if n is None:
        raise UserError(f"--batch-size must be auto or a positive integer, not {value!r}")
    if n < 1:
        raise UserError(f"--batch-size must be auto or a positive integer, got {n}")
    return n


def validate_config(cfg: EvalConfig) -> None:
    """Every option of ``cfg``, one sentence for the first bad one; reads no file, writes
    nothing (asks torch only which devices exist)."""
    from calibrated_lm.calibration.command import check_counts
    from calibrated_lm.training.config_checks import check_device

    check_counts(n_bins=cfg.n_bins, bootstrap=cfg.bootstrap, seed=cfg.seed, binning=cfg.binning)
    if isinstance(cfg.num_fewshot, bool) or not isinstance(cfg.num_fewshot, int):
        raise UserError(f"--num-fewshot must be a whole number, got {cfg.num_fewshot!r}")
    if cfg.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be 0 or more, got {cfg.num_fewshot}")
    limit = cfg.limit
    if limit is not None and (
        isinstance(limit, bool)
        or not isinstance(limit, int | float)
        or not math.isfinite(limit)
        or not limit > 0
    ):
        raise UserError(f"--limit must be positive (a count, or a fraction below 1), got {limit}")
    if cfg.normalization not in ("none", "chars", "tokens"):
        raise UserError(f"--normalization must be none, chars or tokens, not {cfg.normalization!r}")
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {cfg.dtype!r}")
    if not isinstance(cfg.chat_template, str) or not cfg.chat_template:
        raise UserError(
            f"--chat-template must be auto, on, off or a Jinja template file, "
            f"not {cfg.chat_template!r}"
        )
    if cfg.split is not None and (not isinstance(cfg.split, str) or not cfg.split.strip()):
        raise UserError(f"--split must name a split, e.g. validation, not {cfg.split!r}")
    parse_batch_size(cfg.batch_size)
    hsub = cfg.head_subset
    if hsub is not None and (
        not (isinstance(hsub, str) or hasattr(hsub, "__fspath__")) or not str(hsub)
    ):
        raise UserError(f"--head-subset must be a path (or be left out), not {hsub!r}")
    from calibrated_lm.evaluation import uncovered

    uncovered.check_mode(cfg.uncovered)
    transform_of(cfg)  # a bad --logit-softcap / --logit-temperature is refused here
    if not isinstance(cfg.device, str):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, not {cfg.device!r}")
    check_device(cfg.device)


def _load_task_docs(task: Task, split: str | None, limit: Any) -> None:
    """Read one task's data and build its questions, which the task keeps for the run (a bad
    file fails here, in a sentence naming file and line, before any model is loaded)."""
    try:
        task.docs(split or task.eval_split, limit)
    except UnicodeDecodeError as exc:
        from calibrated_lm.calibration.command import utf8_error

        paths = [task.key] if Path(task.key).is_file() else []
        raise (utf8_error(paths) or UserError(f"task {task.key}: not UTF-8 text ({exc})")) from None


def _fit_split(cfg: EvalConfig, task: Task) -> str | None:
    """The split ``--fit-split`` scores for ``task`` (None: none, or it is the scored one)."""
    fit = task.fit_split
    if cfg.fit_split and fit is not None and fit != (cfg.split or task.eval_split):
        return fit
    return None


def fit_split_notes(cfg: EvalConfig, tasks: Sequence[Task]) -> list[str]:
    """One line per task that ``--fit-split`` scores nothing extra for: the task names no
    split to fit a temperature on, or that split is the one being scored."""
    notes = []
    for task in tasks:
        if _fit_split(cfg, task) is not None:
            continue
        if task.fit_split is None:
            why = "names no split to fit a temperature on (its task file has no fit_split)"
        else:
            why = f"would fit on {task.fit_split}, the split being scored"
        notes.append(
            f"note: --fit-split: task {task.name} {why}; nothing extra is scored for it, and "
            "`calibrated-lm compare` shows - for its temperature"
        )
    return notes


# ----------------------------------------------------------------------------- the head subset


def resolve_head_subset(cfg: EvalConfig) -> SubsetFile | None:
    """The head subset the run scores with: ``--head-subset`` and/or the model folder's own
    ``head_subset.json`` (a hub model's is not looked up). Both, with other content: a
    :class:`UserError` (which of them the scores mean would be a guess)."""
    from calibrated_lm.models.head_subset import FILE, open_file

    given = open_file(cfg.head_subset) if cfg.head_subset is not None else None
    folder = Path(str(cfg.model)).expanduser()
    saved = None
    if folder.is_dir() and (folder / FILE).is_file():
        saved = open_file(folder / FILE, f"--model {cfg.model}:")
    if given is not None and saved is not None and given.sha256 != saved.sha256:
        raise UserError(
            f"--head-subset {given.path} (V' = {given.subset.size}) is not the head subset "
            f"saved with the model in {saved.path} (V' = {saved.subset.size}); leave "
            "--head-subset out to score with the model's own"
        )
    return given or saved


def _check_subset_vocab(subset: SubsetFile, rows: int, model_class: str) -> None:
    if subset.subset.vocab_size != rows:
        raise UserError(
            f"the head subset {subset.path} was chosen from a vocabulary of "
            f"{subset.subset.vocab_size} tokens, but {model_class}'s output head has "
            f"{rows} rows; choose it with this model's tokenizer"
        )


def _config_vocab(config: Any) -> int | None:
    """The vocabulary the config declares (a multimodal config keeps it in its text part)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)
    return int(n) if n else None


def _prepare_journal(path: Path, items: Sequence[Item], *, write: bool = True) -> dict[str, Any]:
    """Make ``path`` hold only records that can be reused for ``items`` (and those of other
    questions, untouched): merge leftover rank journals of an interrupted sharded run, drop
    records whose requests or split no longer match their question (they are re-scored),
    correct labels/subjects that changed without a change of prompt, keep one record per
    question (the last). The journal is rewritten atomically only when something changed.

    ``write=False`` decides without rewriting: the result's ``rewrite`` says whether
    :func:`_commit_journal` must write its ``records``."""
    if D.rank_files(path):
        D.merge_rank_files(path)
    records = read_records(path, repair=True)
    latest = latest_records(records)
    want = {(it.task, it.id): it for it in items}
    keep: list[SampleRecord] = []
    stale = corrected = 0
    for r in latest:
        it = want.get(record_key(r))
        if it is None:
            keep.append(r)
            continue
        if r.request_sha256 != it.requests_sha256 or r.split != it.split:
            stale += 1
            continue
        fresh = _refresh(r, it)
        corrected += fresh != r
        keep.append(fresh)
    prepared = {
        "stale": stale,
        "corrected": corrected,
        # What the journal holds once committed: ``keep``, else ``records``, equal to it then.
        "records": keep,
        "rewrite": bool(stale or corrected or len(latest) != len(records)),
    }
    if write:
        _commit_journal(path, prepared)
    return prepared


def _commit_journal(path: Path, prepared: dict[str, Any]) -> None:
    if prepared["rewrite"]:
        rewrite_records(path, prepared["records"])
        prepared["rewrite"] = False


def _refresh(record: SampleRecord, item: Item) -> SampleRecord:
    """``record`` with the item's gold label, subject and choices (which do not change a
    score): a task file that fixes a label is reflected without re-scoring."""
    return replace(
        record,
        label=item.label,
        choices=tuple(item.choices),
        choice_char_lengths=tuple(item.choice_char_lengths),
        subject=item.subject or None,
    )


def _reusable(records: Sequence[SampleRecord], items: Sequence[Item]) -> set:
    """Keys of ``items`` whose record in ``records`` matches them (requests and split)."""
    by_key = {record_key(r): r for r in records}
    done = set()
    for it in items:
        r = by_key.get((it.task, it.id))
        if r is not None and r.request_sha256 == it.requests_sha256 and r.split == it.split:
            done.add((it.task, it.id))
    return done


def _leave_out_uncovered(
    encoder: Any,
    items: list[Item],
    subset: SubsetFile,
    splits: dict[str, str],
    tasks: Sequence[Task],
) -> tuple[list[Item], dict[str, dict[str, Any]]]:
    """``--uncovered skip``: the covered ``items`` and per-task counts of those left out
    (:func:`calibrated_lm.evaluation.uncovered.counts`, with each task's split); a task with
    no covered question is a :class:`UserError`. Every question is tokenised, resumed ones
    too: the counts describe the run's questions, not only this session's."""
    from calibrated_lm.evaluation import uncovered

    covered, left = uncovered.partition(encoder, items, subset.subset)
    names = [t.name for t in tasks if t.name in splits]
    per_task = uncovered.counts(items, left, names)
    for name, c in per_task.items():
        c["split"] = splits.get(name)
    uncovered.refuse_empty(per_task, subset.subset.size)
    return covered, per_task


def _task_splits(tasks: Sequence[Task], split: str | None) -> dict[str, str]:
    """The split each task is scored on (reported name -> split)."""
    return {task.name: split or task.eval_split for task in tasks}


# ----------------------------------------------------------------------------- the run


def split_sizes(task: Task, split: str) -> dict[str, int]:
    """Questions of ``split`` before --limit, per harness task name: the task's own and, for
    a group (MMLU), each member's (``mmlu_anatomy``, as its records are named)."""
    # A task's records carry its name (a file task's key is its path); a member's, its key.
    return {task.name: task.split_size(split)} | {m.key: m.split_size(split) for m in task.members}


def _write_lm_eval_results(out: Path, summary: dict[str, Any], records: list) -> Path:
    """The harness-style ``results_<date>.json`` (evaluation/lm_eval_results.py), replacing
    the one an earlier (resumed) run of this folder wrote."""
    from calibrated_lm.evaluation.lm_eval_results import lm_eval_results, results_file_name

    path = write_json(out / results_file_name(), lm_eval_results(summary, records))
    for old in out.glob("results_*.json"):
        if old != path:
            old.unlink()
    return path


def process_age_s() -> float | None:
    """Seconds since this process started (interpreter start-up and imports included), from
    ``/proc/self/stat``'s start time against ``CLOCK_BOOTTIME``; None where either is missing
    (not Linux). Resolution: one clock tick (10 ms)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            # Field 22 (starttime); the command name (field 2) may hold spaces, so count
            # from the closing parenthesis.
            fields = fh.read().rsplit(")", 1)[1].split()
        start = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate, write ``samples.jsonl``, ``summary.json``, diagrams and ``report.md``;
    return the summary (rank 0; other ranks return an empty dict).

    The summary's ``timing`` splits the time before the first scored batch into phases
    (issue 15's "start to first scored batch"): ``process_start_to_eval_s`` (interpreter,
    imports and argument parsing, for a CLI run), ``tasks_read_s``, ``model_load_s``
    (tokenizer and config, plus the weights when there is something to score: a rerun with
    nothing left to score never reads them; ``weights_load_s`` is the weights' part),
    ``prepare_s`` (items built, journals checked), ``to_scoring_start_s`` (this call's start
    to the first forward pass), then ``to_first_batch_s`` from this call's
    start and ``process_to_first_batch_s`` from the process's, both when the first window of
    scored questions is on disk (None when nothing was scored).
    """
    t_start = time.perf_counter()
    age_at_start = process_age_s()
    from calibrated_lm.evaluation.tasks import resolve_tasks

    # Every option first: a typo costs neither task loading nor model loading, and no folder.
    validate_config(cfg)
    tasks = resolve_tasks(",".join(cfg.tasks))  # task files read and checked, no data yet
    # Read every task's data up front (each task keeps its questions for the run, so this is
    # the only read): a bad or empty task file fails in a second, before a model is loaded or
    # any output folder is created.
    for task in tasks:
        _load_task_docs(task, cfg.split, cfg.limit)
        fit = _fit_split(cfg, task)
        if fit is not None:
            _load_task_docs(task, fit, None)
    if cfg.fit_split:
        for note in fit_split_notes(cfg, tasks):
            if D.dist_info().is_main:
                print(note, file=sys.stderr, flush=True)
    phases: dict[str, Any] = {
        "process_start_to_eval_s": None if age_at_start is None else round(age_at_start, 2),
        "tasks_read_s": _since(t_start),
    }
    read_chat_template_file(cfg.chat_template)  # a bad template file fails before loading
    info = D.dist_info()
    # Resolving the model (inside) makes a missing model fail before any folder is created.
    fingerprint = model_fingerprint(cfg.model)
    subset = resolve_head_subset(cfg)
    from calibrated_lm.evaluation.uncovered import check_mode_with_subset
    from calibrated_lm.run_folders import refuse_other_runs

    check_mode_with_subset(cfg.uncovered, subset is not None)
    splits = _task_splits(tasks, cfg.split)
    out = Path(cfg.output)
    # Even with --overwrite: it deletes eval's files only, and another command's folder is
    # not eval's to start over.
    refuse_other_runs(out, "eval")
    if not cfg.overwrite:
        # What can be refused before the model loads is refused now.
        check_run_file(out, early_key(cfg, fingerprint, splits, subset))
        check_journal_hashes(out)
    out.mkdir(parents=True, exist_ok=True)
    from calibrated_lm.launcher import own_process_group
    from calibrated_lm.runlock import run_lock

    device = _rank_device(cfg.device, info)
    # The group joined here is left before returning or raising (launcher.own_process_group).
    with own_process_group():
        D.init_process_group(info, use_cuda=device.startswith("cuda"))
        # One eval per folder at a time (rank 0 holds the lock for the whole launch).
        with run_lock(out, active=info.is_main):
            return _run_locked(
                cfg, tasks, out, info, device, fingerprint, splits, t_start, subset, phases
            )


def _rank_device(device: str, info: D.DistInfo) -> str:
    """This rank's device: ``cuda:LOCAL_RANK`` under a launcher with GPUs, else ``device``."""
    import torch

    if info.world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return f"cuda:{info.local_rank}"
    return device


def _run_locked(
    cfg: EvalConfig,
    tasks: list[Task],
    out: Path,
    info: D.DistInfo,
    device: str,
    fingerprint: dict[str, Any],
    splits: dict[str, str],
    t_start: float,
    subset: SubsetFile | None = None,
    phases: dict[str, Any] | None = None,
) -> dict[str, Any]:
    import torch

    from calibrated_lm.evaluation.scoring import make_encoder, model_max_length, supports_packing
    from calibrated_lm.evaluation.tasks import build_items
    from calibrated_lm.launcher import on_every_rank
    from calibrated_lm.models.loading import load_weights, open_model

    t0 = time.perf_counter()
    # Tokenizer and config first: the protocol, the journals and what is left to score need no
    # weights, so a rerun with nothing left to score never reads them (nor moves them to a GPU).
    opened = on_every_rank(lambda: open_model(cfg.model, dtype=cfg.dtype, device=device))
    tokenizer = opened.tokenizer
    t_loaded = time.perf_counter()
    load_s = t_loaded - t0
    # What the loaded model's own config will say (the text part, for some multimodal classes).
    model_config = opened.model_config
    if subset is not None:
        rows = _config_vocab(model_config)
        if rows is not None:
            _check_subset_vocab(subset, rows, opened.model_class)
    loaded: dict[str, Any] = {}

    def need_weights() -> None:
        # Called before a journal drops a record or --overwrite deletes the earlier results:
        # weights that cannot be read leave those as they were.
        if "model" not in loaded:
            t = time.perf_counter()
            model = load_weights(opened)
            loaded["s"] = time.perf_counter() - t
            if subset is not None:
                rows = model.get_output_embeddings().weight.shape[0]
                _check_subset_vocab(subset, rows, type(model).__name__)
            loaded["model"] = model

    # A quantised checkpoint's loader picks its own dtype (AWQ: fp16 whatever was asked), so
    # its weights are read first and the protocol records what its parameters hold.
    quantised = getattr(opened.config, "quantization_config", None) is not None
    if cfg.overwrite or quantised:
        need_weights()  # --overwrite: everything is scored again
    dev = opened.device
    # The dtype the weights are loaded in (what a loaded model's parameters hold).
    dtype = opened.dtype_name
    if "model" in loaded:
        dtype = str(next(loaded["model"].parameters()).dtype).replace("torch.", "")
    chat = use_chat_template(cfg.chat_template, tokenizer)
    encoder = make_encoder(tokenizer, model_config, chat=chat)
    key = protocol_key(
        cfg,
        chat,
        dtype,
        encoder.add_bos,
        getattr(tokenizer, "chat_template", None),
        fingerprint=fingerprint,
        splits=splits,
        subset=subset,
    )
    D.barrier(info)
    # Every rank checks (so every rank stops on a refusal, together); rank 0 writes.
    old = None if cfg.overwrite else on_every_rank(lambda: check_run_file(out, key))
    if info.is_main:
        if cfg.overwrite:
            start_over(out, key)
        else:
            write_run_file(out, old, key)
    D.barrier(info)
    wrap = chat_wrapper(tokenizer) if chat else None

    streams: list[tuple[Path, list[Item]]] = []
    eval_items: list[Item] = []
    fit_items: list[Item] = []
    for task in tasks:
        eval_items += build_items(
            task, split=cfg.split, limit=cfg.limit, num_fewshot=cfg.num_fewshot, chat=wrap
        )
        fit = _fit_split(cfg, task)
        if fit is not None:
            fit_items += build_items(
                task, split=fit, limit=None, num_fewshot=cfg.num_fewshot, chat=wrap
            )
    left_out: dict[str, dict[str, Any]] = {}
    if subset is not None and cfg.uncovered == "skip":
        # Before any journal is touched: a task with no scorable question changes nothing.
        fit_splits = {t.name: _fit_split(cfg, t) for t in tasks if _fit_split(cfg, t)}
        eval_items, left_out["eval"] = _leave_out_uncovered(
            encoder, eval_items, subset, splits, tasks
        )
        if fit_items:
            fit_items, left_out["fit"] = _leave_out_uncovered(
                encoder, fit_items, subset, fit_splits, tasks
            )
    streams.append((out / SAMPLES, eval_items))
    if fit_items:
        streams.append((out / FIT_SAMPLES, fit_items))

    # Rank 0 makes every journal hold only reusable records for these questions; then
    # everyone reads them, before anyone appends.
    rescored = 0
    held: dict[Path, list[SampleRecord]] = {}
    work_left = False
    if info.is_main:
        plans = {path: _prepare_journal(path, items, write=False) for path, items in streams}
        for path, _ in streams:
            rescored += plans[path]["stale"]
            held[path] = plans[path]["records"]
        work_left = any(len(_reusable(held[p], items)) < len(items) for p, items in streams)
    # Every rank reads the weights when any question is left (before a stale record is
    # dropped from a journal), so weights that cannot be read stop every rank at this same
    # point instead of leaving the others waiting at a barrier.
    if D.from_main(work_left, info):
        # Together: a rank whose weights cannot be read stops every rank with it, and they
        # leave the group after a barrier, as after finished work (launcher.on_every_rank).
        on_every_rank(need_weights)
    if info.is_main:
        for path, _ in streams:
            _commit_journal(path, plans[path])
    D.barrier(info)
    # One process: the journal holds exactly what _prepare_journal left (no second parse).
    done = {
        path: _reusable(held[path] if info.world == 1 else read_records(path, repair=False), items)
        for path, items in streams
    }
    D.barrier(info)

    max_len = model_max_length(model_config, tokenizer)
    pendings = [
        (path, [it for it in items if (it.task, it.id) not in done[path]])
        for path, items in streams
    ]
    # Which of them this rank scores depends on their number only (D.shard strides).
    pending_total = sum(len(D.shard(range(len(p)), info)) for _, p in pendings)
    if pending_total:
        need_weights()
    model = loaded.get("model")
    if model is not None:
        max_len = model_max_length(model, tokenizer)  # the model's own, whatever its config
        load_s += loaded["s"]
        t_loaded += loaded["s"]  # prepare_s stays the time outside the two loads
        dev = str(next(model.parameters()).device)
    packs = model is not None and supports_packing(model)
    rows, tokens, window_n, auto = _batch_plan(parse_batch_size(cfg.batch_size), dev)
    state = {"batch": rows, "tokens": tokens, "auto": auto}
    work: list[tuple[Path, list[Item]]] = []
    for path, pending in pendings:
        # Longest first (as the harness does): less padding, and OOM shows up early.
        pending.sort(key=lambda it: -_row_chars(it, packs))
        work.append((path, D.shard(pending, info)))
    if subset is not None and cfg.uncovered == "error":
        from calibrated_lm.evaluation.scoring import check_items_in_subset

        # Every choice scorable under the restricted softmax, before anything is scored.
        for _, mine in work:
            check_items_in_subset(encoder, mine, subset.subset)

    from tqdm import tqdm

    transform = transform_of(cfg)
    t_score = time.perf_counter()
    prepare_s = t_score - t_loaded
    first_batch: dict[str, float | None] = {}
    scored = 0
    with tqdm(
        total=pending_total,
        unit="q",
        desc=f"scoring (rank {info.rank})" if info.world > 1 else "scoring",
        disable=not cfg.progress or pending_total == 0,
        dynamic_ncols=True,
    ) as bar:
        for path, mine in work:
            target = D.rank_file(path, info.rank) if info.world > 1 else path
            with SamplesWriter(target) as writer:
                for start, end in window_bounds(len(mine), window_n):
                    window = mine[start:end]
                    counts: list[list[int]] = []
                    scores = _score_with_backoff(
                        model,
                        encoder,
                        window,
                        state,
                        max_len,
                        token_counts=counts,
                        head_subset=subset.subset if subset is not None else None,
                        transform=transform,
                    )
                    writer.write(_record(it, s, n) for it, s, n in zip(window, scores, counts))
                    if not first_batch:
                        age = process_age_s()
                        first_batch = {
                            "to_first_batch_s": _since(t_start),
                            "process_to_first_batch_s": None if age is None else round(age, 2),
                        }
                        if cfg.on_first_batch is not None and info.is_main:
                            cfg.on_first_batch(
                                {
                                    **(phases or {}),
                                    "model_load_s": round(load_s, 2),
                                    "prepare_s": round(prepare_s, 2),
                                    "to_scoring_start_s": round(t_score - t_start, 2),
                                    **first_batch,
                                }
                            )
                    scored += len(window)
                    bar.update(len(window))
    score_s = time.perf_counter() - t_score

    D.barrier(info)
    if not info.is_main:
        return {}
    if info.world > 1:
        for path, _ in streams:
            D.merge_rank_files(path)

    # This run's questions, each by its one record that matches it (requests and split).
    journal = latest_records(read_records(out / SAMPLES))
    wanted = _reusable(journal, eval_items)
    records = [r for r in journal if record_key(r) in wanted]
    if not records:
        raise UserError("no questions were scored")
    import transformers

    from calibrated_lm import __version__
    from calibrated_lm.evaluation.report import (
        build_summary,
        report_table,
        write_diagrams,
        write_report,
    )

    task_proto = {}
    for task in tasks:
        split = cfg.split or task.eval_split
        task_proto[task.name] = {
            "split": split,
            "fewshot_split": task.fewshot_split if cfg.num_fewshot else None,
            "fewshot_sampler": task.fewshot_sampler if cfg.num_fewshot else None,
            "task_file": task.task_file,
            "source": task.source(split),
            "metadata": dict(task.definition.metadata),
            "split_sizes": split_sizes(task, split),
        }
    protocol = {
        **key,
        # run.json keeps the per-file fingerprint; the summary only its digest.
        "model_fingerprint": json_digest(key["model_fingerprint"]),
        "model_class": type(model).__name__ if model is not None else opened.model_class,
        "device": dev,
        "world_size": info.world,
        "chat_template_mode": cfg.chat_template,
        "prompt_format": "lm-evaluation-harness task templates; continuation = "
        + ("bare choice after the chat generation prompt" if chat else '" " + choice'),
        "scoring": "sum of continuation-token log-probs; context and context+continuation "
        "tokenised separately, continuation = tokens past the context (harness _encode_pair)"
        + (
            f"; log-softmax over the V' = {subset.subset.size} tokens of the head subset only"
            if subset is not None
            else ""
        )
        + (f"; {transform.describe()}" if not transform.is_identity else ""),
        "confidence": "softmax over the choices of the (normalised) scores",
        "max_length": max_len,
        "limit": cfg.limit,
        "tasks": task_proto,
        # --uncovered skip: per task, questions left out (scored split; fit split apart).
        **({"uncovered_questions": left_out["eval"]} if "eval" in left_out else {}),
        **({"uncovered_questions_fit_split": left_out["fit"]} if "fit" in left_out else {}),
        "versions": {
            "calibrated_lm": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "timing": {
            **(phases or {}),
            "model_load_s": round(load_s, 2),
            # Of model_load_s, reading the weights onto their device (None: not read).
            "weights_load_s": round(loaded["s"], 2) if "s" in loaded else None,
            "prepare_s": round(prepare_s, 2),
            "to_scoring_start_s": round(t_score - t_start, 2),
            "to_first_batch_s": first_batch.get("to_first_batch_s"),
            "process_to_first_batch_s": first_batch.get("process_to_first_batch_s"),
            "scoring_s": round(score_s, 2),
            "questions_scored_this_run": scored,
            "questions_rescored_after_a_change": rescored,
            "questions_per_s": round(scored / score_s, 3) if scored and score_s > 0 else None,
            "total_s": round(time.perf_counter() - t_start, 2),
            "batch_size": state["batch"],
        },
        **cfg.extra_protocol,
    }
    summary = build_summary(
        records,
        protocol=protocol,
        normalization=cfg.normalization,
        n_bins=cfg.n_bins,
        binning=cfg.binning,
        bootstrap=cfg.bootstrap,
        seed=cfg.seed,
        progress=cfg.progress,
    )
    summary["protocol"]["timing"]["total_s"] = round(time.perf_counter() - t_start, 2)
    write_questions(out, [record_key(r) for r in records])
    write_json(out / "summary.json", summary)
    _write_lm_eval_results(out, summary, records)
    label = Path(cfg.model).name if cfg.model.endswith(".gguf") else cfg.model
    label += ", chat template" if chat else ""
    diagrams = write_diagrams(
        records,
        out,
        label=label,
        normalization=cfg.normalization,
        n_bins=cfg.n_bins,
        binning=cfg.binning,
    )
    write_report(out, summary, records, diagrams)
    summary["_table"] = report_table(summary, records)
    summary["_diagrams"] = {k: [str(p) for p in v] for k, v in diagrams.items()}
    return summary

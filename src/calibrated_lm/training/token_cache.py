"""On-disk cache of tokenized training data (``calibrated-lm train --token-cache DIR``).

Tokenizing tens of thousands of conversations takes tens of seconds on every start, and a
run resumed in chunks starts often. The cache maps a key to the tokenized examples:

    key = sha256(data file bytes, tokenizer fingerprint, max_seq_len, tokenizing code)

The tokenizer fingerprint is its fast backend's serialised JSON (vocabulary, merges,
normaliser, pre-tokenizer) plus its chat template and BOS / EOS ids; "tokenizing code" is
the source of ``training/data.py`` and the versions of transformers, tokenizers and jinja2, so
a change to how records become tokens invalidates every entry instead of serving stale
examples. A tokenizer without a fast backend has no fingerprint and is never cached. An entry
is one ``.npz`` (token ids and labels concatenated, int32, with the examples' offsets) written
atomically (``calibrated_lm.durable``); an entry that does not read back is tokenized again
and replaced.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

from calibrated_lm.training import data as data_module
from calibrated_lm.training.data import Dataset, Example

# Bumped when the entry layout changes.
LAYOUT = 1


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """sha256 of what decides the tokens, or None when the tokenizer has no fast backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    h = hashlib.sha256(backend.to_str().encode())
    extra = {
        "class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "bos": getattr(tokenizer, "bos_token_id", None),
        "eos": getattr(tokenizer, "eos_token_id", None),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("transformers", "tokenizers", "jinja2"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cache_key(path: str | Path, tokenizer: Any, max_seq_len: int) -> str | None:
    """The entry's name for ``path`` tokenized by ``tokenizer`` at ``max_seq_len`` (module
    docstring), or None when the tokenizer cannot be fingerprinted."""
    tok = tokenizer_fingerprint(tokenizer)
    if tok is None:
        return None
    h = hashlib.sha256()
    h.update(f"layout {LAYOUT}; max_seq_len {max_seq_len}; tokenizer {tok}\n".encode())
    # The libraries that render the chat template and encode the text.
    h.update(json.dumps(_library_versions(), sort_keys=True).encode())
    h.update(Path(data_module.__file__).read_bytes())
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load(cache_dir: str | Path, key: str) -> Dataset | None:
    """The cached dataset of ``key``, or None when absent or unreadable."""
    import numpy as np

    path = Path(cache_dir) / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, labels, offsets = z["ids"], z["labels"], z["offsets"]
            meta = json.loads(str(z["meta"]))
        flat_ids, flat_labels = ids.tolist(), labels.tolist()
        bounds = offsets.tolist()
        examples = [
            Example(flat_ids[a:b], flat_labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])
        ]
        return Dataset(
            examples=examples,
            n_records=int(meta["n_records"]),
            dropped=Counter(meta["dropped"]),
            template=str(meta["template"]),
        )
    except Exception:
        # A damaged entry (cut short, not a zip, a foreign file) is only a lost speed-up:
        # tokenize again. numpy raises BadZipFile, EOFError, ValueError, KeyError, OSError.
        return None


def save(cache_dir: str | Path, key: str, data: Dataset) -> Path:
    """Write ``data`` as the entry of ``key`` (atomically); returns its path."""
    import numpy as np

    from calibrated_lm import durable

    lengths = [len(ex.input_ids) for ex in data.examples]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter(
        (t for ex in data.examples for t in ex.input_ids), dtype=np.int32, count=int(offsets[-1])
    )
    labels = np.fromiter(
        (t for ex in data.examples for t in ex.labels), dtype=np.int32, count=int(offsets[-1])
    )
    meta = {"n_records": data.n_records, "dropped": dict(data.dropped), "template": data.template}
    buf = io.BytesIO()
    np.savez(buf, ids=ids, labels=labels, offsets=offsets, meta=np.array(json.dumps(meta)))
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return durable.write_bytes(folder / f"{key}.npz", buf.getvalue())

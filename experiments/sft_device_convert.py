"""Device-side GGUF conversion with tokenizer files carried from a known-good conversion.

Why: with transformers 5.17 (the GPU machine's version) the tokenizer that transformers builds
from the Gemma-3 GGUF and re-saves loads back as a character-level tokenizer (its merges are
lost), so ``calibrated_lm.models.loading.convert_gguf`` rightly refuses the cache entry (the
saved copy does not reproduce the GGUF model's logits). The weights themselves convert
exactly. This script writes the cache entry that ``load_model`` looks for from

* the weights: GGUF -> ``save_pretrained`` (fp32, as ``convert_gguf`` does), and
* the tokenizer: the files saved by a transformers 5.23 conversion (``--tokenizers DIR``,
  one sub-folder per embedded model, plus ``expected.json`` = probe token ids from there),

and checks both before renaming the entry into place: the carried tokenizer must give the
expected ids on the probe sentence, and the saved weights must give the GGUF model's logits on
those ids (max abs difference <= 1e-3).

    python experiments/sft_device_convert.py --tokenizers DIR [MODEL ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

PROBE = "The capital of France is Paris. Calibration means confidence matches accuracy."


def expected_ids(tok_root: Path, models: list[str]) -> dict[str, list[int]]:
    """Probe ids of each carried tokenizer (run where the tokenizer is known to be good)."""
    from transformers import AutoTokenizer

    return {m: AutoTokenizer.from_pretrained(str(tok_root / m))(PROBE).input_ids for m in models}


def convert(model: str, tok_root: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibrated_lm.models.loading import _gguf_cache_entry, resolve_model

    gguf = Path(resolve_model(model))
    target = _gguf_cache_entry(gguf)
    if (target / "config.json").exists():
        print(f"{model}: cache entry exists: {target}")
        return target
    want = json.loads((tok_root / "expected.json").read_text())[model]
    tok = AutoTokenizer.from_pretrained(str(tok_root / model))
    ids = tok(PROBE).input_ids
    if ids != want:
        raise SystemExit(f"{model}: carried tokenizer gives {ids[:8]}..., expected {want[:8]}...")
    ref_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = ref_model(input_ids=x).logits
    quantizer = getattr(ref_model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(ref_model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    ref_model.save_pretrained(tmp)
    del ref_model
    for f in (tok_root / model).iterdir():
        shutil.copy2(f, tmp / f.name)
    saved = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
    with torch.no_grad():
        again = saved(input_ids=x).logits
    diff = (again - ref).abs().max().item()
    if again.shape != ref.shape or diff > 1e-3:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"{model}: saved weights do not reproduce the GGUF logits ({diff})")
    tmp.rename(target)
    print(f"{model}: wrote {target} (logit max diff {diff:.2e}, probe ids match)")
    return target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("models", nargs="*", default=["gemma-3-270m", "smollm2-135m-instruct"])
    ap.add_argument("--tokenizers", type=Path, required=True)
    ap.add_argument("--write-expected", action="store_true", help="record the probe ids here")
    args = ap.parse_args()
    if args.write_expected:
        ids = expected_ids(args.tokenizers, args.models)
        (args.tokenizers / "expected.json").write_text(json.dumps(ids))
        print(f"wrote {args.tokenizers / 'expected.json'}")
        return 0
    from calibrated_lm.errors import UserError

    for m in args.models:
        try:
            convert(m, args.tokenizers)
        except UserError as exc:  # a model whose package is not installed here
            print(f"{m}: skipped ({exc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

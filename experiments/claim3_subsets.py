"""Build the restricted output heads of issue 12's claim 3 (docs/issue12_plan.md, step 5).

Claim 3 varies the vocabulary V' at a fixed hidden size by restricting gemma-3-270m's softmax
to V' tokens (``calibrated_lm.models.head_subset``). The pre-registered rule for the subset:

1. *required*: every token of every scored continuation of the evaluated tasks, in both scoring
   formats (plain harness prompt and the trained chat format), tokenised exactly as the scorer
   does (``evaluation.scoring.Encoder``: a continuation's ids are those of context+continuation
   after the context's), plus the tokenizer's special tokens and the tokens of the training
   template's fixed parts;
2. then the most frequent other tokens of the SFT training text (every token of every training
   example, as ``calibrated-lm train`` tokenises it) and of the evaluation prompts, ties by id.

For each V' this writes ``OUT/V<V'>/head_subset.json`` with the selection's statistics in its
metadata: how many tokens were required, and the share of SFT target tokens, SFT text tokens
and evaluation prompt tokens the subset keeps (an SFT target outside it is left out of the
loss: the plan asks for that share per V'). ``OUT/subsets.json`` lists them all.

    python experiments/claim3_subsets.py --model gemma-3-270m \\
        --train runs/claim2/data/train.json --template runs/claim2/data/chat_template.jinja \\
        --sizes 32768 8192 --out runs/claim3/subsets

``--train`` defaults to mixing ``../shared/data/instruct/*.json`` exactly as the SFT
experiment's prepare unit does (same split, seed 0), so the file need not exist yet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import mix_instruction_data  # noqa: E402

from calibrated_lm.models import head_subset as HS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INSTRUCT = ROOT.parent / "shared" / "data" / "instruct"
# The claim-2 setting's tasks and training length (experiments/sft_calibration.py, _CONTROL).
TASKS = "arc_easy,arc_challenge,piqa,sciq,openbookqa,mmlu,hellaswag"
# Tasks whose every answer token is kept, so that all their questions stay scorable: the five
# primary tasks and MMLU (letters). HellaSwag's 27,763 distinct answer tokens alone exceed the
# smaller V' (see docs/issue12_plan.md, the amendment of step 5): it is scored on the questions
# whose choices the subset covers, and says how many.
REQUIRED_TASKS = "arc_easy,arc_challenge,piqa,sciq,openbookqa,mmlu"
MAX_SEQ_LEN = 1024
HOLDOUT_FRAC = 0.05


def _tokenizer_and_config(model: str) -> tuple[Any, Any]:
    """The tokenizer and config of ``model`` (a name of the embedded models or a folder),
    without loading the weights."""
    from transformers import AutoConfig, AutoTokenizer

    from calibrated_lm.models.loading import convert_gguf, resolve_model

    path = resolve_model(model)
    if isinstance(path, Path) and path.suffix == ".gguf":
        path = convert_gguf(path)
    return AutoTokenizer.from_pretrained(str(path)), AutoConfig.from_pretrained(str(path))


def sft_token_counts(train: Path, tokenizer: Any, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts of every token of the training text, counts of its target tokens), as the
    trainer tokenises ``train`` (``training.data.load_dataset``: template, truncation)."""
    from calibrated_lm.training.data import IGNORE_INDEX, load_dataset

    data = load_dataset(train, tokenizer, max_seq_len=MAX_SEQ_LEN, progress=True)
    text = HS.token_counts((ex.input_ids for ex in data.examples), vocab)
    # Position 0 is never predicted (the causal shift), so it is no target.
    targets = HS.token_counts(
        ([y for y in ex.labels[1:] if y != IGNORE_INDEX] for ex in data.examples), vocab
    )
    return text, targets


@dataclass
class EvalTokens:
    """Token statistics of the evaluation requests over both scoring formats."""

    contexts: np.ndarray  # V counts of the prompts' tokens
    continuations: np.ndarray  # V counts of the scored continuations' tokens
    # (format, task) -> one array per question: every token of every one of its choices.
    questions: dict[tuple[str, str], list[np.ndarray]]


def eval_tokens(
    tasks: str, tokenizer: Any, config: Any, template: str, limit: int | None = None
) -> EvalTokens:
    """Tokenise every request of ``tasks`` as the scorer does, in both formats: plain, and
    chat-rendered with ``template`` (zero-shot, the evaluated splits, as the SFT experiment)."""
    from calibrated_lm.evaluation.chat_format import chat_wrapper
    from calibrated_lm.evaluation.scoring import make_encoder
    from calibrated_lm.evaluation.tasks import build_items, resolve_tasks

    vocab = int(config.vocab_size)
    out = EvalTokens(np.zeros(vocab, np.int64), np.zeros(vocab, np.int64), {})
    # make_encoder reads only the model's config (its BOS rule is per model type).
    shell = SimpleNamespace(config=config)
    for fmt in ("plain", "trained"):
        chat = fmt == "trained"
        if chat:
            tokenizer.chat_template = template
        encoder = make_encoder(tokenizer, shell, chat=chat)
        wrap = chat_wrapper(tokenizer) if chat else None
        for task in resolve_tasks(tasks):
            items = build_items(task, split=None, limit=limit, num_fewshot=0, chat=wrap)
            pairs = [r for it in items for r in it.requests]
            encoded = []
            for start in range(0, len(pairs), 4096):
                encoded += encoder.encode_pairs(pairs[start : start + 4096])
            per_q, k = [], 0
            for it in items:
                conts = [np.asarray(c, np.int64) for _, c in encoded[k : k + len(it.requests)]]
                for ctx, _ in encoded[k : k + len(it.requests)]:
                    out.contexts += np.bincount(np.asarray(ctx, np.int64), minlength=vocab)
                for c in conts:
                    out.continuations += np.bincount(c, minlength=vocab)
                per_q.append(np.unique(np.concatenate(conts)))
                k += len(it.requests)
            out.questions[(fmt, task.name)] = per_q
            print(f"claim3_subsets: {fmt}/{task.name}: {len(items)} questions")
    return out


def covered_share(kept: np.ndarray, questions: list[np.ndarray]) -> float:
    """The share of ``questions`` whose every choice token is in ``kept`` (a boolean V mask)."""
    return float(np.mean([bool(kept[q].all()) for q in questions])) if questions else 1.0


def template_tokens(tokenizer: Any, template: str) -> set[int]:
    """The tokens of the training template's fixed parts: a rendered conversation with empty
    messages of every role (what remains is the template's own text)."""
    tokenizer.chat_template = template
    messages = [{"role": r, "content": ""} for r in ("system", "user", "assistant")]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return set(tokenizer(text, add_special_tokens=False)["input_ids"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--train", type=Path, default=None, help="the SFT training file (train.json)")
    ap.add_argument("--template", type=Path, default=None, help="the training chat template")
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument(
        "--require-answers",
        default=REQUIRED_TASKS,
        help="tasks every one of whose answer tokens is kept (comma-separated)",
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[32768, 8192])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=None, help="questions per task (tests only)")
    args = ap.parse_args(argv)

    from calibrated_lm.training.data import PLAIN_CHAT_TEMPLATE

    template = args.template.read_text(encoding="utf-8") if args.template else PLAIN_CHAT_TEMPLATE
    tokenizer, config = _tokenizer_and_config(args.model)
    vocab = int(config.vocab_size)
    bad = [s for s in args.sizes if not 0 < s <= vocab]
    if bad:
        raise SystemExit(f"error: --sizes must lie in [1, {vocab}], not {bad}")

    with tempfile.TemporaryDirectory() as tmp:
        train = args.train
        if train is None:
            files = sorted(INSTRUCT.glob("*.json"))
            if not files:
                raise SystemExit(f"error: no --train file and no instruction data in {INSTRUCT}")
            mix_instruction_data(files, Path(tmp), holdout_frac=HOLDOUT_FRAC, seed=0)
            train = Path(tmp) / "train.json"
        elif not train.is_file():
            raise SystemExit(f"error: --train {train} does not exist")
        train_sha = _sha256(train)
        sft_text, sft_targets = sft_token_counts(train, tokenizer, vocab)

    ev = eval_tokens(args.tasks, tokenizer, config, template, args.limit)
    required = set(tokenizer.all_special_ids) | template_tokens(tokenizer, template)
    need = {t.strip() for t in args.require_answers.split(",") if t.strip()}
    unknown = need - {task for _, task in ev.questions}
    if unknown:
        raise SystemExit(f"error: --require-answers names tasks not in --tasks: {sorted(unknown)}")
    for (_, task), qs in ev.questions.items():
        if task in need and qs:
            required |= {int(t) for t in np.unique(np.concatenate(qs))}
    n_special = len(set(tokenizer.all_special_ids) | template_tokens(tokenizer, template))
    print(f"claim3_subsets: {len(required)} required tokens ({n_special} special/template)")
    answers_per_task: dict[str, int] = {}
    for (_, task), qs in ev.questions.items():
        prev = answers_per_task.get(task, 0)
        answers_per_task[task] = max(prev, len(np.unique(np.concatenate(qs))) if qs else 0)
    counts = sft_text + ev.contexts + ev.continuations
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in sorted(set(args.sizes), reverse=True):
        subset = HS.select_vocabulary(counts, size, required)
        kept = np.zeros(vocab, dtype=bool)
        kept[np.asarray(subset.kept)] = True
        meta = {
            "rule": "special and template tokens, then the most frequent tokens of the SFT "
            "text and the evaluation prompts and continuations, ties by id "
            "(docs/issue12_plan.md, step 5, as amended)",
            "model": args.model,
            "tasks": args.tasks,
            "limit": args.limit,
            "required_answers_of": sorted(need),
            "train_sha256": train_sha,
            "template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
            "n_required": len(required),
            "distinct_answer_tokens_per_task": answers_per_task,
            "kept_share_sft_targets": HS.coverage(subset, sft_targets),
            "kept_share_sft_text": HS.coverage(subset, sft_text),
            "kept_share_eval_prompts": HS.coverage(subset, ev.contexts),
            "scorable_share": {
                f"{fmt}/{task}": covered_share(kept, qs) for (fmt, task), qs in ev.questions.items()
            },
        }
        folder = args.out / f"V{size}"
        folder.mkdir(parents=True, exist_ok=True)
        path = HS.save(subset, folder, **meta)
        rows.append({"size": size, "path": str(path.relative_to(args.out)), **meta})
        print(
            f"claim3_subsets: V'={size}: SFT targets kept {meta['kept_share_sft_targets']:.4f}, "
            f"SFT text {meta['kept_share_sft_text']:.4f}, "
            f"eval prompts {meta['kept_share_eval_prompts']:.4f} -> {path}"
        )
        for key, share in meta["scorable_share"].items():
            print(f"claim3_subsets:   {key}: {share:.3f} of the questions scorable")
    (args.out / "subsets.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

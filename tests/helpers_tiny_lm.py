"""A tiny randomly initialised causal LM with a real byte-level BPE tokenizer, built offline.

Evaluation and loading tests use it instead of a downloaded model: it has the same interfaces
(fast tokenizer with offsets, AutoModelForCausalLM) and runs in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

_CORPUS = [
    "Question: Which gas do plants take in? Answer: carbon dioxide",
    "The following are multiple choice questions (with answers) about astronomy.",
    "A. Mars B. Venus C. Jupiter D. Saturn Answer: the sun is a star",
    "Calibration means that confidence matches accuracy on average.",
    "Paris is the capital of France; water boils at 100 degrees.",
]


# The tiny shape every test model shares (Llama here; tests build Gemma variants with it).
TINY_SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def build_tiny_lm(folder: Path, *, seed: int = 0, chat_template: bool = False) -> Path:
    """Save a 2-layer Llama (hidden 32) and a 300-token BPE tokenizer into ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = (
            "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
        )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        **TINY_SHAPE,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.eos_token_id,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder

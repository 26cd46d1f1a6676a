"""Random-weight models of a real config, for benchmarks: timing does not depend on weights.

``configs/gemma-3-270m.json`` is the config of the embedded gemma-3-270m (V = 262,144,
D = 640, 18 layers); ``tiny=True`` shrinks it to a 2-layer, V = 1,000 model that only checks a
script on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parent / "configs"
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    layer_types=["sliding_attention", "full_attention"],
    vocab_size=1000,
    head_dim=16,
    num_attention_heads=2,
    sliding_window=16,
)


def random_model(name: str = "gemma-3-270m", *, tiny: bool = False, device: Any = "cpu",
                 seed: int = 0) -> Any:  # fmt: skip
    """An fp32 ``AutoModelForCausalLM`` of ``configs/<name>.json`` with seeded random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    if tiny:
        cfg.update(TINY)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)

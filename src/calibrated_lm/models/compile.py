"""Compile a causal LM's decoder layers for training (``torch.compile``, one graph per layer).

Why: at small hidden sizes the decoder's elementwise work (RMSNorm, activations, rotary
embeddings, the dtype casts of bf16 autocast) is launched as hundreds of separate kernels per
layer and dominates the step. On an H200, gemma-3-270m at 32 x 512 tokens per micro-batch
spends 78% of its SFT step in the decoder, and the profiler gives 147 ms of 737 to
``aten::mul`` alone (``benchmarks/results/profile_sft_step_h200``). Inductor fuses those chains.

Only the decoder layers are compiled, each on its own:

* the fused loss (``calibrated_lm.loss``) is a custom autograd function around Triton kernels
  that needs no compiling and would only break the graph;
* one small graph per layer compiles in seconds and is reused by every layer of the same type
  (Gemma 3's sliding and full layers give two);
* ``dynamic=None`` (PyTorch's default): the first shape compiles static, the first change of
  sequence width recompiles once with dynamic sizes, so length-bucketed micro-batches do not
  recompile at every width.

The weights, the state dict and ``save_pretrained`` are unchanged: ``nn.Module.compile`` compiles
the module's call in place, so parameter names stay the same.
"""

from __future__ import annotations

from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of decoder layers of a transformers causal LM (PEFT-wrapped too).

    Raises ValueError naming the model's class when it has none we recognise."""
    seen: set[int] = set()
    stack = [model]
    while stack:  # breadth-first: the outermost ``layers`` list is the decoder's
        m = stack.pop(0)
        if id(m) in seen:
            continue
        seen.add(id(m))
        layers = getattr(m, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
        stack.extend(m.children())
    raise ValueError(
        f"cannot compile {type(model).__name__}: no decoder layer list (a 'layers' ModuleList) "
        "found; train without --compile"
    )


def compile_decoder(model: nn.Module, *, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile every decoder layer of ``model`` in place (``nn.Module.compile``); return how
    many. Idempotent: a layer already compiled is left alone. ``backend``/``mode`` go to
    ``torch.compile`` (``"aot_eager"`` traces and runs without generating code: for tests)."""
    n = 0
    for layer in decoder_layers(model):
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile(backend=backend, mode=mode)
        n += 1
    return n

"""Attention backends that are safe to train through.

Right-padded batches give some query rows no visible key: padding positions more than
``sliding_window`` tokens past a short sequence's end, in the sliding-window layers of
Gemma 2/3 (and Mistral-style models). Their output is never used, but the backward pass
still runs through them. PyTorch 2.11's default SDPA backend on Hopper, cuDNN attention,
returns NaN in ``grad_q`` when an explicit mask is passed, the key length is 64 mod 128
and a row's log-sum-exp is below about -88.7 = -ln(FLT_MAX), where exp(-lse) overflows
float32 (a fully masked row qualifies):
pytorch/pytorch#196678. One such row poisons every gradient through the shared
projections, while the loss stays finite. That is what stopped our first Gemma-3 SFT run
at step 20 (the first step whose micro-batches included a width of 832 = 6 x 128 + 64
with a sequence shorter than 832 - 512).

``training_attention`` therefore leaves cuDNN out of SDPA's choices during training
forwards; the flash, memory-efficient and math kernels remain.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def training_attention(device: torch.device | str) -> AbstractContextManager[None]:
    """Context for a training forward on ``device``: SDPA may use every backend but cuDNN.

    The backward of an SDPA call uses the kernel its forward chose, so wrapping the forward
    is enough. A no-op off CUDA.
    """
    if torch.device(device).type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    )

"""A model's output head restricted to a :class:`~calibrated_lm.models.head_subset.HeadSubset`.

What ``patch_model(..., head_subset=S)`` does with S (|S| = V' of the head's V rows):

* the loss: the fused kernel sees the kept rows only, ``W_S = W.index_select(0, kept)`` (and
  ``b_S`` likewise), so with ``z_j = cap_c(s * (w_j . h + b_j)) / T`` for ``j in S``

      loss = T * [ -sum_{j in S} q_j log p_j ]  (+ z_loss * lse_S(z)^2),
      p_j = exp(z_j) / sum_{k in S} exp(z_k),   q = (1 - eps) onehot(y') + eps / V',

  i.e. the full model's softmax with every token outside S at -inf, label smoothing spread
  uniformly over the V' kept tokens only (mass eps / V' each), the z-loss on the restricted
  log-partition. Targets are re-indexed V -> V' (``y' = index_map[y]``); a target outside S
  cannot be scored, so it is ignored (``ignore_index``) and counted (``LossStats.n_outside``).
  Gradients reach the kept rows of ``W`` only (``index_select``'s backward);
* the logits without labels (generation, any generic scorer): the full-V logits, with
  ``-inf`` at every token outside S, so ``log_softmax`` over them is the restricted one;
* a head tied to the input embedding stays tied unless asked (``untie_head=True``, then
  :func:`untie_head`): the shared matrix keeps all V rows for the inputs, and only the kept
  rows receive the head's gradients, as they would without a subset.
"""

from __future__ import annotations

import torch
from torch import nn

from calibrated_lm.models.head_subset import HeadSubset


class RestrictedHead:
    """The index tensors of a :class:`HeadSubset`, kept on CPU and copied once per device.

    Compared by identity (a frozen ``PatchConfig`` holds one and may be hashed)."""

    def __init__(self, subset: HeadSubset) -> None:
        self.subset = subset
        self._kept = torch.as_tensor(subset.kept, dtype=torch.long)
        self._index_map = torch.as_tensor(subset.index_map(), dtype=torch.long)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def size(self) -> int:
        """V', the number of kept tokens."""
        return self.subset.size

    @property
    def vocab_size(self) -> int:
        """V, the head's rows."""
        return self.subset.vocab_size

    def __repr__(self) -> str:
        return f"RestrictedHead(size={self.size}, vocab_size={self.vocab_size})"

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # One host-to-device copy per device, not one per forward (the map has V entries).
        if device not in self._on:
            self._on[device] = (self._kept.to(device), self._index_map.to(device))
        return self._on[device]

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """The kept rows of a (V, ...) head weight or (V,) bias; differentiable."""
        kept, _ = self._tensors(t.device)
        return t.index_select(0, kept)

    def remap(
        self, targets: torch.Tensor, ignore_index: int | None, shift: bool
    ) -> tuple[torch.Tensor, int, torch.Tensor]:
        """``(targets', ignore', n_outside)``: targets re-indexed into [0, V'), those outside S
        set to ``ignore'`` (``ignore_index``, or -100 when the caller ignores none: no remapped
        target can equal it), and the number of scored targets outside S (a 0-d tensor; with
        ``shift`` only ``targets[..., 1:]`` are scored).

        Targets outside [0, V) (other than ``ignore_index``) are refused as the kernel would."""
        ignore = -100 if ignore_index is None else int(ignore_index)
        _, index_map = self._tensors(targets.device)
        if ignore_index is None:
            ignored = torch.zeros_like(targets, dtype=torch.bool)
        else:
            ignored = targets == ignore_index
        scored = (slice(None),) * (targets.dim() - 1) + (slice(1 if shift else 0, None),)
        bad = ~ignored[scored] & ((targets[scored] < 0) | (targets[scored] >= self.vocab_size))
        if bool(bad.any()):
            value = int(targets[scored][bad][0])
            raise ValueError(
                f"a target token id {value} lies outside the vocabulary [0, {self.vocab_size})"
            )
        # clamp: ignored (and, with shift, unscored first) positions may hold any value.
        mapped = index_map[targets.clamp(0, self.vocab_size - 1)]
        outside = ~ignored & (mapped < 0)
        mapped = mapped.masked_fill(ignored | outside, ignore)
        return mapped, ignore, outside[scored].sum()

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-V logits with ``-inf`` at the tokens outside S (last dimension of size V)."""
        _, index_map = self._tensors(logits.device)
        return logits.masked_fill(index_map < 0, float("-inf"))


def is_tied(model: nn.Module) -> bool:
    """Whether the output head's weight is the input embedding's (the same tensor)."""
    head = model.get_output_embeddings()
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or inp is None:
        return False
    a, b = head.weight, getattr(inp, "weight", None)
    return b is not None and (a is b or (a.shape == b.shape and a.data_ptr() == b.data_ptr()))


def untie_head(model: nn.Module) -> bool:
    """Give the output head a weight of its own (a copy) when it shares the input embedding's,
    and record ``tie_word_embeddings=False`` in the config so that ``save_pretrained`` /
    ``from_pretrained`` keep them apart. Returns whether it was tied.

    Why: the restricted head trains only its kept rows, while inputs may hold any of the V
    tokens; a shared weight would let the head's gradients move the input embedding too.
    """
    if not is_tied(model):
        return False
    head = model.get_output_embeddings()
    old = head.weight
    head.weight = nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad)
    configs = [model.config]
    text = getattr(model.config, "get_text_config", None)
    if callable(text) and text() is not model.config:
        configs.append(text())
    for cfg in configs:
        cfg.tie_word_embeddings = False
    return True


def check_vocab(model: nn.Module, subset: HeadSubset) -> None:
    """ValueError unless the subset was chosen from this head's V rows."""
    rows = model.get_output_embeddings().weight.shape[0]
    if subset.vocab_size != rows:
        raise ValueError(
            f"the head subset was chosen from a vocabulary of {subset.vocab_size} tokens but "
            f"this model's output head has {rows} rows; choose the subset with this model's "
            "tokenizer"
        )

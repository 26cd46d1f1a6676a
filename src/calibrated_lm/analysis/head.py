"""Extract the output geometry of a causal LM: logits = W (g * u + b) + c with ||u|| <= sqrt(D).

After the final normalisation layer the hidden state is ``g * u + b`` where ``u`` is the
normalised vector: RMSNorm gives ``||u|| = sqrt(D)`` (up to its eps, which only shrinks it),
LayerNorm additionally centres ``u`` (mean 0) and adds a bias ``b``. So the reachable logits
are ``A u + c`` with ``A = W diag(g)`` and ``c = W b + lm_head.bias``. We read the gain and bias
off the norm module by probing it (so Gemma's ``(1 + weight)`` convention or any other
parametrisation is handled by what the module computes, not by its parameter names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from calibrated_lm.errors import UserError

# Where the final norm lives in common transformers architectures, relative to the base model
# (model.model for Llama/Gemma/Qwen/Mistral, model.transformer for GPT-2, ...).
_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm", "final_norm", "norm_f")


@dataclass
class OutputHead:
    """The linear map from normalised hidden state to logits (all tensors float32, on CPU).

    ``weight``: V x D unembedding W. ``gain``: D, effective norm gain g. ``norm_bias``: D or
    None (LayerNorm's b). ``logit_bias``: V or None (lm_head bias). ``centred``: whether the
    norm subtracts the mean (LayerNorm), which further restricts u. ``softcap``: final logit
    softcapping c (logits -> c tanh(z / c)) or None. ``logit_scale``: multiplier on logits
    (1 / training temperature) applied before softcapping.
    """

    weight: Any
    gain: Any
    norm_bias: Any = None
    logit_bias: Any = None
    centred: bool = False
    softcap: float | None = None
    logit_scale: float = 1.0
    norm_type: str = "rmsnorm"

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def radius(self) -> float:
        """``||u|| <= sqrt(D)`` for the normalised vector u."""
        return float(self.dim) ** 0.5

    def effective(self) -> tuple[Any, Any]:
        """``(A, c)`` with logits = ``A u + c``: ``A = s W diag(g)``, ``c = s (W b + bias)``.

        For a centring norm (LayerNorm) u is also orthogonal to the all-ones vector; replacing A
        by ``A (I - 11^T / D)`` lets u range over the whole ball with the same reachable logits.
        """
        a = self.weight * self.gain[None, :]
        if self.centred:
            a = a - a.mean(dim=1, keepdim=True)
        c = None
        if self.norm_bias is not None:
            c = self.weight @ self.norm_bias
        if self.logit_bias is not None:
            c = self.logit_bias.clone() if c is None else c + self.logit_bias
        if self.logit_scale != 1.0:
            a = a * self.logit_scale
            c = None if c is None else c * self.logit_scale
        return a, c


def find_final_norm(model: Any) -> Any:
    """The final normalisation module of a transformers causal LM, or a :class:`UserError`."""
    candidates = []
    for owner in (getattr(model, "base_model", None), getattr(model, "model", None), model):
        if owner is None:
            continue
        for name in _NORM_NAMES:
            module = getattr(owner, name, None)
            if module is not None and hasattr(module, "forward"):
                candidates.append(module)
        # some wrappers nest the decoder one level deeper (e.g. model.model.decoder)
        decoder = getattr(owner, "decoder", None)
        if decoder is not None:
            for name in _NORM_NAMES:
                module = getattr(decoder, name, None)
                if module is not None:
                    candidates.append(module)
    if not candidates:
        raise UserError(
            f"cannot find the final normalisation layer of {type(model).__name__} "
            f"(looked for {', '.join(_NORM_NAMES)} on the base model); the capacity analysis "
            "needs a normalised final hidden state"
        )
    return candidates[0]


def probe_norm(norm: Any, dim: int) -> tuple[Any, Any, bool]:
    """Read ``(gain, bias, centred)`` off a norm module by evaluating it on known inputs.

    With ``v`` of mean 0 and RMS 1 (alternating +-1; for odd D one entry is 0 and the rest are
    rescaled), both RMSNorm and LayerNorm map ``v -> g*v + b`` and ``-v -> -g*v + b``, so
    ``g = (n(v) - n(-v)) / (2 v)`` where v != 0 and ``b = (n(v) + n(-v)) / 2``; a rolled copy of
    v covers the zero entry. A last probe ``v + 3`` tells LayerNorm (which removes the 3) from
    RMSNorm (which does not).
    """
    import torch

    param = next(iter(norm.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    v = torch.ones(dim, dtype=torch.float64)
    v[1::2] = -1.0
    if dim % 2 == 1:
        v[-1] = 0.0
        v = v * (dim / (dim - 1)) ** 0.5
    w = torch.roll(v, 1)
    with torch.no_grad():
        x = torch.stack([v, -v, w, -w, v + 3.0]).to(device=device, dtype=dtype)[None]
        try:
            y = norm(x)[0].double().cpu()
        except Exception as exc:  # noqa: BLE001 - any failure means we cannot model this layer
            raise UserError(
                f"cannot evaluate the final norm layer {type(norm).__name__}: {exc}"
            ) from exc
    gain = torch.where(v != 0, (y[0] - y[1]) / (2 * v), (y[2] - y[3]) / (2 * w))
    bias = (y[0] + y[1]) / 2
    centred_pred = gain * v + bias
    rms_pred = gain * (v + 3.0) / torch.sqrt(((v + 3.0) ** 2).mean())
    centred = bool((y[4] - centred_pred).abs().max() < (y[4] - rms_pred).abs().max())
    scale = float(gain.abs().max()) + 1e-12
    has_bias = bool(bias.abs().max() > 1e-6 * scale)
    return gain.float(), (bias.float() if has_bias else None), centred


def extract_head(model: Any) -> OutputHead:
    """Output geometry of a transformers causal LM (tied or untied head)."""
    get_out = getattr(model, "get_output_embeddings", None)
    lm_head = get_out() if callable(get_out) else None
    if lm_head is None or not hasattr(lm_head, "weight"):
        raise UserError(
            f"{type(model).__name__} has no linear output head (get_output_embeddings() is "
            "None); the capacity analysis needs a causal LM with an unembedding matrix"
        )
    weight = lm_head.weight.detach().float().cpu()
    if weight.dim() != 2:
        raise UserError(f"output head weight has shape {tuple(weight.shape)}, expected (V, D)")
    norm = find_final_norm(model)
    gain, bias, centred = probe_norm(norm, weight.shape[1])
    logit_bias = getattr(lm_head, "bias", None)
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    name = type(norm).__name__
    return OutputHead(
        weight=weight,
        gain=gain,
        norm_bias=bias,
        logit_bias=None if logit_bias is None else logit_bias.detach().float().cpu(),
        centred=centred,
        softcap=float(softcap) if softcap else None,
        logit_scale=float(scale) if isinstance(scale, (int, float)) and scale else 1.0,
        norm_type=f"{name} ({'centred, ' if centred else ''}probed gain)",
    )

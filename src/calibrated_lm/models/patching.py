"""Make a transformers ``*ForCausalLM`` compute its training loss with the fused kernel.

``patch_model`` replaces the model instance's ``forward`` (never its class, so other
instances and ``generate`` on unlabelled input are untouched). When ``labels`` (or
``shift_labels``) are passed, the patched forward runs the base decoder, takes the
final hidden states ``h`` and the output embedding ``W`` (``lm_head.weight``, tied or
not) and returns

    loss = T * mean_t [ -sum_j q_tj log softmax(z_t)_j ]  (+ z_loss * lse(z_t)^2),
    z_t = cap_c( s * (W h_t + b) ) / T,   q_t = (1 - eps) onehot(y_{t+1}) + eps / V,

computed by ``calibrated_lm.loss.linear_cross_entropy`` in chunks, so the N x V logit
matrix is never built. ``s`` is the architecture's own logit multiplier (Cohere's
``logit_scale``, Granite's ``1 / logits_scaling``, 1 elsewhere), ``cap_c(z) = c tanh(z/c)``
with ``c`` the user's ``softcap`` or else the model's ``final_logit_softcapping``
(Gemma 2/3), and ``T`` the training temperature (paper's remedy for large vocabularies;
the loss is multiplied by ``T`` so gradient magnitudes stay comparable). The output
carries ``logits=None`` in that case. Without labels the original forward runs unchanged.

Because ``cap_c(z) / T = cap_{c/T}(z / T)``, temperature is folded into a scale of the
hidden states and of the softcap: the kernel sees one linear map and one softcap.

``head_subset=S`` (issue 12, claim 3) restricts the softmax to the V' tokens of S: the loss
is the one above over the kept rows of ``W`` only (smoothing mass eps / V' per kept token,
targets outside S left out and counted in ``LossStats.n_outside``), a tied head kept tied
unless ``untie_head=True``, and the logits without labels are the full ones with -inf outside S
(``calibrated_lm.models.restricted_head`` has the formulas).

Under HF ``Trainer``'s gradient accumulation the model receives ``num_items_in_batch``;
the loss is then token-summed and divided by it, exactly as transformers' own loss.

The patch never lets a trainer silently train on another loss (plain cross-entropy, or a
smoothed loss from full logits). Three ways around the patched forward are refused with a
``UserError`` naming the fix: a call with ``fused_lm_head=True`` (TRL's own fused NLL head), a
wrapper installed over the patched forward that calls the decoder directly (TRL's
``add_fused_lm_head``, which every stock TRL trainer installs), and ``num_items_in_batch``
without labels (HF ``Trainer`` with ``label_smoothing_factor > 0`` or a ``compute_loss_func``
takes the labels away and builds the full logits). ``calibrated_lm.integrations`` has the
trainers that go through the patch instead.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from calibrated_lm.errors import UserError
from calibrated_lm.loss.validation import check_settings
from calibrated_lm.models.head_subset import HeadSubset
from calibrated_lm.models.restricted_head import RestrictedHead, check_vocab
from calibrated_lm.models.restricted_head import untie_head as _untie_head

_PATCH_ATTR = "_calibrated_lm_patch"
# The decoder hook that refuses calls from a wrapper bypassing the patched forward.
_GUARD_ATTR = "_calibrated_lm_guard"
# patch_model sets ``accepts_loss_kwargs`` on the instance; what was there before (or _UNSET).
_ACCEPTS_ATTR = "_calibrated_lm_accepts_loss_kwargs"
_UNSET = object()
_INTEGRATIONS_HINT = (
    "train it with calibrated_lm.integrations.trl.CalibratedSFTTrainer (a drop-in for "
    "trl.SFTTrainer), or call calibrated_lm.unpatch_model(model) before handing it to a trainer "
    "that should use its own loss"
)
# A training step's activations dwarf a (1024 x V) logit block (512 MiB at V = 262,144 in
# bf16), and blocks of 1024 tokens keep the weight gradient's read-modify-write to ~20% of the
# products' time even for small hidden sizes (loss.chunking.grad_block_rows).
DEFAULT_MIN_BLOCK_ROWS = 1024

# model_type values whose *ForCausalLM.forward is exactly
# ``lm_head(base(...).last_hidden_state)`` (+ Gemma 2/3's final softcap, read from config).
SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "gemma",
    "gemma2",
    "gemma3_text",
    "qwen2",
    "qwen3",
    "phi3",
)

# Loss-only keyword arguments transformers passes to ``forward``; the decoder must not see them.
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


@dataclass(frozen=True)
class PatchConfig:
    """What the patched forward applies; ``softcap``/``logit_scale`` already resolved."""

    label_smoothing: float
    softcap: float | None
    temperature: float
    z_loss: float
    logit_scale: float
    path: str  # "known" (architecture in SUPPORTED_MODEL_TYPES) or "generic"
    impl: str = "auto"  # linear_cross_entropy's implementation switch
    min_block_rows: int = 0  # linear_cross_entropy's gradient-block floor
    head: RestrictedHead | None = None  # the softmax's kept tokens (head_subset), or all V


@dataclass
class LossStats:
    """Calibration statistics of one labelled forward, averaged over the target tokens.

    With a head subset, ``n_tokens`` counts the scored targets inside it and ``n_outside``
    the targets outside it, which the loss leaves out (0 without a subset)."""

    n_tokens: int
    confidence: float
    accuracy: float
    entropy: float
    n_outside: int = 0


def _output_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if head is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"patch_model: {type(model).__name__} has no output embedding (get_output_embeddings() "
            "returned no module with a 2-D weight); only causal language models with a linear "
            f"head are supported (known: {', '.join(SUPPORTED_MODEL_TYPES)}, or any model with "
            "get_output_embeddings())."
        )
    return head


def _resolve(
    model: nn.Module, label_smoothing, softcap, temperature, z_loss, impl="auto", min_block_rows=0
) -> PatchConfig:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"patch_model: {type(model).__name__} is not a decoder-only transformers causal LM; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} and generic *ForCausalLM models."
        )
    check_settings(
        label_smoothing=label_smoothing,
        softcap=softcap,
        temperature=temperature,
        z_loss=z_loss,
        impl=impl,
        min_block_rows=min_block_rows,
        prefix="patch_model: ",
    )
    base = getattr(model, "base_model", model)
    if base is model:
        raise ValueError(
            f"patch_model: {type(model).__name__} exposes no base decoder (model.base_model); "
            "pass the *ForCausalLM model, not the bare decoder."
        )
    _output_head(model)
    model_type = getattr(config, "model_type", "")
    path = "known" if model_type in SUPPORTED_MODEL_TYPES else "generic"
    model_cap = getattr(config, "final_logit_softcapping", None)
    cap = float(softcap) if softcap is not None else (float(model_cap) if model_cap else None)
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale = float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale = 1.0 / float(config.logits_scaling)
    return PatchConfig(
        label_smoothing=float(label_smoothing),
        softcap=cap,
        temperature=float(temperature) if temperature is not None else 1.0,
        z_loss=float(z_loss),
        logit_scale=scale,
        path=path,
        impl=impl,
    )


def _slice_positions(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:, :]
    return hidden[:, logits_to_keep, :]


def fused_lm_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    cfg: PatchConfig,
    *,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int | None = -100,
    reduction: str | None = None,
    return_stats: bool = False,
) -> tuple[torch.Tensor, LossStats | None]:
    """Loss of ``cfg`` from hidden states ``(B, L, D)`` and ``head`` (module docstring formula).

    ``labels`` are unshifted (position ``t`` is scored against ``labels[t+1]``);
    ``shift_labels`` are already aligned with ``hidden``. ``reduction`` defaults to
    ``"mean"`` over target tokens, or to ``sum / num_items_in_batch`` when that is given;
    ``"sum"`` returns the token sum (times ``T``). ``ignore_index`` marks labels to skip
    (None: none). ``head`` must be on ``hidden``'s device (a DTensor head is gathered onto its
    mesh's device first). With ``cfg.head`` (a head subset) only its rows of ``head`` enter
    the loss, the targets are re-indexed into them and those outside it are ignored (their
    count in ``stats.n_outside``). Returns ``(loss, stats or None)``.
    """
    from calibrated_lm.loss import linear_cross_entropy

    weight = head.weight
    bias = getattr(head, "bias", None)
    # A head sharded on its own (FSDP2 fully_shard(lm_head), tensor parallel) is not gathered
    # by its module hooks here, since the head module is never called: gather it explicitly.
    # full_tensor() is differentiable; its backward hands each rank its shard's gradient. The
    # gathered tensor lies on the device of the head's mesh (cuda:N for a CUDA mesh, cpu for a
    # gloo CPU mesh), which must be the hidden states' device: nothing is moved implicitly.
    weight = _full(weight)
    bias = _full(bias) if bias is not None else None
    if cfg.head is not None:
        # Rows first, cast after: only V' x D elements are copied; the backward of
        # index_select hands the gradient to the kept rows of the parameter.
        weight = cfg.head.rows(weight)
        bias = cfg.head.rows(bias) if bias is not None else None
    if weight.device != hidden.device:
        raise ValueError(
            f"fused_lm_loss: the output head's weight is on {weight.device} but the hidden "
            f"states are on {hidden.device}; put the head on the decoder's device (a head "
            "sharded on its own needs a device mesh of that device type)."
        )
    # Autocast does not reach into a custom autograd function: cast as F.linear would.
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    scale = cfg.logit_scale / cfg.temperature
    if scale != 1.0:
        hidden = hidden * scale
        bias = bias * scale if bias is not None else None
    softcap = cfg.softcap / cfg.temperature if cfg.softcap is not None else None
    if shift_labels is not None:
        targets, shift = shift_labels.to(hidden.device), False
    elif labels is not None:
        targets, shift = labels.to(hidden.device), True
    else:
        raise ValueError("fused_lm_loss needs labels or shift_labels")
    n_outside = None
    if cfg.head is not None:
        targets, ignore_index, n_outside = cfg.head.remap(targets, ignore_index, shift)
    if reduction is None:
        reduction = "sum" if num_items_in_batch is not None else "mean"
    out = linear_cross_entropy(
        hidden,
        weight,
        targets,
        bias=bias,
        label_smoothing=cfg.label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
        softcap=softcap,
        z_loss=cfg.z_loss,
        shift=shift,
        return_stats=return_stats,
        impl=cfg.impl,
        min_block_rows=cfg.min_block_rows,
    )
    loss, stats = out if return_stats else (out, None)
    if num_items_in_batch is not None and reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    if cfg.temperature != 1.0:
        loss = loss * cfg.temperature
    summary = None
    if return_stats:
        summary = _summarise(stats, targets, shift, ignore_index)
        if n_outside is not None:
            summary = dataclasses.replace(summary, n_outside=int(n_outside))
    return loss, summary


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (on its mesh's device), or ``t`` itself."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t


def _summarise(
    stats: Any, targets: torch.Tensor, shift: bool, ignore_index: int | None
) -> LossStats:
    """Average the kernel's per-token statistics over the scored (non-ignored) tokens."""
    tgt = targets[..., 1:] if shift else targets
    if ignore_index is None:  # linear_cross_entropy's "ignore no target"
        valid = torch.ones_like(tgt, dtype=torch.bool)
    else:
        valid = tgt != ignore_index
    n = int(valid.sum())

    def get(*names: str) -> torch.Tensor:
        for name in names:
            value = stats.get(name) if isinstance(stats, dict) else getattr(stats, name, None)
            if value is not None:
                return value
        raise KeyError(f"linear_cross_entropy stats lack any of {names}")

    def mean(value: torch.Tensor) -> float:
        value = value.detach()
        if shift and value.shape[-1] == targets.shape[-1]:
            value = value[..., :-1]
        value = value.reshape(valid.shape).float()
        return float(value[valid].sum() / max(n, 1))

    return LossStats(
        n_tokens=n,
        confidence=mean(get("max_prob", "confidence")),
        accuracy=mean(get("correct", "argmax_correct", "accuracy")),
        entropy=mean(get("entropy")),
    )


@functools.cache
def _output_class() -> type:
    """``CausalLMOutputWithPast`` with a ``loss_stats`` field (built once, on first use).

    A real field, not a plain attribute: accelerate's mixed-precision wrapper rebuilds the
    output from its items (``type(out)(dict(out))``), which keeps fields and drops attributes.
    ``loss_stats`` is None, so absent from the dict and tuple views, unless stats were asked for.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    @dataclass
    class CalibratedCausalLMOutput(CausalLMOutputWithPast):
        loss_stats: LossStats | None = None

    return CalibratedCausalLMOutput


def _bypass_message(model: nn.Module, cfg: PatchConfig, how: str) -> str:
    return (
        f"calibrated_lm: {type(model).__name__} was patched by patch_model(label_smoothing="
        f"{cfg.label_smoothing}), but {how}, so the trainer would compute its own loss (TRL's: "
        f"plain cross-entropy) instead of the label-smoothed one; {_INTEGRATIONS_HINT}."
    )


def _make_forward(model: nn.Module, original, cfg: PatchConfig, depth: list[int]):
    """The patched forward; ``depth[0]`` counts its calls in progress (for the decoder guard)."""
    base = model.base_model
    params = inspect.signature(original).parameters

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any):
        # Positional calls (model(input_ids, attention_mask, ...)) bound to names first.
        if args:
            names = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
            kwargs.update(zip(names, args))
        if kwargs.pop("fused_lm_head", False):
            # TRL's SFT/DPO/GRPO trainers ask for their own fused NLL head this way (reached here
            # when the patch was applied after the trainer installed that head).
            raise UserError(_bypass_message(model, cfg, "it was called with fused_lm_head=True"))
        labels = kwargs.pop("labels", None)
        depth[0] += 1
        try:
            if labels is None and kwargs.get("shift_labels") is None:
                if kwargs.get("num_items_in_batch") is not None:
                    # Only a trainer that wants a loss passes num_items_in_batch; without labels
                    # it means HF Trainer took them away (label_smoothing_factor > 0 or a
                    # compute_loss_func) and will compute its own loss from the full logits.
                    raise UserError(
                        f"calibrated_lm: {type(model).__name__} was patched by patch_model("
                        f"label_smoothing={cfg.label_smoothing}), but the trainer removed the "
                        "labels before calling it (transformers.Trainer does so when "
                        "label_smoothing_factor > 0 or a compute_loss_func is set) and would "
                        "compute its loss from the full logits; leave label_smoothing_factor at 0 "
                        "and drop compute_loss_func (the patch already smooths), or use "
                        "calibrated_lm.integrations.hf_trainer.CalibratedTrainer, which takes "
                        "label_smoothing_factor as the patch's label_smoothing."
                    )
                out = original(**kwargs)
                return _restrict_logits(out, cfg.head) if cfg.head is not None else out
            return _fused_forward(kwargs, labels)
        finally:
            depth[0] -= 1

    def _fused_forward(kwargs: dict[str, Any], labels: torch.Tensor | None):
        loss_kwargs = {k: kwargs.pop(k) for k in _LOSS_KWARGS if k in kwargs}
        # Private switches of calibrated_lm's own training loop and trainers (not transformers').
        reduction = kwargs.pop("calibrated_lm_reduction", None)
        want_stats = bool(kwargs.pop("calibrated_lm_stats", False))
        logits_to_keep = kwargs.pop("logits_to_keep", 0)
        return_dict = kwargs.pop("return_dict", None)
        outputs = base(**kwargs)
        hidden = _slice_positions(outputs.last_hidden_state, logits_to_keep)
        loss, stats = fused_lm_loss(
            hidden,
            model.get_output_embeddings(),
            cfg,
            labels=labels,
            reduction=reduction,
            return_stats=want_stats,
            **loss_kwargs,
        )
        output_class = _output_class()
        # transformers 5.x renamed the field past_key_values to cache (the old name warns).
        cache_field = "cache" if "cache" in output_class.__dataclass_fields__ else "past_key_values"
        result = output_class(
            loss=loss,
            logits=None,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
            loss_stats=stats,
            **{cache_field: getattr(outputs, cache_field, None)},
        )
        return result.to_tuple() if return_dict is False else result

    forward.__calibrated_lm_original__ = original
    return forward


def _restrict_logits(out: Any, head: RestrictedHead) -> Any:
    """The unlabelled forward's output with -inf at the logits of tokens outside the subset
    (a ModelOutput's ``logits``, or the first item of a ``return_dict=False`` tuple)."""
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        out.logits = head.mask_logits(logits)
        return out
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return (head.mask_logits(out[0]), *out[1:])
    return out


def _make_guard(model: nn.Module, forward, cfg: PatchConfig, depth: list[int]):
    """A forward pre-hook for the base decoder: refuse calls that bypass the patched forward.

    TRL's ``add_fused_lm_head`` (installed by every stock TRL trainer) replaces
    ``model.forward`` with a wrapper that, given ``fused_lm_head=True``, runs the decoder itself
    and scores plain log-likelihoods: our forward is never reached. A decoder call while some
    wrapper sits over the patched forward and no patched forward is running is that case.
    Direct decoder calls on a model whose forward is still ours stay allowed (feature
    extraction, ``_check_generic``); so do wrappers that call through (accelerate's autocast).
    """

    def guard(module: nn.Module, args: Any) -> None:
        if depth[0] > 0 or model.__dict__.get("forward") is forward:
            return
        raise UserError(
            _bypass_message(
                model,
                cfg,
                "a wrapper over its forward (TRL's fused LM head, which stock trl trainers "
                "install) ran its decoder directly",
            )
        )

    return guard


def _check_generic(model: nn.Module, cfg: PatchConfig) -> None:
    """For an unlisted architecture, prove on 8 tokens that logits == head(base(x)) (+ cap)."""
    head = model.get_output_embeddings()
    device = head.weight.device
    if device.type == "meta":
        return
    vocab = head.weight.shape[0]
    ids = torch.arange(8, device=device).remainder(vocab).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(input_ids=ids).logits.float()
            hidden = model.base_model(input_ids=ids).last_hidden_state
            mine = head(hidden).float() * cfg.logit_scale
            if cfg.softcap is not None:
                mine = cfg.softcap * torch.tanh(mine / cfg.softcap)
    finally:
        model.train(was_training)
    tol = 1e-3 * max(1.0, float(ref.abs().max()))
    if ref.shape != mine.shape or float((ref - mine).abs().max()) > tol:
        raise ValueError(
            f"patch_model: {type(model).__name__} (model_type {model.config.model_type!r}) "
            "post-processes its logits in a way the fused loss does not reproduce; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} and models whose logits are lm_head(hidden)."
        )


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a PEFT wrapper (``PeftModel.get_base_model()``: the
    model whose layers carry the adapters, and whose forward the wrapper ends up calling), or
    ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


def patch_model(
    model: nn.Module,
    label_smoothing: float = 0.1,
    softcap: float | None = None,
    temperature: float | None = None,
    z_loss: float = 0.0,
    *,
    impl: str = "auto",
    min_block_rows: int = DEFAULT_MIN_BLOCK_ROWS,
    head_subset: HeadSubset | None = None,
    untie_head: bool = False,
) -> nn.Module:
    """Make ``model(…, labels=…)`` return the fused label-smoothed loss (see module docstring).

    ``softcap=None`` keeps the model's own ``final_logit_softcapping`` (Gemma 2/3); a value
    replaces it for the loss. ``impl`` is passed to ``linear_cross_entropy`` (auto: Triton on
    CUDA, chunked PyTorch elsewhere), and so is ``min_block_rows`` (tokens per logit block in
    the gradient pass: more memory, fewer weight-gradient read-modify-writes; 0 keeps the
    loss's own memory-fraction rule). Re-patching replaces the previous settings. Returns
    ``model``. A PEFT model (``get_peft_model(...)``) is patched inside: its base causal LM,
    adapters included, gets the fused forward, so both orders of ``patch_model`` and
    ``get_peft_model`` train on the fused loss.

    ``head_subset`` restricts the output softmax to its V' tokens (module docstring): the loss
    over the kept rows only, with eps / V' of smoothing per kept token and targets outside
    the subset left out (counted in ``loss_stats.n_outside``); the logits without labels are
    the full-V ones with -inf outside it. A head tied to the input embedding stays tied by
    default: the shared matrix keeps all V rows for the inputs, and the kept rows get the
    head's gradients as without a subset (so a restricted run differs from a full one in the
    softmax's support only). ``untie_head=True`` gives the head its own copy first
    (``config.tie_word_embeddings = False``; it stays untied after ``unpatch_model``). Under HF
    Trainer's ``num_items_in_batch`` the loss is divided by the trainer's count of targets,
    which includes those outside the subset. Its ``vocab_size`` must be the head's rows.

    The patched model also declares ``accepts_loss_kwargs = True`` (HF Trainer then passes
    ``num_items_in_batch``, so gradient accumulation is exact) and refuses, with a
    ``UserError`` naming the fix, the calls that would bypass the fused loss: see the module
    docstring (stock TRL trainers, HF Trainer's ``label_smoothing_factor``).
    Raises ``ValueError`` for models without a linear output head or base decoder, or whose
    logits are not ``head(hidden)`` up to the known scalings, or a head subset of another
    vocabulary size.
    """
    outer, model = model, _causal_lm(model)
    cfg = _resolve(model, label_smoothing, softcap, temperature, z_loss, impl, min_block_rows)
    head = None
    if head_subset is not None:
        check_vocab(model, head_subset)
        head = RestrictedHead(head_subset)
    cfg = dataclasses.replace(cfg, min_block_rows=min_block_rows, head=head)
    unpatch_model(model)
    if untie_head:
        if head is None:
            raise ValueError("patch_model: untie_head=True needs a head_subset")
        _untie_head(model)
    if cfg.path == "generic":
        _check_generic(model, cfg)
    original = model.forward
    depth = [0]
    forward = _make_forward(model, original, cfg, depth)
    model.forward = forward
    guard = model.base_model.register_forward_pre_hook(_make_guard(model, forward, cfg, depth))
    setattr(model, _GUARD_ATTR, guard)
    # HF Trainer passes num_items_in_batch (exact gradient accumulation) only to models that
    # declare they accept it; the patched forward always does, whatever the class says.
    setattr(model, _ACCEPTS_ATTR, model.__dict__.get("accepts_loss_kwargs", _UNSET))
    model.accepts_loss_kwargs = True
    setattr(model, _PATCH_ATTR, cfg)
    return outer


def unpatch_model(model: nn.Module) -> nn.Module:
    """Restore the forward that ``patch_model`` replaced (no-op if not patched).

    Raises ``UserError`` when a wrapper that does not carry the patched forward's marker (TRL's
    fused LM head) was installed over it since: the original cannot be put back under it.
    """
    outer, model = model, _causal_lm(model)
    if getattr(model, _PATCH_ATTR, None) is None:
        return outer
    original = getattr(model.forward, "__calibrated_lm_original__", None)
    if original is None:
        raise UserError(
            f"unpatch_model: another wrapper (TRL's fused LM head, accelerate's autocast) now sits "
            f"over the patched forward of {type(model).__name__}, so it cannot be restored; "
            "unpatch (or re-patch) the model before handing it to a trainer."
        )
    getattr(model, _GUARD_ATTR).remove()
    delattr(model, _GUARD_ATTR)
    previous = getattr(model, _ACCEPTS_ATTR)
    delattr(model, _ACCEPTS_ATTR)
    if previous is _UNSET:
        del model.__dict__["accepts_loss_kwargs"]
    else:
        model.accepts_loss_kwargs = previous
    # The original was the bound class method: dropping the instance attribute restores it.
    if "forward" in model.__dict__:
        del model.__dict__["forward"]
    if model.forward != original:
        model.forward = original
    delattr(model, _PATCH_ATTR)
    return outer


def patch_config(model: nn.Module) -> PatchConfig | None:
    """The settings a patched model uses, or ``None`` when it is not patched."""
    return getattr(_causal_lm(model), _PATCH_ATTR, None)

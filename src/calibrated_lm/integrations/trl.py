"""``CalibratedSFTTrainer``: TRL's ``SFTTrainer`` on the fused label-smoothed loss.

Stock ``trl.SFTTrainer`` (1.x) never calls the model's own loss: it installs a fused LM head of
its own (``add_fused_lm_head``) and calls the model with ``fused_lm_head=True``, which scores
plain log-likelihoods. With ``label_smoothing_factor`` it builds the full logits instead. On a
``patch_model``-patched model both are refused (``calibrated_lm.models.patching``); this
subclass is the way through::

    model = patch_model(AutoModelForCausalLM.from_pretrained(path), label_smoothing=0.1)
    trainer = CalibratedSFTTrainer(model=model, args=SFTConfig(...), train_dataset=data,
                                   processing_class=tokenizer)

Everything else is TRL's: dataset formats (text, prompt-completion, messages), the collator
and its masks (``completion_only_loss``, ``assistant_only_loss``), packing, PEFT, evaluation.
Only ``compute_loss`` differs: the loss is the patched forward's (through
``transformers.Trainer.compute_loss``, so ``num_items_in_batch`` and
``average_tokens_across_devices`` are handled as for any model), and TRL's metrics come from
the kernel's own statistics of the same pass:

* ``entropy``, ``mean_token_accuracy``: over the scored tokens, as TRL computes them (equal to
  TRL's values at the patch's default temperature 1; with ``temperature``/``softcap`` set they
  describe the distribution the loss scores);
* ``num_tokens``: TRL's running count of input tokens;
* ``mean_token_confidence`` (ours): the mean top-1 probability, to read against accuracy.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import transformers
from torch import nn

from calibrated_lm.errors import UserError
from calibrated_lm.integrations._common import check_tested_versions, resolve_label_smoothing

try:
    import trl
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "calibrated_lm.integrations.trl needs trl: pip install 'calibrated-lm[trl]' "
        "(or pip install 'trl>=1.16.0,<1.17')."
    ) from exc

__all__ = ["CalibratedSFTTrainer"]

_NAME = "CalibratedSFTTrainer"


class CalibratedSFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` whose loss is the ``patch_model`` fused label-smoothed loss.

    Takes exactly ``trl.SFTTrainer``'s arguments. The model (or the one TRL loads from a name)
    must be patched, or ``args.label_smoothing_factor > 0`` patches it with that eps (other
    settings at their defaults). Raises ``UserError`` (a ``ValueError``) for: trl or
    transformers outside the tested versions; an unpatched model with no
    ``label_smoothing_factor``; a ``label_smoothing_factor`` other than the patch's eps;
    ``loss_type="dft"``, ``compute_loss_func``, an MoE router auxiliary loss and DeepSpeed
    sequence parallelism, none of which the patched loss computes.
    """

    def __init__(self, model: Any, args: Any = None, *rest: Any, **kwargs: Any) -> None:
        check_tested_versions("calibrated_lm.integrations.trl", "trl", "transformers")
        factor = float(getattr(args, "label_smoothing_factor", 0.0) or 0.0)
        # Fail before TRL tokenizes the datasets where the answer is already known.
        if isinstance(model, nn.Module):
            resolve_label_smoothing(model, factor, _NAME, "SFTConfig", apply=False)
        _refuse(
            getattr(args, "loss_type", "nll") == "dft", "loss_type='dft'", "set loss_type='nll'"
        )
        _refuse(
            kwargs.get("compute_loss_func") is not None,
            "compute_loss_func",
            "drop compute_loss_func (the patched model computes the loss)",
        )
        with warnings.catch_warnings():
            # TRL warns that label_smoothing_factor costs a full-logits pass: not on this path.
            warnings.filterwarnings("ignore", message=r"`label_smoothing_factor` is deprecated")
            super().__init__(model, args, *rest, **kwargs)
        _refuse(self.compute_loss_func is not None, "compute_loss_func", "drop compute_loss_func")
        _refuse(
            self.aux_loss_enabled,
            "an MoE router auxiliary loss",
            "set router_aux_loss_coef=0.0 in the SFTConfig",
        )
        pc = getattr(self.accelerator, "parallelism_config", None)
        _refuse(
            pc is not None and getattr(pc, "sp_enabled", False),
            "sequence parallelism",
            "train without sequence parallelism (context parallelism is supported)",
        )
        # The final model: TRL may have loaded it from a name or wrapped it with PEFT.
        resolve_label_smoothing(self.model, factor, _NAME, "SFTConfig", apply=True)
        # The loss is the model's (labels kept, not handed to a LabelSmoother), and the patched
        # forward always takes num_items_in_batch: gradient accumulation stays exact.
        self.label_smoother = None
        self.model_accepts_loss_kwargs = True

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The patched model's loss on ``inputs``, with TRL's metrics recorded from its stats.

        ``return_outputs=True`` (evaluation with ``compute_metrics``) costs a second forward
        without labels, since the fused loss builds no logits.
        """
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False  # as TRL: no KV cache in training forwards
        loss, outputs = transformers.Trainer.compute_loss(
            self,
            model,
            {**inputs, "calibrated_lm_stats": True},
            return_outputs=True,
            num_items_in_batch=num_items_in_batch,
        )
        stats = outputs["loss_stats"] if "loss_stats" in outputs else None
        if stats is None:
            raise UserError(
                f"{_NAME}: the model's forward returned no calibrated_lm statistics, so it is "
                "not the patched forward (another wrapper replaced it): patch the model last, "
                "after any other library that replaces model.forward."
            )
        self._record_metrics(mode, inputs, stats, loss.device)
        if not return_outputs:
            return loss
        with torch.no_grad():
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        return loss, outputs

    def _record_metrics(
        self, mode: str, inputs: dict[str, Any], stats: Any, device: torch.device
    ) -> None:
        """TRL's ``entropy``/``mean_token_accuracy``/``num_tokens`` bookkeeping, on our stats.

        Gathered as TRL gathers them (token-weighted sums across processes, then one ratio per
        micro-batch; ``log`` averages the micro-batches since the last log).
        """
        gather = self.accelerator.gather_for_metrics

        def total(value: float) -> torch.Tensor:
            return gather(torch.tensor(value, dtype=torch.float64, device=device)).sum()

        n = stats.n_tokens
        num_valid = total(float(n))
        sums = {
            "entropy": total(stats.entropy * n),
            "mean_token_accuracy": total(stats.accuracy * n),
            "mean_token_confidence": total(stats.confidence * n),
        }
        for key, value in sums.items():
            self._metrics[mode][key].append((value / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            # Without an attention mask (padding-free batches) every position is a real token.
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            elif "position_ids" in inputs:
                local = torch.tensor(inputs["position_ids"].size(1), device=device)
            else:
                raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
            self._total_train_tokens += gather(local).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


def _refuse(condition: bool, setting: str, fix: str) -> None:
    if condition:
        raise UserError(
            f"{_NAME} trains on the patched model's fused label-smoothed loss, which does not "
            f"compute {setting}: {fix}."
        )

"""``CalibratedTrainer``: ``transformers.Trainer`` that takes ``label_smoothing_factor`` as the
patch's eps.

Stock ``Trainer`` already trains a ``patch_model``-patched model on the fused loss, with exact
gradient accumulation, as long as ``label_smoothing_factor`` is 0: the patch does the
smoothing. With ``label_smoothing_factor > 0`` stock ``Trainer`` takes the labels away from
the model and applies its ``LabelSmoother`` to the full logits (the right loss, none of the
memory saving); the patched model refuses that call with a sentence naming the fix. This
subclass is for configurations that carry ``label_smoothing_factor`` (scripts built on
``HfArgumentParser``): it checks the factor against the patch, patches an unpatched model with
it, and leaves the loss to the model, so ``num_items_in_batch`` keeps accumulation exact.
"""

from __future__ import annotations

from typing import Any

import transformers

from calibrated_lm.errors import UserError
from calibrated_lm.integrations._common import check_tested_versions, resolve_label_smoothing

__all__ = ["CalibratedTrainer"]

_NAME = "CalibratedTrainer"


class CalibratedTrainer(transformers.Trainer):
    """``transformers.Trainer`` on the ``patch_model`` fused loss, with ``label_smoothing_factor``.

    Takes ``transformers.Trainer``'s arguments. The model must be patched, or
    ``args.label_smoothing_factor > 0`` patches it with that eps (other settings at their
    defaults); a factor equal to the patch's eps is accepted as a record of it. Raises
    ``UserError`` (a ``ValueError``) for: transformers outside the tested versions; an unpatched
    model with no ``label_smoothing_factor``; a ``label_smoothing_factor`` other than the
    patch's eps; ``compute_loss_func`` (the model computes the loss); ``model_init`` (a model
    re-created by the trainer would come back unpatched).
    """

    def __init__(self, model: Any = None, args: Any = None, *rest: Any, **kwargs: Any) -> None:
        check_tested_versions("calibrated_lm.integrations.hf_trainer", "transformers")
        for name, fix in (
            ("compute_loss_func", "drop compute_loss_func (the patched model computes the loss)"),
            ("model_init", "pass a patched model instead of model_init"),
        ):
            if kwargs.get(name) is not None:
                raise UserError(f"{_NAME} does not support {name}: {fix}.")
        if model is None:
            raise UserError(f"{_NAME} needs a model: pass model=patch_model(your_model, ...).")
        factor = float(getattr(args, "label_smoothing_factor", 0.0) or 0.0)
        resolve_label_smoothing(model, factor, _NAME, "TrainingArguments", apply=True)
        super().__init__(model, args, *rest, **kwargs)
        if self.compute_loss_func is not None or self.model_init is not None:
            raise UserError(f"{_NAME} does not support compute_loss_func or model_init: drop it.")
        # The loss is the model's: labels go to the patched forward (not to a LabelSmoother
        # over full logits), and it always takes num_items_in_batch, whatever the class says.
        self.label_smoother = None
        self.model_accepts_loss_kwargs = True

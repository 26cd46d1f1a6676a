"""Integrations with the tools people already train and evaluate with (lm-evaluation-harness,
TRL, the transformers Trainer). Each submodule imports its tool lazily or on import of that
submodule only, so ``import calibrated_lm`` never needs them."""

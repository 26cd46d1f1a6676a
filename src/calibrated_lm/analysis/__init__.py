"""Over-confidence capacity of output heads: closed-form theory and exact per-token optimisation.

See ``docs/theory.md`` for the derivations and ``calibrated-lm capacity --help`` for the tool.
"""

"""Calibration evaluation of causal LMs on multiple-choice benchmarks (``calibrated-lm eval``/``compare``)."""

"""Triton kernels, one per file: row statistics (``row_update``), in-place row gradient
(``row_grad``), fused logits-and-statistics forward without gradient (``fused_forward``), and
shared device helpers (``math``)."""

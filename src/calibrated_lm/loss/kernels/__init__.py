"""Triton kernels, one per file: row statistics update and in-place row gradient."""

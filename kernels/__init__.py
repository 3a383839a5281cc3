"""Triton kernels for fastpbn (installed as fastpbn.kernels)."""

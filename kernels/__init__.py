"""Triton kernels, installed as ``fastpeft.kernels``. Kernels only: no modules, no policy."""

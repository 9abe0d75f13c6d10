"""Triton kernels, installed as `qlora70.kernels`. Reached only through `qlora70.ops`."""

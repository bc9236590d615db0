"""Triton kernels. Set TRITON_INTERPRET=1 before importing this package to run them on the CPU."""
from .weight_only_matmul import weight_only_matmul, weight_only_matmul_ref

__all__ = ["weight_only_matmul", "weight_only_matmul_ref"]

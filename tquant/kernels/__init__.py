"""Triton kernels. Public entry point: tquant.kernels.weight_only_matmul.weight_only_matmul.

Set TRITON_INTERPRET=1 before importing any kernel module to run the kernels on the CPU interpreter.
"""

"""Which path a quantized module runs: its Triton kernels or its torch reference.

    module.backend = "auto"    kernels for CUDA inputs, the torch reference otherwise (default)
                     "triton"  kernels always (on the CPU only under TRITON_INTERPRET=1)
                     "torch"   the reference always
"""
from __future__ import annotations

import torch
from torch import nn

BACKENDS = ("auto", "triton", "torch")


def use_kernel(module: nn.Module, x: torch.Tensor) -> bool:
    """True when `module` should run its Triton kernel on input x (checking its last dim too)."""
    if x.shape[-1] != module.in_features:
        raise ValueError(f"{type(module).__name__} expects last dim {module.in_features}, got {tuple(x.shape)}")
    if module.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {module.backend!r}")
    return module.backend == "triton" or (module.backend == "auto" and x.is_cuda)

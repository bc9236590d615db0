"""PackedLinear: an nn.Linear replacement holding a K-packed 2/3/4/8-bit weight (tquant.formats.packing).

Buffers (the layout every weight-only kernel reads):
    qweight int32 [ceil(K / (32 // bits)), N]     packed codes
    scales  [G, N], zeros [G, N]                  float, G = K // group_size, zeros integer-valued
    perm    int32 [K] (only with act-order storage): y = x[..., perm] @ W^T
    bias    [N] (optional)
    W[n, k] = (code(k, n) - zeros[k // group_size, n]) * scales[k // group_size, n]
forward: a Triton kernel on CUDA (or on CPU under TRITON_INTERPRET=1 with backend="triton"), else the
torch reference (dequantize + matmul).
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats.weights import QuantizedWeight
from .backend import use_kernel
from .packed_weight import load_packed, register_packed



class PackedLinear(nn.Module):
    def __init__(self, in_features, out_features, *, bits, group_size, bias=False, has_perm=False,
                 dtype=torch.float16, device=None):
        super().__init__()
        register_packed(self, in_features, out_features, bits=bits, group_size=group_size, dtype=dtype, device=device)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.backend = "auto"
        self.register_buffer("perm", torch.zeros(in_features, dtype=torch.int32, device=device) if has_perm else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> "PackedLinear":
        n, k = qw.codes.shape
        dev = qw.codes.device
        mod = cls(k, n, bits=qw.bits, group_size=qw.group_size, bias=bias is not None,
                  has_perm=qw.perm is not None, dtype=dtype, device=dev)
        load_packed(mod, qw)
        if qw.perm is not None:
            mod.perm.copy_(qw.perm)
        if bias is not None:
            mod.bias.copy_(bias.detach())
        return mod

    def layer_spec(self) -> dict:
        """What tquant.load needs to rebuild this module (stored in the saved quantization_config)."""
        return {"type": "packed_linear", "bits": self.bits, "group_size": self.group_size,
                "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "has_perm": self.perm is not None}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype) -> "PackedLinear":
        return cls(spec["in_features"], spec["out_features"], bits=spec["bits"], group_size=spec["group_size"],
                   bias=spec["bias"], has_perm=spec["has_perm"], dtype=dtype, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.weight_only_matmul import weight_only_matmul, weight_only_matmul_ref

        fn = weight_only_matmul if use_kernel(self, x) else weight_only_matmul_ref
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.scales.dtype:
            x2 = x2.to(self.scales.dtype)
        y = fn(x2, self.qweight, self.scales, self.zeros, bits=self.bits, group_size=self.group_size,
               in_features=self.in_features, perm=self.perm, bias=self.bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, act_order={self.perm is not None}")

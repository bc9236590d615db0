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

from ..formats.weights import QuantizedWeight
from .base import QuantizedLinear
from .packed_weight import load_packed, register_packed


class PackedLinear(QuantizedLinear, spec_type="packed_linear", weight_type=QuantizedWeight):
    spec_fields = ("bits", "group_size", "in_features", "out_features", "bias", "has_perm")

    def __init__(self, in_features, out_features, *, bits, group_size, bias=False, has_perm=False,
                 dtype=torch.float16, device=None):
        super().__init__(in_features, out_features, bias=bias, perm=has_perm, dtype=dtype, device=device)
        register_packed(self, in_features, out_features, bits=bits, group_size=group_size, dtype=dtype, device=device)
        self.bits, self.group_size = bits, group_size

    @classmethod
    def stores(cls, qw: QuantizedWeight) -> bool:
        return qw.act_bits is None  # weight-only; ActQuantLinear takes the rest

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> "PackedLinear":
        n, k = qw.codes.shape
        mod = cls(k, n, bits=qw.bits, group_size=qw.group_size, bias=bias is not None,
                  has_perm=qw.perm is not None, dtype=dtype, device=qw.codes.device)
        load_packed(mod, qw)
        mod.copy_optional(perm=qw.perm, bias=bias)
        return mod

    def validate_buffers(self, check) -> None:
        check("qweight", self.qweight, torch.int32)  # every bit pattern is a code in [0, 2^bits)
        check("scales", self.scales, "model")
        check("zeros", self.zeros, "model")

    def _matmul(self, x2: torch.Tensor, kernel: bool) -> torch.Tensor:
        from ..kernels.weight_only_matmul import weight_only_matmul, weight_only_matmul_ref

        fn = weight_only_matmul if kernel else weight_only_matmul_ref
        y = fn(x2.to(self.scales.dtype), self.qweight, self.scales, self.zeros, bits=self.bits,
               group_size=self.group_size, in_features=self.in_features, perm=self.perm, bias=self.bias)
        return y.to(x2.dtype)

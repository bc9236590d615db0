"""BCQLinear: an nn.Linear replacement holding a BCQ weight (tquant.formats.weights.BCQWeight; tquant.formats.bcq).

Buffers (tquant.kernels.bcq_matmul's layout):
    planes  int32 [q, K / 32, N]   binary plane i, bit k % 32 of word k // 32: 1 where B_i[n, k] = +1
    alphas  [q, G, N]              in the model's dtype
    offset  [G, N] or absent       (uniform grids converted to BCQ form)
    perm    int32 [K] or absent    (GPTQ act-order storage): y = x[..., perm] @ W^T (gathered in the kernel's loads)
    bias    [N] or absent
forward: y = x @ W^T + bias, W[n, k] = sum_i alphas[i, g, n] (2 bit - 1) + offset[g, n]; the Triton kernel on CUDA
(bcq_matmul), its torch reference on the CPU.
"""
from __future__ import annotations

import torch

from ..formats.packing import pack_codes
from ..formats.weights import BCQWeight
from .base import QuantizedLinear


class BCQLinear(QuantizedLinear, spec_type="bcq_linear", weight_type=BCQWeight):
    spec_fields = ("planes", "group_size", "in_features", "out_features", "offset", "has_perm", "bias")
    buffer_flags = {"offset": "offset"}

    def __init__(self, in_features, out_features, *, planes, group_size, offset=False, has_perm=False, bias=False,
                 dtype=torch.float16, device=None):
        if in_features % 32 or in_features % group_size or group_size % 32:
            raise ValueError(f"BCQLinear needs in_features and group_size multiples of 32, group_size dividing "
                             f"in_features; got in_features={in_features}, group_size={group_size}")
        super().__init__(in_features, out_features, bias=bias, perm=has_perm, dtype=dtype, device=device)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("planes", torch.zeros(planes, in_features // 32, out_features, dtype=torch.int32,
                                                   device=device))
        self.register_buffer("alphas", torch.zeros(planes, groups, out_features, dtype=dtype, device=device))
        self.register_buffer("offset", torch.zeros(groups, out_features, dtype=dtype, device=device) if offset
                             else None)

    @classmethod
    def from_quantized(cls, qw: BCQWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> "BCQLinear":
        q, n, k = qw.bits.shape
        mod = cls(k, n, planes=q, group_size=qw.group_size, offset=qw.offset is not None, has_perm=qw.perm is not None,
                  bias=bias is not None, dtype=dtype, device=qw.bits.device)
        mod.planes.copy_(torch.stack([pack_codes(qw.bits[i], 1) for i in range(q)]))
        mod.alphas.copy_(qw.alphas.permute(2, 1, 0))
        mod.copy_optional(offset=None if qw.offset is None else qw.offset.t(), perm=qw.perm, bias=bias)
        return mod

    def spec_value(self, key: str):
        return self.planes.shape[0] if key == "planes" else super().spec_value(key)

    def validate_buffers(self, check) -> None:
        check("planes", self.planes, torch.int32)  # every bit pattern is a sign pattern
        check("alphas", self.alphas, "model")
        check("offset", self.offset, "model")

    def _matmul(self, x2: torch.Tensor, kernel: bool) -> torch.Tensor:
        from ..kernels.bcq_matmul import bcq_matmul, bcq_matmul_ref

        matmul = bcq_matmul if kernel else bcq_matmul_ref
        offset = None if self.offset is None else self.offset.to(x2.dtype)
        return matmul(x2, self.planes, self.alphas.to(x2.dtype), offset, self.perm, self.bias_as(x2.dtype))

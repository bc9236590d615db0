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
from torch import nn

from ..formats.packing import pack_codes
from ..formats.weights import BCQWeight
from .backend import use_kernel


class BCQLinear(nn.Module):
    def __init__(self, in_features, out_features, *, planes, group_size, offset=False, has_perm=False, bias=False,
                 dtype=torch.float16, device=None):
        super().__init__()
        if in_features % 32 or in_features % group_size or group_size % 32:
            raise ValueError(f"BCQLinear needs in_features and group_size multiples of 32, group_size dividing "
                             f"in_features; got in_features={in_features}, group_size={group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.backend = "auto"
        groups = in_features // group_size
        self.register_buffer("planes", torch.zeros(planes, in_features // 32, out_features, dtype=torch.int32,
                                                   device=device))
        self.register_buffer("alphas", torch.zeros(planes, groups, out_features, dtype=dtype, device=device))
        self.register_buffer("offset", torch.zeros(groups, out_features, dtype=dtype, device=device) if offset
                             else None)
        self.register_buffer("perm", torch.zeros(in_features, dtype=torch.int32, device=device) if has_perm else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, qw: BCQWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> "BCQLinear":
        q, n, k = qw.bits.shape
        mod = cls(k, n, planes=q, group_size=qw.group_size, offset=qw.offset is not None, has_perm=qw.perm is not None,
                  bias=bias is not None, dtype=dtype, device=qw.bits.device)
        mod.planes.copy_(torch.stack([pack_codes(qw.bits[i], 1) for i in range(q)]))
        mod.alphas.copy_(qw.alphas.permute(2, 1, 0))
        for name, value in (("offset", None if qw.offset is None else qw.offset.t()), ("perm", qw.perm),
                            ("bias", bias)):
            if value is not None:
                getattr(mod, name).copy_(value.detach())
        return mod

    def layer_spec(self) -> dict:
        return {"type": "bcq_linear", "planes": self.planes.shape[0], "group_size": self.group_size,
                "in_features": self.in_features, "out_features": self.out_features, "offset": self.offset is not None,
                "has_perm": self.perm is not None, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype) -> "BCQLinear":
        return cls(spec["in_features"], spec["out_features"], planes=spec["planes"], group_size=spec["group_size"],
                   offset=spec["offset"], has_perm=spec["has_perm"], bias=spec["bias"], dtype=dtype, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.bcq_matmul import bcq_matmul, bcq_matmul_ref

        matmul = bcq_matmul if use_kernel(self, x) else bcq_matmul_ref
        cast = lambda t: None if t is None else t.to(x.dtype)  # noqa: E731
        y = matmul(x.reshape(-1, self.in_features), self.planes, cast(self.alphas), cast(self.offset), self.perm,
                   cast(self.bias))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, planes={self.planes.shape[0]}, "
                f"group_size={self.group_size}, offset={self.offset is not None}, bias={self.bias is not None}")

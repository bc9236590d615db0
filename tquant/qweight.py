"""QuantizedWeight: what a weight-only method hands to the module that stores it.

    codes  int32 [N, K]  in storage order of K (see perm), values in [0, 2^bits)
    scale  float [N, G]  G = K // group_size
    zero   float [N, G]  integer-valued
    perm   int64 [K] or None: storage column k holds input channel perm[k], so
           y = x[..., perm] @ dequant(codes, scale, zero).T
GPTQ with act_order and non-static groups stores its columns in activation order, which keeps each
group contiguous in storage order; perm is that order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantizer import dequantize, expand_groups, grouped_qparams, quantize


@dataclass
class QuantizedWeight:
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    perm: torch.Tensor | None = None

    @classmethod
    def from_rtn(cls, w: torch.Tensor, bits: int, group_size: int, sym: bool) -> "QuantizedWeight":
        """Round-to-nearest of a [N, K] weight with per-group min-max (or abs-max) ranges."""
        w = w.detach().float()
        scale, zero = grouped_qparams(w, bits, group_size, sym)
        codes = quantize(w, expand_groups(scale, group_size), expand_groups(zero, group_size), bits)
        return cls(codes, scale, zero, bits, group_size)

    def dequantize(self) -> torch.Tensor:
        """Float32 [N, K] weight in the original input-channel order."""
        w = dequantize(self.codes, expand_groups(self.scale, self.group_size), expand_groups(self.zero, self.group_size))
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

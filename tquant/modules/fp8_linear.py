"""FP8Linear: an nn.Linear replacement holding float8 e4m3 weights (tquant.formats.weights.FP8Weight).

    W8A8 (act_bits 8):    y = ((E(x / sx) . qweight^T) * sx) * w_scale + bias
                          sx = max_k |x[m, k]| / 448 per token (dynamic), or act_scale (static, per tensor)
    W8A16 (act_bits None): y = (x . float(qweight)^T) * w_scale + bias      (weight-only: x stays in its dtype)
Buffers:
    qweight    float8_e4m3fn [N, K]   (nn.Linear layout)
    w_scale    fp32 [N] > 0           one scale per output channel
    act_scale  fp32 [1] > 0 or absent static activation scale (W8A8 only)
    bias       [N] or absent          in the model's dtype
forward: tquant.kernels.fp8_gemm's kernels on CUDA (fp8_linear: quantize_fp8 + fp8_matmul, or at decode sizes the
GEMM that quantizes x itself, whichever the tuner finds faster; or fp8_weight_only_matmul), its torch references on the
CPU; the output is in x's dtype.
"""
from __future__ import annotations

import torch

from ..formats.weights import FP8Weight
from .base import QuantizedLinear

FP8 = torch.float8_e4m3fn


class FP8Linear(QuantizedLinear, spec_type="fp8_linear", weight_type=FP8Weight):
    spec_fields = ("in_features", "out_features", "act_bits", "static", "bias")
    spec_optional = ("act_bits",)
    perm_field = None
    buffer_flags = {"static": "act_scale"}
    bits = 8  # weight bits, as the other linears' `bits` (float8 e4m3)

    def __init__(self, in_features, out_features, *, act_bits=8, static=False, bias=False, dtype=torch.float16,
                 device=None):
        if act_bits not in (8, None):
            raise ValueError(f"act_bits={act_bits}: FP8Linear quantizes activations to e4m3 (8) or not at all (None)")
        if static and act_bits is None:
            raise ValueError("a static activation scale needs act_bits=8 (weight-only FP8 keeps activations as they "
                             "are)")
        super().__init__(in_features, out_features, bias=bias, perm=False, dtype=dtype, device=device)
        self.act_bits = act_bits
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("act_scale", torch.ones(1, dtype=torch.float32, device=device) if static else None)

    @classmethod
    def from_quantized(cls, qw: FP8Weight, bias: torch.Tensor | None, dtype: torch.dtype) -> "FP8Linear":
        n, k = qw.weight.shape
        mod = cls(k, n, act_bits=qw.act_bits, static=qw.act_scale is not None, bias=bias is not None, dtype=dtype,
                  device=qw.weight.device)
        mod.qweight.copy_(qw.weight)
        mod.w_scale.copy_(qw.scale)
        mod.copy_optional(act_scale=qw.act_scale, bias=bias)
        return mod

    def validate_buffers(self, check) -> None:
        check("qweight", self.qweight, FP8)  # no NaN code (0x7F / 0xFF)
        check("w_scale", self.w_scale, torch.float32, positive=True)
        check("act_scale", self.act_scale, torch.float32, positive=True)

    def _matmul(self, x2: torch.Tensor, kernel: bool) -> torch.Tensor:
        from ..kernels import fp8_gemm

        if self.act_bits is None:
            matmul = fp8_gemm.fp8_weight_only_matmul if kernel else fp8_gemm.fp8_weight_only_matmul_ref
            return matmul(x2, self.qweight, self.w_scale, bias=self.bias)
        if kernel:
            return fp8_gemm.fp8_linear(x2, self.qweight, self.w_scale, scale=self.act_scale, bias=self.bias)
        xq, x_scale = fp8_gemm.quantize_fp8_ref(x2, scale=self.act_scale)
        return fp8_gemm.fp8_matmul_ref(xq, x_scale, self.qweight, self.w_scale, bias=self.bias, out_dtype=x2.dtype)

    def probe_exact(self) -> bool:
        return self.act_scale is None  # weight-only and per-token dynamic grids only

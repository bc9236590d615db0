"""BitPlaneLinear: an nn.Linear replacement holding p-bit weights as p binary planes (ABQ-LLM's WpAq, any p, q in
2..8, and WpA16).

    y = x_scale * sum_g w_scale[g] * ((a - x_zero) . (c - w_zero[g])^T) + bias      (WpAq: act_bits = q)
    y = x @ (w_scale * (c - w_zero))^T + bias                                         (WpA16: act_bits None)
Buffers (tquant.kernels.bitplane_gemm's format, G = K // group_size):
    planes  int32 [p, ceil(K / 32), N]  (tquant.formats.packing.pack_planes)
    w_scale fp32 [G, N]    w_zero uint8 [G, N]    w_sum int32 [G, N] (the codes' sums per group; WpAq only: A16
    reads none)
    bias    [N] in the model's dtype, or None
Activations (WpAq) are quantized per token, asymmetric, by act_quant.quantize_activations(zero_point=True).
out_bits (ABQ's qkv_bits on q_proj / k_proj / v_proj): y, bias included, fake-quantized on the same grid per token and
group of out_group output channels (one attention head), y <- fake_activations(y, out_bits, out_group), in torch on
every path: a simulation of quantized attention inputs, which no kernel reads as codes.
forward: Triton kernels on CUDA (or on CPU under TRITON_INTERPRET=1 with backend="triton"; WpAq through
bitplane_matmul, whose tuner also tries the popcount GEMV up to batch 8), else the torch references (the same codes;
WpAq's integer products exact).
"""
from __future__ import annotations

import torch

from ..formats.weights import BitPlaneWeight
from ..kernels.act_quant import quantize_activations_ref
from ..kernels.bitplane_gemm import weight_tensors
from ..kernels.runtime import DTYPES
from .base import QuantizedLinear


def fake_activations(x: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    """x [..., C] on act_quant's asymmetric bits grid per token and group of `group` consecutive channels (None: all
    C), in float32: scale (a - zero) with (a - 2^(bits-1), scale, zero) = quantize_activations_ref(zero_point=True),
    scale = (max(x, 0) - min(x, 0)) / (2^bits - 1) over the group, zero = round(-min(x, 0) / scale)."""
    x2 = x.reshape(-1, group or x.shape[-1]).float()
    xq, scale, zero = quantize_activations_ref(x2, bits=bits, zero_point=True)
    return (scale[:, None] * (xq.float() + 2 ** (bits - 1) - zero[:, None])).reshape(x.shape)


class BitPlaneLinear(QuantizedLinear, spec_type="bitplane_linear", weight_type=BitPlaneWeight):
    spec_fields = ("bits", "act_bits", "group_size", "in_features", "out_features", "bias", "out_bits", "out_group")
    spec_defaults = {"out_bits": None, "out_group": None}
    spec_optional = ("act_bits",)  # None: A16
    perm_field = None

    def __init__(self, in_features, out_features, *, bits, act_bits, group_size, bias=False, dtype=torch.float16,
                 device=None, out_bits=None, out_group=None):
        if bits not in range(2, 9) or (act_bits is not None and act_bits not in range(2, 9)):
            raise ValueError(f"BitPlaneLinear takes bits and act_bits in 2..8 (act_bits None: A16), got "
                             f"W{bits}A{act_bits or 16}")
        if out_bits is not None and (out_bits not in range(2, 9) or not out_group or out_features % out_group):
            raise ValueError(f"out_bits={out_bits} needs 2..8 and an out_group dividing out_features={out_features} "
                             f"(got {out_group})")
        if in_features % group_size or (group_size != in_features and group_size % 32):
            raise ValueError(f"group_size={group_size} must divide in_features={in_features} and be a multiple of "
                             "32 (or equal in_features)")
        super().__init__(in_features, out_features, bias=bias, perm=False, dtype=dtype, device=device)
        self.bits, self.act_bits, self.group_size = bits, act_bits, group_size
        self.out_bits, self.out_group = out_bits, out_group
        k, n, g = in_features, out_features, in_features // group_size
        self.register_buffer("planes", torch.zeros(bits, -(-k // 32), n, dtype=torch.int32, device=device))
        self.register_buffer("w_scale", torch.zeros(g, n, dtype=torch.float32, device=device))
        self.register_buffer("w_zero", torch.zeros(g, n, dtype=torch.uint8, device=device))
        self.register_buffer("w_sum", None if act_bits is None else torch.zeros(g, n, dtype=torch.int32, device=device))

    @classmethod
    def from_quantized(cls, qw: BitPlaneWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> "BitPlaneLinear":
        n, k = qw.codes.shape
        mod = cls(k, n, bits=qw.bits, act_bits=qw.act_bits, group_size=qw.group_size, bias=bias is not None,
                  dtype=dtype, device=qw.codes.device, out_bits=qw.out_bits, out_group=qw.out_group)
        for buf, value in zip((mod.planes, mod.w_scale, mod.w_zero, mod.w_sum),
                              weight_tensors(qw.codes, qw.scale, qw.zero, qw.bits, qw.group_size)):
            if buf is not None:
                buf.copy_(value)
        mod.copy_optional(bias=bias)
        return mod

    def validate_buffers(self, check) -> None:
        maxq = 2**self.bits - 1
        check("planes", self.planes, torch.int32)
        check("w_scale", self.w_scale, torch.float32)
        check("w_zero", self.w_zero, torch.uint8, hi=maxq)
        if check("w_sum", self.w_sum, torch.int32) is not None:  # the WpAq GEMMs trust it: the codes' group sums
            from ..kernels.bitplane_gemm import code_sums

            for n0 in range(0, self.out_features, 4096):  # a slice of columns at a time: codes [n, K] int32
                sums = code_sums(self.planes[..., n0:n0 + 4096], self.in_features, self.group_size)
                bad = (sums != self.w_sum[:, n0:n0 + 4096]).nonzero()
                if bad.numel():
                    g, n = (int(x) for x in bad[0])
                    check.fail("w_sum", f"group {g} of column {n0 + n} holds {int(self.w_sum[g, n0 + n])}, its codes "
                                        f"in planes sum to {int(sums[g, n])}")

    def _matmul(self, x2: torch.Tensor, kernel: bool) -> torch.Tensor:
        from ..kernels import act_quant
        from ..kernels import bitplane_matmul as kernels

        if x2.dtype not in DTYPES:
            raise ValueError(f"BitPlaneLinear takes fp16 / bf16 / fp32 inputs, got {x2.dtype}")
        weight = (self.planes, self.w_scale, self.w_zero)
        bias = self.bias_as(x2.dtype)
        if self.act_bits is None:
            gemm = kernels.bitplane_matmul_a16 if kernel else kernels.bitplane_matmul_a16_ref
            y = gemm(x2.contiguous(), *weight, bits=self.bits, group_size=self.group_size, bias=bias)
        else:
            quant = act_quant.quantize_activations if kernel else act_quant.quantize_activations_ref
            xq, x_scale, x_zero = quant(x2, bits=self.act_bits, zero_point=True)
            gemm = kernels.bitplane_matmul if kernel else kernels.bitplane_matmul_ref
            y = gemm(xq, x_scale, x_zero, *weight, self.w_sum, bits=self.bits, act_bits=self.act_bits,
                     group_size=self.group_size, bias=bias, out_dtype=x2.dtype)
        if self.out_bits is not None:
            y = fake_activations(y, self.out_bits, self.out_group).to(y.dtype)
        return y

    def probe_exact(self) -> bool:
        return self.out_bits is None  # out_bits fake-quantizes the output

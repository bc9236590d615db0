"""QuantizedWeight: what a weight-only method hands to the module that stores it.

    codes  int32 [N, K]  in storage order of K (see perm), values in [0, 2^bits)
    scale  float [N, G]  G = K // group_size
    zero   float [N, G]  integer-valued
    perm   int64 [K] or None: storage column k holds input channel perm[k], so
           y = x[..., perm] @ dequant(codes, scale, zero).T
Weight-activation methods (SmoothQuant, ZeroQuant, QQQ) also set:
    act_bits       8 or 4: activations are quantized per token at run time (None: weight-only, A16)
    smooth         float32 [K] or None: run-time SmoothQuant divisor, y = Q(x / smooth) @ W^T, where no
                   preceding op could absorb 1 / smooth (the weight already carries the factor smooth)
    act_scale      float32 [1] or None: static per-tensor activation scale instead of per-token dynamic
    channel_scale  float32 [N] or None: per-group scales are integer multiples of it (QQQ's grid,
                   quantizer.integer_group_scales, zero 8; or QoQ's progressive grid, quantizer.progressive_quantize,
                   integer zeros 0..15), which the W4A8 kernel needs
GPTQ with act_order and non-static groups stores its columns in activation order, which keeps each
group contiguous in storage order; perm is that order.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .quantizer import (channel_scale_for_groups, code_range_within_dtype, dequantize, expand_groups, grouped_qparams,
                        integer_group_scales, progressive_quantize, quantize)


def in_input_order(w: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """w [N, K] with storage column k moved to input channel perm[k] (None: already in input order)."""
    if perm is None:
        return w
    out = torch.empty_like(w)
    out[:, perm] = w
    return out


@dataclass
class QuantizedWeight:
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    perm: torch.Tensor | None = None
    act_bits: int | None = None
    smooth: torch.Tensor | None = None
    act_scale: torch.Tensor | None = None
    channel_scale: torch.Tensor | None = None

    @classmethod
    def from_rtn(cls, w: torch.Tensor, bits: int, group_size: int, sym: bool,
                 integer_groups: bool = False) -> "QuantizedWeight":
        """Round-to-nearest of a [N, K] weight with per-group min-max (or abs-max) ranges; integer_groups
        puts grouped scales on QQQ's grid (integer multiples of a per-channel scale)."""
        w = w.detach().float()
        scale, zero = grouped_qparams(w, bits, group_size, sym)
        channel = None
        if integer_groups and group_size != w.shape[1]:
            channel = channel_scale_for_groups(scale)
            scale = integer_group_scales(scale, channel)
        codes = quantize(w, expand_groups(scale, group_size), expand_groups(zero, group_size), bits)
        return cls(codes, scale, zero, bits, group_size, channel_scale=channel)

    @classmethod
    def from_progressive(cls, w: torch.Tensor, group_size: int, protect: int | None = None,
                         clip=1.0) -> "QuantizedWeight":
        """QoQ's progressive 4-bit grid of a [N, K] weight (quantizer.progressive_quantize): per-channel int8 in
        the protective range, then uint4 per group with integer scale and zero (group ranges times clip)."""
        codes, scale, zero, channel = progressive_quantize(w.detach(), group_size, protect, clip=clip)
        return cls(codes, scale, zero, 4, group_size, channel_scale=channel)

    def within_dtype(self, dtype: torch.dtype) -> tuple["QuantizedWeight", int]:
        """(this weight with every code's grid point a finite value of dtype, how many codes moved): codes clamped
        to quantizer.code_range_within_dtype of their group; the same weight when every group's range is whole."""
        lo, hi = code_range_within_dtype(self.scale, self.zero, self.bits, dtype)
        if lo.max() <= 0 and hi.min() >= 2**self.bits - 1:
            return self, 0
        codes = torch.maximum(torch.minimum(self.codes, expand_groups(hi, self.group_size)),
                              expand_groups(lo, self.group_size)).to(self.codes.dtype)
        moved = int((codes != self.codes).sum())
        return dataclasses.replace(self, codes=codes), moved

    def dequantize(self) -> torch.Tensor:
        """Float32 [N, K] weight in the original input-channel order."""
        return in_input_order(dequantize(self.codes, expand_groups(self.scale, self.group_size),
                                         expand_groups(self.zero, self.group_size)), self.perm)


@dataclass
class BitPlaneWeight(QuantizedWeight):
    """What ABQ-LLM hands to its module (BitPlaneLinear): QuantizedWeight's asymmetric per-group codes at any
    `bits` in 2..8 (codes [N, K] in [0, levels), scale float [N, G], integer zero [N, G], no perm), read by the
    bit-plane kernels (tquant.kernels.bitplane_gemm) as `bits` binary planes; act_bits 2..8: per-token
    asymmetric activations (WpAq), None: A16. levels is 2^bits, or fewer for a grid that uses part of its planes
    (ABQ-LLM's bit balance: 5 levels, 0..4, stored in 3 planes). out_bits 2..8: the layer's output is fake-quantized
    on act_quant's per-token asymmetric grid per group of out_group output channels (ABQ's qkv_bits: one attention
    head of queries, keys or values), None: not."""

    out_bits: int | None = None
    out_group: int | None = None

    def __post_init__(self):
        if self.perm is not None or self.smooth is not None or self.act_scale is not None:
            raise ValueError("BitPlaneWeight takes no perm, run-time smoothing or static activation scale")
        if self.bits not in range(2, 9) or (self.act_bits is not None and self.act_bits not in range(2, 9)):
            raise ValueError(f"bit-plane weights take bits and act_bits in 2..8 (or act_bits None); got W{self.bits}"
                             f"A{self.act_bits or 16}")
        if self.out_bits is not None and (self.out_bits not in range(2, 9) or not self.out_group
                                          or self.codes.shape[0] % self.out_group):
            raise ValueError(f"out_bits={self.out_bits} needs 2..8 and an out_group dividing the "
                             f"{self.codes.shape[0]} output channels (got {self.out_group})")


@dataclass
class LatticeWeight:
    """What QuIP# hands to its module (QuipLinear): E8P codes of the weight in the randomized-Hadamard basis.

        codes  int64 [N, K // 8, stages]  RVQ indices (tquant.formats.e8p_codebook): stage 0 E8P12; stage 1, 3 bits:
                                          E81B, 4 bits: E8P12; codes[n, b] holds W_r[n, 8b .. 8b + 7]
        su     float32 [K]                input signs (+-1; real-valued after fine-tuning)
        sv     float32 [N]                output signs times the layer's weight scale
    With H_n the orthonormal Hadamard matrix of tquant.formats.hadamard and D = rvq_decode(codes) as [N, K]:
        W = diag(sv) H_N^T D H_K diag(su),     y = x W^T = ((((x * su) H_K^T) D^T) H_N) * sv
    """

    codes: torch.Tensor
    su: torch.Tensor
    sv: torch.Tensor
    bits: int

    def decoded(self) -> torch.Tensor:
        """D: float32 [N, K], the codebook values in the rotated basis (before the scale in sv)."""
        from .e8p_codebook import rvq_decode

        n, blocks, _ = self.codes.shape
        return rvq_decode(self.codes, self.bits).reshape(n, blocks * 8)

    def dequantize(self) -> torch.Tensor:
        """Float32 [N, K] weight in the original basis."""
        from .incoherence import unrotate_weight

        return unrotate_weight(self.decoded(), self.su, self.sv)


@dataclass
class FP8Weight:
    """What FP8 hands to its module (FP8Linear): float8 e4m3 weights, one scale per output channel.

        weight     float8_e4m3fn [N, K]  E(W / scale), E: round to nearest e4m3, ties to even, +-448 at most
        scale      float32 [N]           max_k |W[n, k]| / 448 (1 for a row of zeros)
        act_bits   8: activations quantized to e4m3 at run time (W8A8, tquant.kernels.fp8_gemm); None: weight-only
        act_scale  float32 [1] or None   static per-tensor activation scale (W8A8); None: per token, dynamic
        W = weight * scale[:, None]
    """

    weight: torch.Tensor
    scale: torch.Tensor
    act_bits: int | None = 8
    act_scale: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """Float32 [N, K] weight."""
        return self.weight.float() * self.scale[:, None]


@dataclass
class BCQWeight:
    """What BCQ (and uniform grids converted to BCQ form) hand to their module (BCQLinear), tquant.formats.bcq's format:

        alphas  float32 [N, G, q]  per output row, group of K / G input channels and binary plane
        bits    uint8 [q, N, K]    1 where plane i's sign is +1
        offset  float32 [N, G] or None (uniform grids: s ((2^q - 1) / 2 - z))
        perm    int64 [K] or None: storage column k holds input channel perm[k] (GPTQ's act order)
        W[n, k] = sum_i alphas[n, k // (K / G), i] (2 bits[i, n, k] - 1) + offset[n, k // (K / G)]
    """

    alphas: torch.Tensor
    bits: torch.Tensor
    offset: torch.Tensor | None = None
    perm: torch.Tensor | None = None

    @property
    def group_size(self) -> int:
        return self.bits.shape[2] // self.alphas.shape[1]

    @classmethod
    def from_uniform(cls, qw: QuantizedWeight) -> "BCQWeight":
        """The same weight, exactly, from a uniform grid (RTN, GPTQ): tquant.formats.bcq.from_uniform."""
        from .bcq import from_uniform

        if qw.act_bits is not None:
            raise ValueError("BCQ form is for weight-only grids; this weight also quantizes activations")
        return cls(*from_uniform(qw.codes, qw.scale, qw.zero, qw.bits), perm=qw.perm)

    def dequantize(self) -> torch.Tensor:
        """Float32 [N, K] weight in the original input-channel order."""
        from .bcq import dequantize

        return in_input_order(dequantize(self.alphas, self.bits, self.offset), self.perm)


@dataclass
class SpQRWeight:
    """What SpQR hands to its module (SpQRLinear), tquant.formats.spqr's format (storage order of K as in QuantizedWeight):

        codes        int32 [N, K]       b-bit codes of the dense part
        scale_codes  int32 [N, G]       scale_bits-bit codes of the group scales, G = K / group_size
        zero         int32 [N, G]       integer zeros in [0, 2^bits)
        step, low    fp16 [N / stat_group, G]   second level: s_hat = scale_codes * step + low
        perm         int64 [K] or None  storage column k holds input channel perm[k]
        row_ptr      int64 [N + 1], cols int64 [nnz] (input order), vals fp16 [nnz]: the outliers S (CSR)
        W = in_input_order((codes - zero) s_hat) + S
    """

    codes: torch.Tensor
    scale_codes: torch.Tensor
    zero: torch.Tensor
    step: torch.Tensor
    low: torch.Tensor
    bits: int
    group_size: int
    scale_bits: int
    stat_group: int
    row_ptr: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    perm: torch.Tensor | None = None

    def scale(self) -> torch.Tensor:
        """s_hat float32 [N, G]."""
        from .spqr import decode_scales

        return decode_scales(self.scale_codes, self.step, self.low, self.stat_group)

    def dense(self) -> QuantizedWeight:
        """The dense part as a grouped integer grid."""
        return QuantizedWeight(self.codes, self.scale(), self.zero.float(), self.bits, self.group_size, self.perm)

    def dequantize(self) -> torch.Tensor:
        """Float32 [N, K] weight in the original input-channel order: dense part plus outliers."""
        from .spqr import csr_to_dense

        return self.dense().dequantize() + csr_to_dense(self.row_ptr, self.cols, self.vals, self.codes.shape)

    def storage_bits(self) -> dict[str, int]:
        """Bits of every tensor SpQRLinear stores for this weight (bias aside), by part: weights (b-bit codes in
        int32 words of 32 // b), stats (one byte a group: scale code and zero), second_level (fp16 step and low),
        outliers (fp16 value and 16-bit column each, int32 row pointers), perm (int32)."""
        from .packing import values_per_word

        n, k = self.codes.shape
        g = self.scale_codes.shape[1]
        return {"weights": -(-k // values_per_word(self.bits)) * n * 32, "stats": n * g * 8,
                "second_level": 2 * (n // self.stat_group) * g * 16,
                "outliers": self.vals.numel() * 32 + (n + 1) * 32, "perm": 0 if self.perm is None else k * 32}

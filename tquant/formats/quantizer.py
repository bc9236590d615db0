"""The one uniform quantizer every method uses.

Weights W have the nn.Linear layout [N, K] (out_features, in_features). A group is `group_size`
consecutive input channels of one output row; per-channel quantization is group_size = K.

    scale, zero = qparams(w, bits, sym)          # w [..., n]: range of each row of the last dim
    q = quantize(w, scale, zero, bits)           # q = clamp(round(w / scale) + zero, 0, 2^bits - 1)
    w_hat = dequantize(q, scale, zero)           # w_hat = (q - zero) * scale

Symmetric: zero = 2^(bits-1), scale = 2 max|w| / (2^bits - 1)  (GPTQ's convention).
Asymmetric: scale = (max(w, 0) - min(w, 0)) / (2^bits - 1), zero = round(-min(w, 0) / scale).

A grid's outermost points may pass the model dtype's largest value (the symmetric 2-bit grid of an fp16 outlier of
6e4 reaches -8e4): code_range_within_dtype gives the codes the dtype holds, and the driver clamps every weight's
codes to them (QuantizedWeight.within_dtype), so no dequantized weight or kernel value is inf.

Cache tensors (KIVI's convention: the range need not hold 0, the offset is a float, not an integer zero):
    q, scale, mn = minmax_quantize(x, bits, dim)  # over `dim`: scale = (max - min) / (2^bits - 1), mn = min,
                                                  # q = clamp(round((x - mn) / scale), 0, 2^bits - 1)
    x_hat = q * scale + mn                        # minmax_dequantize

Progressive (QoQ's two levels, for the W4A8 GEMM's int8 main loop): per output channel to int8 within the
protective range [-p, p], then per group to uint4 with integer scale s2 and zero z (progressive_quantize):
    w8 = clamp(round(w / s1), -p, p),   s1 = max|w_row| / p
    c = clamp(round(w8 / s2) + z, 0, 15),   s2 = max(1, ceil((max(w8, 0) - min(w8, 0)) / 15)),
    z = clamp(round(-min(w8, 0) / s2), 0, 15),   w_hat = (c - z) * s2 * s1
p = protective_range() = 119 is the largest bound for which every (c - z) * s2 is an int8 value (as in QoQ).
s2 is rounded up, so no weight of a group is clipped (QServe rounds to nearest, which clips a small group's extremes
by up to 7 int8 steps); clipping is left to the ratio (QoQ's weight clipping search) applied to the range.
"""
from __future__ import annotations

import functools

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported for weights; choose one of {SUPPORTED_BITS}")


STANDARD_GROUP_SIZES = (128, 64, 32)


def fit_group_size(in_features, start: int = STANDARD_GROUP_SIZES[0]) -> tuple[int, str]:
    """The group size a default becomes on a model whose layers have these in_features: the largest of
    STANDARD_GROUP_SIZES, not above `start`, dividing every one of them, else -1 (per channel); and the one line
    saying so ("" when `start` itself divides them all)."""
    ks = sorted(set(in_features))
    sizes = [g for g in STANDARD_GROUP_SIZES if g <= start]
    chosen = next((g for g in sizes if all(k % g == 0 for k in ks)), -1)
    if chosen == start:
        return chosen, ""
    listed = "/".join(map(str, sizes))
    if chosen == -1:  # (a start outside STANDARD_GROUP_SIZES may divide them all and still give -1)
        return -1, (f"group_size -1 (per channel): none of {listed} divides every layer's in_features "
                    f"({next(k for k in ks if k % sizes[-1])} is not a multiple of {sizes[-1]})")
    bad = next((k for k in ks if k % start), None)
    why = f"{bad} is not a multiple of {start}" if bad is not None else f"{start} is not one of them"
    return chosen, f"group_size {chosen}: the largest of {listed} dividing every layer's in_features ({why})"


def resolve_group_size(group_size: int, in_features: int, layer: str = "") -> int:
    """-1 (or 0, None) means per-channel. Returns the concrete group size; the group must divide K."""
    if group_size is None or group_size <= 0:
        return in_features
    if in_features % group_size != 0:
        divisors = [d for d in (16, 32, 48, 64, 96, 128, 192, 256) if in_features % d == 0]
        where = f" of layer {layer!r}" if layer else ""
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features}{where}; "
            f"use per-channel (-1) or a divisor such as {divisors}"
        )
    return group_size


def qparams(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (both float, zero integer-valued) reducing over the last dim of w."""
    maxq = 2**bits - 1
    w = w.float()
    wmin = w.amin(dim=-1).clamp(max=0)
    wmax = w.amax(dim=-1).clamp(min=0)
    if sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    # a zero-width range, or one so narrow that its step would be subnormal (inexact) or 0 (a NaN zero): [-1, 1]
    flat = (wmax - wmin) < torch.finfo(torch.float32).tiny * (maxq + 1)
    wmin = torch.where(flat, -torch.ones_like(wmin), wmin)
    wmax = torch.where(flat, torch.ones_like(wmax), wmax)
    # maxq as a tensor on w's device: CUDA divides by a Python (CPU) scalar as a multiplication by its reciprocal,
    # one rounding more than the division the CPU does, so the same weights got scales 1 ulp apart (and codes at
    # ties apart) on the two devices; dividing by a device tensor is IEEE division on both (full_like: filled on the
    # device, no host-to-device copy in GPTQ's per-group calls)
    maxq_t = torch.full_like(wmax, float(maxq))
    scale = (wmax - wmin) / maxq_t
    # a range wider than fp32's largest value (|w| ~ 3e38 of both signs): the same step without the overflowing sum
    scale = torch.where(scale.isinf(), wmax / maxq_t - wmin / maxq_t, scale)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-wmin / scale)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits - 1] (as int32) for w with broadcastable scale/zero."""
    q = torch.round(w.float() / scale) + zero
    return q.clamp_(0, 2**bits - 1).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero) * scale


def code_range_within_dtype(scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi), the codes c in [0, 2^bits - 1] whose grid points w_hat = (c - zero) * scale are finite values of
    `dtype` (the model's, where the dequantized weight and the module's scales are kept), per element of scale /
    zero (float64, integer-valued): [zero - n, zero + n] with n = floor(M / s), M = torch.finfo(dtype).max and s
    the larger of the float32 scale (what QuantizedWeight.dequantize multiplies) and its rounding to dtype (what a
    module stores and its kernels multiply), computed in float64, where n * s is exact.

    Why a grid point can pass M: the symmetric grid spans -(maxq + 1) / 2 .. (maxq - 1) / 2 steps of s = 2 max|w| /
    maxq, so its lowest point is (maxq + 1) / maxq max|w| (2 bits: 4/3 of a group's largest |w|, 8e4 for an fp16
    outlier of 6e4; 3 bits: 8/7), and the asymmetric one reaches half a step past its range. A weight of the dtype
    (|w| <= M) is rounded to such a point only from within half a step of it: in a symmetric grid only at the tie w =
    -max|w| (round half to even picks the outer point), where the inner point is exactly as near; in an asymmetric
    one, or for GPTQ's updated weights, the inner point is within one step. Clamping codes to (lo, hi)
    (QuantizedWeight.within_dtype) keeps the format (scales unchanged, codes in [0, maxq]); refusing instead would
    make such a layer unquantizable for a tie."""
    s = torch.maximum(scale.double(), scale.to(dtype).double())
    n = torch.floor(torch.finfo(dtype).max / s)
    n = n - (n * s > torch.finfo(dtype).max).double()  # the quotient's float64 rounding may have crossed an integer
    z = zero.double()
    return (z - n).clamp(min=0), (z + n).clamp(max=2**bits - 1)


def minmax_quantize(x: torch.Tensor, bits: int, dim: int, param_dtype: torch.dtype = torch.float32
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int32 like x, scale, mn with `dim` kept as size 1, in param_dtype): min-max over `dim`, no zero
    forced into the range (a constant slice gets scale 1, so its codes are 0 and it comes back exactly). scale
    and mn are rounded to param_dtype first (the stored parameters) and the codes chosen against them."""
    x = x.float()
    mn = x.amin(dim=dim, keepdim=True)
    mx = x.amax(dim=dim, keepdim=True)
    # a 0-dim tensor on x's device, not a Python number: CUDA torch divides by a scalar as a multiplication by its
    # rounded reciprocal, which differs from the IEEE quotient (the write kernels' tl.div_rn) in the last bit
    levels = x.new_tensor(2**bits - 1)
    scale = (mx - mn) / levels
    scale = torch.where(scale.isinf(), mx / levels - mn / levels, scale)  # a range past fp32's max
    scale, mn = scale.to(param_dtype), mn.to(param_dtype)
    # a constant slice, or a step that is 0 in param_dtype (a range below its subnormals): scale 1, codes 0 (x = mn)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((x - mn.float()) / scale.float()).clamp_(0, 2**bits - 1).to(torch.int32)
    return q, scale, mn


def minmax_dequantize(q: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float() + mn.float()


def grouped_qparams(w: torch.Tensor, bits: int, group_size: int, sym: bool):
    """qparams per group of a [N, K] weight: scale, zero of shape [N, K // group_size]."""
    n, k = w.shape
    return qparams(w.reshape(n, k // group_size, group_size), bits, sym)


def level_one(w8: torch.Tensor, bits: int = 4, clip=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """QoQ's second level of integer-valued w8 [..., n], reducing over the last dim: integer scale s2 >= 1 and
    zero z in [0, 2^bits - 1] (float tensors holding integers) of the range clip * [min(w8, 0), max(w8, 0)]
    (clip: a ratio <= 1, scalar or one per reduced row)."""
    maxq = 2**bits - 1
    lo, hi = w8.amin(dim=-1).clamp(max=0) * clip, w8.amax(dim=-1).clamp(min=0) * clip
    s2 = torch.ceil((hi - lo) / maxq - 1e-6).clamp_(min=1)
    return s2, torch.round(-lo / s2).clamp_(0, maxq)


@functools.cache
def protective_range(bits: int = 4) -> int:
    """The largest p such that every group of int8 values in [-p, p], quantized by level_one, dequantizes to
    (c - z) * s2 within [-128, 127] (brute force over the groups' extremes; deq is monotone in w8)."""
    for p in range(127, 0, -1):
        lo, hi = torch.meshgrid(torch.arange(-p, 1.0), torch.arange(0, p + 1.0), indexing="ij")
        s2, z = level_one(torch.stack([lo, hi], dim=-1), bits)
        deq = torch.stack([(torch.round(v / s2) + z).clamp(0, 2**bits - 1) - z for v in (lo, hi)]) * s2
        if deq.min() >= -128 and deq.max() <= 127:
            return p
    raise AssertionError("no protective range")


def progressive_quantize(w: torch.Tensor, group_size: int, protect: int | None = None, bits: int = 4, clip=1.0):
    """QoQ's progressive quantization of a [N, K] weight (module docstring): codes int32 [N, K] in [0, 2^bits),
    scale = s1 * s2 [N, G], zero [N, G] (integer-valued floats), channel_scale s1 [N]; scale / channel_scale is
    the integer s2, so the W4A8 GEMM runs (c - z) * s2 on int8 tensor cores. clip (scalar or [N, G], <= 1)
    shrinks each group's second-level range (QoQ's weight clipping)."""
    protect = protective_range(bits) if protect is None else protect
    n, k = w.shape
    w = w.float()
    s1 = (w.abs().amax(dim=1) / protect).clamp_min(torch.finfo(torch.float32).tiny)
    w8 = torch.round(w / s1[:, None]).clamp_(-protect, protect).reshape(n, k // group_size, group_size)
    s2, z = level_one(w8, bits, clip)
    codes = (torch.round(w8 / s2[..., None]) + z[..., None]).clamp_(0, 2**bits - 1)
    return codes.reshape(n, k).to(torch.int32), s2 * s1[:, None], z, s1


def expand_groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, G] per-group tensor -> [N, G * group_size] per-column."""
    return t.repeat_interleave(group_size, dim=1)


def integer_group_scales(group_scale: torch.Tensor, channel_scale: torch.Tensor, max_mult: int = 15) -> torch.Tensor:
    """QQQ's two-level grid: each per-group scale [N, G] (or [N]) rounded *up* to an integer multiple of its
    row's channel_scale [N], c * clamp(ceil(s / c), 1, max_mult), so no weight the group scale covered is
    clipped (unless s > max_mult * c). With 4-bit codes q in [-8, 7] and multiples <= 15, |q * mult| <= 120."""
    c = channel_scale.to(group_scale.dtype).view(-1, *[1] * (group_scale.dim() - 1))
    return c * torch.ceil(group_scale / c).clamp(1, max_mult)


def channel_scale_for_groups(group_scale: torch.Tensor, max_mult: int = 15) -> torch.Tensor:
    """The per-channel scale [N] of QQQ's grid: the largest group scale of each row / max_mult."""
    return group_scale.amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / max_mult

"""The one uniform quantizer every method uses.

Weights W have the nn.Linear layout [N, K] (out_features, in_features). A group is `group_size`
consecutive input channels of one output row; per-channel quantization is group_size = K.

    scale, zero = qparams(w, bits, sym)          # w [..., n]: range of each row of the last dim
    q = quantize(w, scale, zero, bits)           # q = clamp(round(w / scale) + zero, 0, 2^bits - 1)
    w_hat = dequantize(q, scale, zero)           # w_hat = (q - zero) * scale

Symmetric: zero = 2^(bits-1), scale = 2 max|w| / (2^bits - 1)  (GPTQ's convention).
Asymmetric: scale = (max(w, 0) - min(w, 0)) / (2^bits - 1), zero = round(-min(w, 0) / scale).

Cache tensors (KIVI's convention: the range need not hold 0, the offset is a float, not an integer zero):
    q, scale, mn = minmax_quantize(x, bits, dim)  # over `dim`: scale = (max - min) / (2^bits - 1), mn = min,
                                                  # q = clamp(round((x - mn) / scale), 0, 2^bits - 1)
    x_hat = q * scale + mn                        # minmax_dequantize
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported for weights; choose one of {SUPPORTED_BITS}")


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
    flat = (wmin == 0) & (wmax == 0)
    wmin = torch.where(flat, -torch.ones_like(wmin), wmin)
    wmax = torch.where(flat, torch.ones_like(wmax), wmax)
    scale = (wmax - wmin) / maxq
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


def minmax_quantize(x: torch.Tensor, bits: int, dim: int, param_dtype: torch.dtype = torch.float32
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int32 like x, scale, mn with `dim` kept as size 1, in param_dtype): min-max over `dim`, no zero
    forced into the range (a constant slice gets scale 1, so its codes are 0 and it comes back exactly). scale
    and mn are rounded to param_dtype first (the stored parameters) and the codes chosen against them."""
    x = x.float()
    mn = x.amin(dim=dim, keepdim=True)
    scale = (x.amax(dim=dim, keepdim=True) - mn) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale, mn = scale.to(param_dtype), mn.to(param_dtype)
    q = torch.round((x - mn.float()) / scale.float()).clamp_(0, 2**bits - 1).to(torch.int32)
    return q, scale, mn


def minmax_dequantize(q: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float() + mn.float()


def grouped_qparams(w: torch.Tensor, bits: int, group_size: int, sym: bool):
    """qparams per group of a [N, K] weight: scale, zero of shape [N, K // group_size]."""
    n, k = w.shape
    return qparams(w.reshape(n, k // group_size, group_size), bits, sym)


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

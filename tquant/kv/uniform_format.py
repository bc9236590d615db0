"""KIVI's KV-cache formats (Liu et al., 2024) in plain torch: what QuantizedKVCache stores and what a
decode-attention kernel reads. Asymmetric min-max codes (tquant.formats.quantizer.minmax_quantize) with fp16 scale and
minimum, packed into int32 words by tquant.formats.packing (epw = 32 // bits codes a word).

Keys, per channel: K [B, H, T, D] with T a multiple of `group`; the `group` consecutive tokens of a group
share one (scale, mn) per channel (keys have outlier channels, so channels get their own range):
    codes      int32 [B, H, T / group * wpg, D]   each group's codes packed along its tokens into
                                                  wpg = ceil(group / epw) words (token i of a group: word
                                                  i // epw, bits (i % epw) * bits ...)
    scale, mn  fp16  [B, H, T / group, D]
Values, per token: V [B, H, T, D] with D a multiple of `group`; `group` consecutive channels of one token
share one (scale, mn):
    codes      int32 [B, H, T, D / group * wpg]   packed along channels, group by group
    scale, mn  fp16  [B, H, T, D / group]
value = code * scale + mn, computed in fp32 from the stored fp16 scale and mn (the codes are chosen against
those rounded parameters). A bf16 / fp32 cache whose group has a minimum or a step past fp16's 65504 (|x| beyond
fp16's range) is refused with a ValueError naming the keys or values: fp16 parameters would be inf, and every value
of the group NaN. (Parameters in the cache's dtype would cost the common case precision: a bf16 minimum is off by
2^-9 of it, as much as half a step of 8-bit codes; in fp32 they would double the parameters' bytes.)
Where: check_fp16_params, as a group is quantized (a host sync: only for caches wider than fp16); while a CUDA graph
is captured (tquant.StaticDecoder's step) no host check can run, so it is skipped there and the static caches look
at the parameters they stored instead (tquant.kv.static_cache's check_range, which the decoder calls after
generating and every CHECK_EVERY steps), with stored_params_error's message.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ..formats.packing import pack_codes, unpack_codes, values_per_word
from ..formats.quantizer import minmax_quantize

KV_BITS = (2, 3, 4, 8)


class PackedKV(NamedTuple):
    codes: torch.Tensor
    scale: torch.Tensor
    mn: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)


def check_kv_bits(bits: int) -> None:
    if bits not in KV_BITS:
        raise ValueError(f"kv_bits={bits} is not supported; choose one of {KV_BITS}")


def words_per_group(bits: int, group: int) -> int:
    return -(-group // values_per_word(bits))


def fp16_range_error(dtype: torch.dtype, what: str, span: str) -> ValueError:
    """The error for a group of the dtype `what` (keys / values) whose fp16 scale or minimum is inf; span: where it
    is and its range."""
    return ValueError(f"KIVI's cache format keeps each group's scale and minimum in fp16 (at most 65504), and a group "
                      f"of the {dtype} {what} {span}, past it: keep this model's KV cache in float (no kivi / qoq KV "
                      "cache) or its keys and values within fp16's range")


def capturing(x: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on x's device (the current stream): no host sync may run."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def check_fp16_params(scale: torch.Tensor, mn: torch.Tensor, x: torch.Tensor, what: str) -> None:
    """Raise ValueError naming `what` where a group's fp16 scale or minimum (quantized from x) is not finite: only x
    of a wider dtype than fp16 can make one, so fp16 x is not checked (no host sync); nor while a CUDA graph is
    captured (capturing), where the static caches check what they stored afterwards (stored_params_error)."""
    if x.dtype != torch.float16 and not capturing(x) and not (scale.isfinite().all() and mn.isfinite().all()):
        xf = x.float()
        raise fp16_range_error(x.dtype, what, f"spans [{xf.amin().item():.4g}, {xf.amax().item():.4g}]")


def stored_params_error(scale: torch.Tensor, mn: torch.Tensor, bits: int, dtype: torch.dtype, what: str,
                        place) -> ValueError | None:
    """The error for the first group whose stored fp16 scale or minimum is not finite (scale, mn of one shape, the
    groups a cache has stored; the x they came from is gone), or None (one host sync). place(index) names the group
    of that index of scale (layer, tokens, channels); its range is bounded by what the parameters say: a minimum
    of -inf lay below -65504, an inf step (max - min) / (2^bits - 1) over a finite minimum m means a maximum above
    m + 65504 (2^bits - 1); NaN: the keys or values held NaN themselves."""
    bad = ~(scale.isfinite() & mn.isfinite())
    if not bad.any():
        return None
    index = tuple(int(i) for i in bad.nonzero()[0])
    m, s = mn[index].item(), scale[index].item()
    if m != m or s != s:
        span = "holds NaN"
    elif m in (float("inf"), float("-inf")):
        span = f"has a minimum {'below -' if m < 0 else 'above '}65504"
    else:
        span = f"spans [{m:.4g}, above {m + 65504 * (2**bits - 1):.6g}]"
    return fp16_range_error(dtype, what, f"({place(index)}) {span}")


def _quantize_groups(x: torch.Tensor, bits: int, group: int, what: str) -> PackedKV:
    """x [..., n] with n a multiple of group: codes [..., n / group * wpg] packed along the last dim, group by
    group; scale, mn fp16 [..., n / group]. what: the tensor's name for the range error."""
    *lead, n = x.shape
    wpg = words_per_group(bits, group)
    if x.numel() == 0:
        empty = lambda size, dtype: x.new_zeros(*lead, size, dtype=dtype)  # noqa: E731
        return PackedKV(empty(n // group * wpg, torch.int32), empty(n // group, torch.float16),
                        empty(n // group, torch.float16))
    g = x.float().reshape(-1, n // group, group)
    q, scale, mn = minmax_quantize(g, bits, dim=-1, param_dtype=torch.float16)
    check_fp16_params(scale, mn, x, what)
    words = pack_codes(q.reshape(-1, group), bits, checked=False)  # [wpg, rows * n / group]; clamped codes
    codes = words.t().reshape(*lead, n // group * words.shape[0])
    return PackedKV(codes.contiguous(), scale.reshape(*lead, n // group), mn.reshape(*lead, n // group))


def _dequantize_groups(p: PackedKV, bits: int, group: int) -> torch.Tensor:
    """The inverse layout of _quantize_groups: float32 [..., n]."""
    *lead, groups = p.scale.shape
    wpg = words_per_group(bits, group)
    if p.scale.numel() == 0:
        return p.scale.new_zeros(*lead, groups * group, dtype=torch.float32)
    codes = unpack_codes(p.codes.reshape(-1, wpg).t(), bits, group).t()  # [rows * groups, group]
    x = codes.float().reshape(*lead, groups, group) * p.scale.float()[..., None] + p.mn.float()[..., None]
    return x.reshape(*lead, groups * group)


def quantize_keys(k: torch.Tensor, bits: int, group: int) -> PackedKV:
    """K [B, H, T, D], T a multiple of group -> per-channel groups of tokens (layout above)."""
    check_kv_bits(bits)
    if k.shape[-2] % group:
        raise ValueError(f"keys are quantized in whole groups of {group} tokens; got {k.shape[-2]} tokens")
    p = _quantize_groups(k.transpose(-1, -2), bits, group, "keys")  # [B, H, D, T / group * wpg]
    return PackedKV(*(t.transpose(-1, -2).contiguous() for t in p))


def dequantize_keys(p: PackedKV, bits: int, group: int) -> torch.Tensor:
    return _dequantize_groups(PackedKV(*(t.transpose(-1, -2) for t in p)), bits, group).transpose(-1, -2)


def quantize_values(v: torch.Tensor, bits: int, group: int, what: str = "values") -> PackedKV:
    """V [B, H, T, D], D a multiple of group -> per-token groups of channels (layout above); what: its name in
    errors (keys stored per token take this layout too)."""
    check_kv_bits(bits)
    if v.shape[-1] % group:
        raise ValueError(f"values are quantized in groups of {group} channels, which must divide head_dim="
                         f"{v.shape[-1]}")
    return _quantize_groups(v, bits, group, what)


def dequantize_values(p: PackedKV, bits: int, group: int) -> torch.Tensor:
    return _dequantize_groups(p, bits, group)


KEY_AXES = ("channel", "token")


def check_key_axis(key_axis: str) -> None:
    if key_axis not in KEY_AXES:
        raise ValueError(f"key_axis must be 'channel' (KIVI) or 'token'; got {key_axis!r}")


def key_format(key_axis: str):
    """(quantize, dequantize) of keys stored per channel over groups of tokens (KIVI: quantize_keys /
    dequantize_keys) or per token over groups of channels (key_axis="token", QoQ's KV4: the values' layout)."""
    check_key_axis(key_axis)
    if key_axis == "channel":
        return quantize_keys, dequantize_keys
    return functools.partial(quantize_values, what="keys"), dequantize_values


def concat(parts: list[PackedKV], dim: int) -> PackedKV:
    """Packed groups appended along tokens (dim -2 for keys and values alike)."""
    return PackedKV(*(torch.cat(ts, dim=dim) for ts in zip(*parts)))

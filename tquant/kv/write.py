"""Per-token KV quantization straight into a static cache's rows (QoQ's KV4 / KV8, tquant.kv.static_cache), one launch
for a layer's keys and values:

    for x in (k, v), token i, head h:  min-max codes of the D channels of x[b, h, i] (tquant.kv.uniform_format's per-token
    format with group = D: scale = (max - min) / (2^bits - 1) and mn = min rounded to fp16, scale 0 -> 1,
    code = clamp(round((x - mn) / scale), 0, 2^bits - 1) against the rounded parameters, half to even)
    written at row rows[i] of its store: codes int32 [B, H, T, D * bits / 32] (channel c in word c // epw at bit
    (c % epw) * bits), scale, mn fp16 [B, H, T, 1]
    k, v [B, H, t, D] float (any strides, D contiguous);  rows int64 [t]

Kernel: grid (B * t, 2 H), one program a (token, head) of keys then values: D values in registers, min and max,
IEEE divisions (tl.div_rn, as torch divides), the codes packed by an integer sum of disjoint bit fields. Replaces
the ~25 torch ops a layer that quantize_values and six index_copy_ take. The reference is
`kv_quant_write_ref`: quantize_values then index_copy_, the static cache's torch path; both give the same codes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .uniform_format import PackedKV, quantize_values
from ..kernels.act_quant import RNE
from ..kernels.runtime import check_device

BITS = (4, 8)
FP32_MAX = tl.constexpr(3.4028234663852886e38)


def kv_quant_write_ref(k, v, k_store: PackedKV, v_store: PackedKV, rows, bits: int) -> None:
    for what, store, x in (("keys", k_store, k), ("values", v_store, v)):
        for part, new in zip(store, quantize_values(x, bits, x.shape[-1], what)):
            part.index_copy_(2, rows, new)


@triton.jit
def _minmax_codes(x, AXIS: tl.constexpr, BITS: tl.constexpr):
    """minmax_quantize over AXIS of x (fp32): codes int32 like x, fp16 scale and mn with AXIS kept."""
    levels = (1 << BITS) - 1.0
    lo = tl.min(x, axis=AXIS, keep_dims=True)
    hi = tl.max(x, axis=AXIS, keep_dims=True)
    scale = tl.div_rn(hi - lo, levels)
    scale = tl.where(scale > FP32_MAX, tl.div_rn(hi, levels) - tl.div_rn(lo, levels), scale)  # past fp32's range
    scale = scale.to(tl.float16)
    scale = tl.where(scale > 0, scale, 1.0).to(tl.float16)  # 0 in fp16 (a constant group, a tiny range): 1
    mn = lo.to(tl.float16)
    y = tl.div_rn(x - mn.to(tl.float32), scale.to(tl.float32))
    code = tl.minimum(tl.maximum((y + RNE) - RNE, 0.0), levels).to(tl.int32)
    return code, scale, mn


@triton.jit
def _quantize_row(x_ptr, codes_ptr, scale_ptr, mn_ptr, D: tl.constexpr, BITS: tl.constexpr):
    EPW: tl.constexpr = 32 // BITS
    code, scale, mn = _minmax_codes(tl.load(x_ptr + tl.arange(0, D)).to(tl.float32)[None, :], 1, BITS)
    shift = (tl.arange(0, D) % EPW) * BITS
    words = tl.sum(tl.reshape(code << shift[None, :], (D // EPW, EPW)), axis=1)  # disjoint bit fields: an OR
    tl.store(codes_ptr + tl.arange(0, D // EPW), words)
    tl.store(scale_ptr + tl.arange(0, 1), tl.reshape(scale, (1,)))
    tl.store(mn_ptr + tl.arange(0, 1), tl.reshape(mn, (1,)))


@triton.jit
def _kv_quant_write_kernel(k_ptr, v_ptr, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, rows_ptr, T, H,
                           sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, TOKENS, D: tl.constexpr, BITS: tl.constexpr):
    token, head = tl.program_id(0), tl.program_id(1)
    b, i = (token // T).to(tl.int64), token % T
    h = head % H
    row = (b * H + h) * TOKENS + tl.load(rows_ptr + i)  # the store's row of (b, h, rows[i])
    words = D * BITS // 32
    if head < H:
        _quantize_row(k_ptr + b * sk_b + h * sk_h + i * sk_t, kc_ptr + row * words, ks_ptr + row, km_ptr + row,
                      D, BITS)
    else:
        _quantize_row(v_ptr + b * sv_b + h * sv_h + i * sv_t, vc_ptr + row * words, vs_ptr + row, vm_ptr + row,
                      D, BITS)


def kv_quant_write(k, v, k_store: PackedKV, v_store: PackedKV, rows, bits: int) -> None:
    """Quantize k, v [B, H, t, D] per token into rows `rows` of the stores (module docstring)."""
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not supported by the per-token KV write; use one of {BITS}")
    if k.dim() != 4 or k.shape != v.shape or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"k and v must be [B, H, t, D] of one shape with D contiguous; got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, h, t, d = k.shape
    if d & (d - 1) or d * bits < 32:
        raise ValueError(f"head size {d} must be a power of two of at least {32 // bits} codes")
    tokens = k_store.codes.shape[2]
    for name, store in (("k_store", k_store), ("v_store", v_store)):
        shapes = [tuple(p.shape) for p in store]
        if shapes != [(b, h, tokens, d * bits // 32), (b, h, tokens, 1), (b, h, tokens, 1)] \
                or store.codes.dtype != torch.int32 or store.scale.dtype != torch.float16 \
                or store.mn.dtype != torch.float16 or not all(p.is_contiguous() for p in store):
            raise ValueError(f"{name} must be contiguous codes int32 [B, H, T, D * bits / 32] and fp16 scale, mn "
                             f"[B, H, T, 1] for k {tuple(k.shape)}; got {shapes}")
    if rows.shape != (t,) or rows.dtype != torch.int64:
        raise ValueError(f"rows must be int64 [t={t}]; got {rows.dtype} {tuple(rows.shape)}")
    check_device({"k": k, "v": v, "k_store": k_store.codes, "v_store": v_store.codes, "rows": rows})
    if b * t == 0:
        return
    _kv_quant_write_kernel[(b * t, 2 * h)](k, v, *k_store, *v_store, rows, t, h, k.stride(0), k.stride(1),
                                           k.stride(2), v.stride(0), v.stride(1), v.stride(2), tokens, D=d,
                                           BITS=bits, num_warps=1)


__all__ = ["kv_quant_write", "kv_quant_write_ref"]

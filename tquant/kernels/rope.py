"""RoPE on a step's queries and keys, with the keys and values written where the cache keeps them, in one launch:

    q_out[b, h, i]       = rope(q[b, i, h])          k_out[b, h, rows[i]] = rope(k[b, i, h])
    v_out[b, h, rows[i]] = v[b, i, h]
    rope(x) = x * cos[b, i] + rotate_half(x) * sin[b, i],   rotate_half(x) = [-x[D/2:], x[:D/2]]
    (HF's apply_rotary_pos_emb: each product and the sum rounded to x's dtype, as eager torch rounds them)
    q [B, t, Hq, D], k, v [B, t, Hkv, D]: any strides with D contiguous (views of the projections' outputs)
    cos, sin [B, t, D] (HF's rotary embedding: both halves the same frequencies), in q's dtype
    q_out [B, Hq, t, D]; k_out, v_out [B, Hkv, T, D] (T >= every row: a static cache's layer), all D contiguous
    rows int64 [t] (a decode step's position, or 0 ... t - 1)

Kernel: grid (B * t, Hq + 2 Hkv), one program a (token, head): query heads first, then key heads, then value
heads; a program loads its head's D values twice (x and its rotate_half partner, the second from L1) and
stores D. Replaces about fourteen small torch ops a layer (two products, rotate_half's slices, negation and
concatenation, the sums, the transposes, two index_copy_). `rope_qkv_ref` is the same in torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import DTYPES, check_device


def rope_ref(x, cos, sin):
    """x [B, t, H, D] rotated by cos, sin [B, t, D] in x's dtype: HF's apply_rotary_pos_emb."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def rope_qkv_ref(q, k, v, cos, sin, q_out, k_out, v_out, rows) -> None:
    q_out.copy_(rope_ref(q, cos, sin).transpose(1, 2))
    k_out.index_copy_(2, rows, rope_ref(k, cos, sin).transpose(1, 2).to(k_out.dtype))
    v_out.index_copy_(2, rows, v.transpose(1, 2).to(v_out.dtype))


@triton.jit
def _rope_qkv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, vo_ptr, rows_ptr, T, HQ, HKV,
                     sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sc_b, sc_t,
                     sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t, svo_b, svo_h, svo_t,
                     D: tl.constexpr):
    token, head = tl.program_id(0), tl.program_id(1)
    b, i = (token // T).to(tl.int64), token % T
    d = tl.arange(0, D)
    if head < HQ + HKV:
        if head < HQ:
            src = q_ptr + b * sq_b + i * sq_t + head * sq_h
            dst = qo_ptr + b * sqo_b + head * sqo_h + i * sqo_t
        else:
            h = head - HQ
            src = k_ptr + b * sk_b + i * sk_t + h * sk_h
            dst = ko_ptr + b * sko_b + h * sko_h + tl.load(rows_ptr + i) * sko_t
        x = tl.load(src + d)
        partner = tl.load(src + (d + D // 2) % D).to(tl.float32)
        rotated = tl.where(d < D // 2, -partner, partner)
        c = tl.load(cos_ptr + b * sc_b + i * sc_t + d).to(tl.float32)
        s = tl.load(sin_ptr + b * sc_b + i * sc_t + d).to(tl.float32)
        first = (x.to(tl.float32) * c).to(x.dtype).to(tl.float32)
        second = (rotated * s).to(x.dtype).to(tl.float32)
        tl.store(dst + d, (first + second).to(x.dtype).to(dst.dtype.element_ty))
    else:
        h = head - HQ - HKV
        x = tl.load(v_ptr + b * sv_b + i * sv_t + h * sv_h + d)
        dst = vo_ptr + b * svo_b + h * svo_h + tl.load(rows_ptr + i) * svo_t
        tl.store(dst + d, x.to(dst.dtype.element_ty))


def check_inputs(q, k, v, cos, sin, q_out, k_out, v_out, rows) -> None:
    """Raise ValueError naming the first tensor whose shape, dtype or strides do not fit the docstring's layouts."""
    if q.dim() != 4 or q.dtype not in DTYPES:
        raise ValueError(f"q must be [B, t, Hq, D] fp16 / bf16 / fp32; got {q.dtype} {tuple(q.shape)}")
    b, t, hq, d = q.shape
    if d % 2 or d & (d - 1):
        raise ValueError(f"head size {d} must be an even power of two")
    hkv = k.shape[2] if k.dim() == 4 else -1
    expected = {"k": (k, (b, t, hkv, d)), "v": (v, (b, t, hkv, d)), "cos": (cos, (b, t, d)), "sin": (sin, (b, t, d)),
                "q_out": (q_out, (b, hq, t, d))}
    for name, (x, shape) in expected.items():
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}; got {tuple(x.shape)}")
    for name, x in (("k_out", k_out), ("v_out", v_out)):
        if x.dim() != 4 or tuple(x.shape[:2]) != (b, hkv) or x.shape[3] != d or x.dtype not in DTYPES:
            raise ValueError(f"{name} must be [B={b}, Hkv={hkv}, T, D={d}] float; got {x.dtype} {tuple(x.shape)}")
    for name, x in (("k", k), ("v", v), ("cos", cos), ("sin", sin), ("q_out", q_out)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must be in q's dtype {q.dtype}; got {x.dtype}")
    for name, x in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("q_out", q_out), ("k_out", k_out),
                    ("v_out", v_out)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name}'s last dim must be contiguous; got strides {x.stride()}")
    if sin.stride() != cos.stride():
        raise ValueError(f"cos and sin must have one layout; got strides {cos.stride()}, {sin.stride()}")
    if rows.shape != (t,) or rows.dtype != torch.int64:
        raise ValueError(f"rows must be int64 [t={t}]; got {rows.dtype} {tuple(rows.shape)}")


def rope_qkv(q, k, v, cos, sin, q_out, k_out, v_out, rows) -> None:
    """q_out, k_out, v_out written as the module docstring says."""
    check_inputs(q, k, v, cos, sin, q_out, k_out, v_out, rows)
    check_device({"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "q_out": q_out, "k_out": k_out, "v_out": v_out,
                  "rows": rows})
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if b * t == 0:
        return
    _rope_qkv_kernel[(b * t, hq + 2 * hkv)](
        q, k, v, cos, sin, q_out, k_out, v_out, rows, t, hq, hkv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *cos.stride()[:2], *q_out.stride()[:3], *k_out.stride()[:3], *v_out.stride()[:3], D=d,
        num_warps=1 if d <= 128 else 4)


__all__ = ["rope_qkv", "rope_qkv_ref", "rope_ref"]

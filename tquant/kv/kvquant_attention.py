"""Decode attention over KVQuant's cache (tquant.kv.kvquant_format; flash-decoding): the Triton kernel and the torch
reference.

One new query token per sequence attends to every cached token: the sink, then the quantized store, whose last R
tokens are read exact instead (a decode step's own token, as the cache's torch path returns it):
    o[b, h] = softmax(sm_scale * q[b, h] K_b^T + mask) V_b,
    K_b = [sink K ; RoPE(dequant(store K))[:T - R] ; res K]   (V the same, without RoPE)
    q        [B, Hq, D] fp16 / bf16 / fp32; Hq = rep * Hkv (GQA: query head h reads KV head h // rep)
    keys     fmt.PackedKeys: codes int32 [B, Hkv, T, W] (W = ceil(D / epw), channel d in word d // epw at bit
             (d % epw) * bits) and the CSR outliers (row_ptr int32 [T * B * Hkv + 1], rows r = (t * B + b) * Hkv + h;
             index int16 channel, value fp16) or None
    values   fmt.PackedValues: codes int32 [B, Hkv, T, W], scale, offset fp16 [B, Hkv, T], outliers (channel int16,
             value fp16 [B, Hkv, T, n]) or None
    params   fmt.LayerParams: key_offset, key_scale fp32 [Hkv, D]; key_codebook, value_codebook fp32 [2^bits]
    sink_k, sink_v  [B, Hkv, S, D] in q's dtype, S >= 0: the cache's first S tokens, kept exact (post-RoPE keys)
    res_k, res_v    [B, Hkv, R, D] in q's dtype, 0 <= R <= T: the store's last R tokens as given (post-RoPE keys)
    rope     (inv_freq fp32 [D / 2], scaling) for pre-RoPE keys with positions int32 [B, T] (each stored token's
             position); None: the keys were stored post-RoPE
    start    int32 [B] or None: cache tokens before start[b] are masked (the sink holds tokens 0 ... S - 1, the
             store S ... S + T - 1)
    o        [B, Hq, D] in q's dtype; softmax and accumulation in fp32, decode and rotation in OUT (below)
Kernel: grid (B * Hkv, SPLITS + 1), kv_attention's launch pattern. A program takes one KV head and its rep query
heads (padded to REP_PAD rows). Programs 0 ... SPLITS - 1 each take a contiguous share of the T stored tokens,
BLOCK_T at a time, of its first T - R tokens; the last takes the S sink tokens and the R exact ones (kv_attention's
dense_tokens); combine_kernel merges the (max, sum, accumulator) partials. Decode dtype OUT: fp16 under an fp16
query (the dot's operand dtype: one rounding of each multiply-add, two elements an HFMA2), else fp32. Once per
program: each codebook as fp16 in eight int32 byte planes (_tables: byte k of Lg / Hg is the low / high byte of
entry 4 g + k; an fp32 query also gets the planes of each centroid's fp16 residual, so hi + lo holds it to ~2^-22),
the key scale / offset halves in OUT, and (pre-RoPE keys, 16-bit query) the tables cos(t w_i), sin(t w_i)
[BLOCK_T, D/2] for t = 0 ... BLOCK_T - 1. Per store tile:
    codes     the tile's code words: a contiguous [BLOCK_T, N / epw] tile when a half-vector's N channels fill whole
              words (2 and 4 bits, N >= epw); else (3 bits: 10 codes a word) the one or two words holding each group
              of four channels 4 j ... 4 j + 3 gathered (words (4 j) // epw and (4 j + 3) // epw; L1 hits but the first)
    codebook  looked up in registers (_centroids): four codes in the four nibbles of a selector (4 bits: a word and
              the word >> 16; 2 bits: w & 0x33333333 and (w >> 2) & 0x33333333, even and odd channels; 3 bits:
              the two words as one bit stream b = w1 << 30 | w0, shifted right by (4 j % 10) * 3, its four 3-bit
              fields moved apart), prmt.b32 picks their entries' low and high bytes out of a pair of byte planes
              (8 entries; 4 bits: entries 0-7 and 8-15 looked up by the low 3 bits, a third prmt keeps one by each
              code's bit 3) and two more pair them into half2 registers: 1 (2, 3 bits) to 2 (4 bits) prmt a centroid.
              The parts come back in channel order through tl.interleave, which keeps a thread's elements. (A table
              load, the first kernel: one load an element, its 64-bit address, and that address tile moved through
              shared memory into the code tile's layout.)
    keys      k = centroid * key_scale[h, d] + key_offset[h, d] (OUT), decoded as two halves k1 = channels
              0 ... D/2 - 1 and k2 = D/2 ... D - 1
    outliers  each replaces the dense decode at its (token, channel): for j < the tile's largest count (computed
              from the row pointers in the kernel: keys tl.max(row_ptr[r + 1] - row_ptr[r]), values n),
              tile = where(channel == entry j's channel, entry j's value, tile), entry j of a token masked when
              j >= its count; on fp16 tiles (CUDA) a compare and a predicated prmt an element on the half2 registers
              that hold the tile (a 16-bit select unpacks and repacks each pair). (Adding each key outlier's effect to
              the scores instead takes one [R, BLOCK_T] pass per j: slower, benchmarks/RESULTS.md.)
    RoPE      rotate_half pairs channel i with i + D/2, so on the halves k_rot1 = k1 cos - k2 sin,
              k_rot2 = k2 cos + k1 sin (no register shuffles), cos = cos(p w_i) a and sin likewise (fmt.rope_cos_sin;
              the RoPE scaling a goes into q). Rotations of a pair compose and the dot product is invariant under
              rotating both sides: q . R((p0 + t) w) k = (R(p0 w)^T q) . (R(t w) k). Where a tile's positions are
              consecutive (p = p0 + t, p0 its first token's: the usual case), q's halves are rotated by p0 w once a
              tile (q1' = q1 cos + q2 sin, q2' = q2 cos - q1 sin: D/2 sin / cos) and the keys by the program's tables
              of t w: two multiply-adds a key element, where a sin and a cos of its own angle cost ~8 instructions a
              pair (_cos_sin). The angle fl(p0 w) + fl(t w) differs from the reference's fl(p w) by about an ulp of
              p w (2e-4 rad at p = 4096, 8e-3 at 131072 on the fastest pair, as the model's own fp32 angle differs
              from the exact one). A tile whose positions jump, and every tile under an fp32 query, takes each
              token's own angle fl(p w) with q unrotated (the reference's angles)
    scores    s = q1' . k_rot1 + q2' . k_rot2 (q1', q2': q's scaled halves, rotated as above; post-RoPE caches: q's
              halves on k1, k2 unrotated)
    values    v = centroid * scale[t] + offset[t] (OUT), outliers written in, then acc += p v
`kvquant_decode_attention_ref` is plain torch in fp32 through kvquant_format's decoders.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import kvquant_format as fmt
from ..kernels.autotune_cache import tune
from .split_kv import (REP_PAD, accumulate, check_heads, combine_kernel, configs, dense_tokens, initial_state,
                       reference_attention, softmax_step, store_partial)
from ..kernels.runtime import check_device, check_tensors, dot_args, interpreter_on, next_power_of_2


def kvquant_decode_attention_ref(q, keys: fmt.PackedKeys, values: fmt.PackedValues, params: fmt.LayerParams, sink_k,
                                 sink_v, res_k, res_v, *, bits: int, sm_scale: float, rope=None, positions=None,
                                 start=None) -> torch.Tensor:
    """The same attention in fp32 through fmt.dequantize_keys / dequantize_values and fmt.apply_rope."""
    k = fmt.dequantize_keys(keys, params, bits)
    if rope is not None:
        k = fmt.apply_rope(k, *fmt.rope_cos_sin(positions, *rope, torch.float32))
    v = fmt.dequantize_values(values, params.value_codebook, bits, q.shape[-1])
    tq = k.shape[-2] - res_k.shape[-2]
    return reference_attention(q, torch.cat([sink_k.float(), k[..., :tq, :], res_k.float()], dim=-2),
                               torch.cat([sink_v.float(), v[..., :tq, :], res_v.float()], dim=-2), sm_scale, start)


@triton.jit
def _or(a, b):
    """tl.reduce's combine: bitwise or."""
    return a | b


@triton.jit
def _tables(cb_ptr, BITS: tl.constexpr, LOW: tl.constexpr):
    """The codebook [2^BITS] fp32 as fp16 in eight int32 byte planes (L0, L1, L2, L3, H0, H1, H2, H3): byte k of Lg /
    Hg is the low / high byte of entry 4 g + k (entries past 2^BITS are 0). LOW: the planes of the residual
    cb - fp32(fp16(cb)) in fp16 instead, so that hi + lo holds each centroid to ~2^-22."""
    e = tl.arange(0, 16)
    c = tl.load(cb_ptr + e, mask=e < (1 << BITS), other=0.0)
    h = c.to(tl.float16)
    if LOW:
        h = (c - h.to(tl.float32)).to(tl.float16)
    x = h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    shift = (e % 4) * 8
    lo, hi = (x & 0xFF) << shift, (x >> 8) << shift
    g = e // 4
    return (tl.reduce(tl.where(g == 0, lo, 0), 0, _or), tl.reduce(tl.where(g == 1, lo, 0), 0, _or),
            tl.reduce(tl.where(g == 2, lo, 0), 0, _or), tl.reduce(tl.where(g == 3, lo, 0), 0, _or),
            tl.reduce(tl.where(g == 0, hi, 0), 0, _or), tl.reduce(tl.where(g == 1, hi, 0), 0, _or),
            tl.reduce(tl.where(g == 2, hi, 0), 0, _or), tl.reduce(tl.where(g == 3, hi, 0), 0, _or))


@triton.jit
def _prmt(a, b, s, ASM: tl.constexpr):
    """PTX prmt.b32 (default mode): byte i of the result is byte (s >> 4 i) & 7 of the eight bytes of (a, b), a's
    first (selector nibbles never have prmt's sign-mode bit 3 set here). ASM: the instruction (CUDA); else the same
    in integer ops (the interpreter)."""
    if ASM:
        out = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, s], dtype=tl.int32,
                                        is_pure=True, pack=1)
    else:
        ab = (b.to(tl.int64) << 32) | (a.to(tl.int64) & 0xFFFFFFFF)
        out = s & 0
        for i in tl.static_range(4):
            out |= (((ab >> (((s >> (4 * i)) & 7) * 8)) & 0xFF) << (8 * i)).to(tl.int32)
    return out


@triton.jit
def _halves(lo, hi, ASM: tl.constexpr):
    """The four fp16 whose low / high bytes are the bytes 0-3 of lo / hi: two prmt.b32 pairing them into half2
    registers, split without instructions (CUDA); else shifts and a bitcast (the interpreter)."""
    if ASM:
        h0, h1, h2, h3 = tl.inline_asm_elementwise(
            "{ .reg .b32 x, y; prmt.b32 x, $4, $5, 0x5140; prmt.b32 y, $4, $5, 0x7362; "
            "mov.b32 {$0, $1}, x; mov.b32 {$2, $3}, y; }",
            "=h,=h,=h,=h,r,r", [lo, hi], dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True,
            pack=1)
    else:
        h0, h1, h2, h3 = _half(lo, hi, 0), _half(lo, hi, 8), _half(lo, hi, 16), _half(lo, hi, 24)
    return h0, h1, h2, h3


@triton.jit
def _half(lo, hi, SHIFT: tl.constexpr):
    """The fp16 whose low / high bytes are the bytes at bit SHIFT of lo / hi."""
    return ((((lo >> SHIFT) & 0xFF) | (((hi >> SHIFT) & 0xFF) << 8)).to(tl.int16)).to(tl.float16, bitcast=True)


@triton.jit
def _planes_lookup(sel, tab, BITS: tl.constexpr, ASM: tl.constexpr):
    """fp16 centroids of the four codes in nibbles 0-3 of sel (int32, any shape) from byte planes tab (_tables).
    Codes < 8: one prmt a plane (L0 L1 / H0 H1 hold entries 0-7). 4 bits: entries 0-7 and 8-15 looked up with the
    low 3 bits, then a third prmt keeps byte i of the first or of the second by bit 3 of code i (selector nibble
    i + 4 bit3_i, from (sel >> 1) & 0x4444 | 0x3210)."""
    if BITS == 4:
        s = sel & 0x7777
        m = ((sel >> 1) & 0x4444) | 0x3210
        lo = _prmt(_prmt(tab[0], tab[1], s, ASM), _prmt(tab[2], tab[3], s, ASM), m, ASM)
        hi = _prmt(_prmt(tab[4], tab[5], s, ASM), _prmt(tab[6], tab[7], s, ASM), m, ASM)
    else:
        lo, hi = _prmt(tab[0], tab[1], sel, ASM), _prmt(tab[4], tab[5], sel, ASM)
    return _halves(lo, hi, ASM)


@triton.jit
def _lookup(sel, tab, tab_lo, BITS: tl.constexpr, OUT: tl.constexpr, ASM: tl.constexpr):
    """The four centroids of sel's nibbles 0-3 in OUT: fp16 (tab's planes); fp32 with tab_lo's residual added (an
    fp32 query: the centroids to ~2^-22, as the reference's fp32 table) or, tab_lo None, fp16 widened."""
    c0, c1, c2, c3 = _planes_lookup(sel, tab, BITS, ASM)
    if tab_lo is not None:
        r0, r1, r2, r3 = _planes_lookup(sel, tab_lo, BITS, ASM)
        c0, c1, c2, c3 = _widen(c0, r0), _widen(c1, r1), _widen(c2, r2), _widen(c3, r3)
    return c0.to(OUT), c1.to(OUT), c2.to(OUT), c3.to(OUT)


@triton.jit
def _widen(hi, lo):
    """fp32(hi) + fp32(lo) of two fp16 (a centroid and its residual)."""
    return hi.to(tl.float32) + lo.to(tl.float32)


@triton.jit
def _spread4(y0, y1, y2, y3):
    """[M, 4 N] from four [M, N]: column 4 j + k is yk[:, j] (interleaves: each thread keeps its elements)."""
    return tl.interleave(tl.interleave(y0, y2), tl.interleave(y1, y3))


@triton.jit
def _spread8(x0, x1, x2, x3, x4, x5, x6, x7):
    """[M, 8 N] from eight [M, N]: column 8 j + k is xk[:, j]."""
    return tl.interleave(_spread4(x0, x2, x4, x6), _spread4(x1, x3, x5, x7))


@triton.jit
def _centroids(codes_ptr, tok, ok, tab, tab_lo, C0: tl.constexpr, N: tl.constexpr, W: tl.constexpr,
               BITS: tl.constexpr, EPW: tl.constexpr, OUT: tl.constexpr, ASM: tl.constexpr):
    """Centroids [BLOCK_T, N] (in OUT, _lookup) of channels C0 ... C0 + N - 1 of tokens tok [BLOCK_T] (code 0 where
    not ok) from one (b, head)'s codes [T, W], looked up in registers by prmt on selectors of four 4-bit nibbles:
      4 bits, whole words: word w (channels 8 j ... 8 j + 7) is the selector of channels 0-3 and w >> 16 of 4-7
      2 bits, whole words: w & 0x33333333 holds the even channels of its word in nibbles (0, 2, 4, 6 and, >> 16, 8 ...
                           14), (w >> 2) & 0x33333333 the odd ones
      else (3 bits, or a half-vector of fewer channels than a word): channels 4 j ... 4 j + 3 from the words a and b
                           holding the first and the last, read as one bit stream (b << EPW BITS | a) shifted right
                           by the first's offset, its four fields moved into nibbles
    and the looked-up [BLOCK_T, N / 4] parts interleaved back into channel order in registers (_spread4 / _spread8)."""
    if N % EPW == 0 and BITS != 3:  # a contiguous [BLOCK_T, N / EPW] tile of words
        words = C0 // EPW + tl.arange(0, N // EPW)
        w = tl.load(codes_ptr + tok[:, None] * W + words[None, :], mask=ok[:, None], other=0)
        if BITS == 4:
            a0, a1, a2, a3 = _lookup(w, tab, tab_lo, BITS, OUT, ASM)
            b0, b1, b2, b3 = _lookup(w >> 16, tab, tab_lo, BITS, OUT, ASM)
            x = _spread8(a0, a1, a2, a3, b0, b1, b2, b3)
        else:
            ev, od = w & 0x33333333, (w >> 2) & 0x33333333
            e0, e1, e2, e3 = _lookup(ev, tab, tab_lo, BITS, OUT, ASM)
            e4, e5, e6, e7 = _lookup(ev >> 16, tab, tab_lo, BITS, OUT, ASM)
            o0, o1, o2, o3 = _lookup(od, tab, tab_lo, BITS, OUT, ASM)
            o4, o5, o6, o7 = _lookup(od >> 16, tab, tab_lo, BITS, OUT, ASM)
            x = tl.interleave(_spread8(e0, e1, e2, e3, e4, e5, e6, e7), _spread8(o0, o1, o2, o3, o4, o5, o6, o7))
    else:  # channels 4 j ... 4 j + 3 from the one or two words holding them, read as one bit stream
        four = C0 + tl.arange(0, N // 4) * 4
        row = codes_ptr + tok[:, None] * W
        wa = tl.load(row + (four // EPW)[None, :], mask=ok[:, None], other=0).to(tl.int64)
        wb = tl.load(row + ((four + 3) // EPW)[None, :], mask=ok[:, None], other=0).to(tl.int64)
        x = (((wb << (EPW * BITS)) | (wa & ((1 << (EPW * BITS)) - 1))) >> ((four % EPW) * BITS)[None, :]).to(tl.int32)
        sel = x & ((1 << BITS) - 1)
        for k in tl.static_range(1, 4):
            sel |= ((x >> (k * BITS)) & ((1 << BITS) - 1)) << (4 * k)
        y0, y1, y2, y3 = _lookup(sel, tab, tab_lo, BITS, OUT, ASM)
        x = _spread4(y0, y1, y2, y3)
    return x


@triton.jit
def _cos_sin(angle, FAST: tl.constexpr):
    """(cos, sin) of fp32 angles, reduced to r in [-pi, pi] first with 2 pi = C1 + C2, C1 = 6.28125 (8 significant
    bits: k C1 is exact for |k| < 2^16, and angle - k C1 by Sterbenz). FAST (CUDA): r goes to the sin / cos units'
    approximations (abs. error ~5e-7 on [-pi, pi]), ~8 instructions a pair, where tl.cos / tl.sin (libdevice)
    carry a Payne-Hanek path for huge angles that costs ~40 instructions and local memory an element; else (the
    interpreter) tl.cos / tl.sin of r."""
    k = tl.floor(angle * 0.15915494309189535 + 0.5)
    r = (angle - k * 6.28125) - k * 0.0019353071795864769
    if FAST:
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True,
                                      pack=1)
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        c, s = tl.cos(r), tl.sin(r)
    return c, s


@triton.jit
def _write_outliers(x, chan, channel_ptr, value_ptr, lo, n, ASM: tl.constexpr, x2=None, chan2=None,
                    UNROLL: tl.constexpr = 0):
    """(x, x2): x [BLOCK_T, N] (channels chan [N]) and x2 (channels chan2; another tile of the same tokens, or None)
    with each token's n [BLOCK_T] outliers, entries lo ... lo + n - 1 of channel_ptr / value_ptr, written in by
    selects (_put), each entry loaded once for both tiles: entry indices j < UNROLL unrolled (no loop-carried tile,
    whose fp16 pairs a loop would repack), then a loop up to the tile's largest n."""
    for j in tl.static_range(UNROLL):
        x, x2 = _entry(x, chan, x2, chan2, channel_ptr, value_ptr, lo + j, j < n, ASM)
    for j in range(UNROLL, tl.max(n, axis=0)):
        x, x2 = _entry(x, chan, x2, chan2, channel_ptr, value_ptr, lo + j, j < n, ASM)
    return x, x2


@triton.jit
def _entry(x, chan, x2, chan2, channel_ptr, value_ptr, at, has, ASM: tl.constexpr):
    """(x, x2) with entries at [BLOCK_T] (where has) written in."""
    c = tl.load(channel_ptr + at, mask=has, other=-1).to(tl.int32)
    e = tl.load(value_ptr + at, mask=has, other=0.0).to(x.dtype)
    x = _put(x, chan, c, e, ASM)
    if x2 is not None:
        x2 = _put(x2, chan2, c, e, ASM)
    return x, x2


@triton.jit
def _put(x, chan, c, e, ASM: tl.constexpr):
    """x [BLOCK_T, N] with e[t] where chan == c[t]. ASM (CUDA, fp16 x): on the half2 registers that hold x, a
    compare and a predicated prmt a half (a 16-bit select unpacks and repacks each pair). The two elements of a
    register may lie in different tokens (the tile's layout decides), so each half has its own channel, c and e."""
    if ASM and x.dtype == tl.float16:  # $1: x's pair, $2 $3: their channels, $4 $5: their c, $6: their e
        x = tl.inline_asm_elementwise(
            "{ .reg .pred p, q; setp.eq.s32 p, $2, $4; setp.eq.s32 q, $3, $5; mov.b32 $0, $1; "
            "@p prmt.b32 $0, $0, $6, 0x3254; @q prmt.b32 $0, $0, $6, 0x7610; }",
            "=r,r,r,r,r,r,r", [x, tl.broadcast_to(chan[None, :], x.shape), tl.broadcast_to(c[:, None], x.shape),
                               tl.broadcast_to(e[:, None], x.shape)], dtype=tl.float16, is_pure=True, pack=2)
    else:
        x = tl.where(chan[None, :] == c[:, None], e[:, None], x)
    return x


@triton.jit
def _affine(c, scale, offset):
    """c * scale + offset in c's dtype (fp16: one rounding, HFMA2)."""
    if c.dtype == tl.float16:
        y = tl.fma(c, scale.to(tl.float16), offset.to(tl.float16))
    else:
        y = c * scale.to(tl.float32) + offset.to(tl.float32)
    return y


@triton.jit
def _qk(q, k, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """q [R, N] . k [BLOCK_T, N]^T in fp32: tl.dot, or a broadcast sum below tl.dot's K >= 16 (D = 16 heads)."""
    if k.shape[1] >= 16:
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION)
    else:
        s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
    return s


@triton.jit
def _kvquant_attention_kernel(
    q_ptr, kc_ptr, k_off_ptr, k_scale_ptr, k_cb_ptr, k_rows_ptr, k_chan_ptr, k_val_ptr,
    vc_ptr, v_scale_ptr, v_off_ptr, v_cb_ptr, v_chan_ptr, v_val_ptr,
    pos_ptr, inv_freq_ptr, sk_ptr, sv_ptr, rk_ptr, rv_ptr, start_ptr, m_ptr, l_ptr, acc_ptr,
    HKV, T, TQ, S, TR, tokens_per_split, sm_scale, rope_scaling,
    D: tl.constexpr, REP: tl.constexpr, BITS: tl.constexpr, EPW: tl.constexpr, KEY_OUTLIERS: tl.constexpr,
    N_OUT: tl.constexpr, ROPE: tl.constexpr, BLOCK_T: tl.constexpr, HAS_START: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, R: tl.constexpr, CUDA: tl.constexpr,
):
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // HKV, bh % HKV
    splits = tl.num_programs(1)
    HALF: tl.constexpr = D // 2
    W: tl.constexpr = (D + EPW - 1) // EPW
    # decode dtype: fp16 under an fp16 query (the dot's operands), else fp32; an fp32 query adds each centroid's
    # fp16 residual and rotates by each token's own angle (exact), the 16-bit ones by the tile's tables
    OUT: tl.constexpr = tl.float16 if DOT_DTYPE == tl.float16 else tl.float32
    EXACT: tl.constexpr = DOT_DTYPE == tl.float32
    rows = tl.arange(0, R)  # the rep query heads, padded to R = REP_PAD rows
    row_ok = rows < REP
    chan = tl.arange(0, D)
    q_row = q_ptr + (bh * REP + rows)[:, None] * D
    first, m, l, acc = initial_state(start_ptr, b, HAS_START, R, D)
    if split < splits - 1:  # a share of the quantized store
        half = tl.arange(0, HALF)
        q_scale = sm_scale * rope_scaling if ROPE else sm_scale
        q1 = tl.load(q_row + half[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32) * q_scale
        q2 = tl.load(q_row + HALF + half[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32) * q_scale
        qa, qb = q1.to(DOT_DTYPE), q2.to(DOT_DTYPE)
        k_scale1 = tl.load(k_scale_ptr + h * D + half).to(OUT)
        k_scale2 = tl.load(k_scale_ptr + h * D + HALF + half).to(OUT)
        k_off1, k_off2 = tl.load(k_off_ptr + h * D + half).to(OUT), tl.load(k_off_ptr + h * D + HALF + half).to(OUT)
        k_tab, v_tab = _tables(k_cb_ptr, BITS, False), _tables(v_cb_ptr, BITS, False)
        k_lo, v_lo = None, None
        if EXACT:
            k_lo, v_lo = _tables(k_cb_ptr, BITS, True), _tables(v_cb_ptr, BITS, True)
        if ROPE:
            inv_freq = tl.load(inv_freq_ptr + half)
            if not EXACT:  # cos / sin of t w_i for the tile's offsets t = 0 ... BLOCK_T - 1
                cos_tab, sin_tab = _cos_sin(tl.arange(0, BLOCK_T).to(tl.float32)[:, None] * inv_freq[None, :], CUDA)
                cos_tab, sin_tab = cos_tab.to(OUT), sin_tab.to(OUT)
        kc, vc = kc_ptr + bh.to(tl.int64) * T * W, vc_ptr + bh.to(tl.int64) * T * W
        v_scale, v_off = v_scale_ptr + bh.to(tl.int64) * T, v_off_ptr + bh.to(tl.int64) * T
        lo = split * tokens_per_split
        hi = tl.minimum(lo + tokens_per_split, TQ)  # the store's tokens read quantized: 0 ... TQ - 1
        for t0 in range(lo, hi, BLOCK_T):
            tok = t0 + tl.arange(0, BLOCK_T)
            ok = tok < hi
            k1 = _affine(_centroids(kc, tok, ok, k_tab, k_lo, 0, HALF, W, BITS, EPW, OUT, CUDA), k_scale1[None, :],
                         k_off1[None, :])
            k2 = _affine(_centroids(kc, tok, ok, k_tab, k_lo, HALF, HALF, W, BITS, EPW, OUT, CUDA),
                         k_scale2[None, :], k_off2[None, :])
            if KEY_OUTLIERS:  # CSR rows r = t * B * Hkv + b * Hkv + h
                r = tok.to(tl.int64) * tl.num_programs(0) + bh
                k_lo_row = tl.load(k_rows_ptr + r, mask=ok, other=0)
                n = tl.load(k_rows_ptr + r + 1, mask=ok, other=0) - k_lo_row
                k1, k2 = _write_outliers(k1, half, k_chan_ptr, k_val_ptr, k_lo_row, n, CUDA, k2, HALF + half)
            if ROPE:
                pos = tl.load(pos_ptr + b.to(tl.int64) * T + tok, mask=ok, other=0)
                base = 0
                if not EXACT:
                    base = tl.load(pos_ptr + b.to(tl.int64) * T + t0)
                    if tl.sum(tl.where(ok & (pos != base + (tok - t0)), 1, 0), axis=0) == 0:
                        cos, sin = cos_tab, sin_tab
                    else:  # positions not consecutive: each token's own angle, q unrotated
                        base = base * 0
                        cos, sin = _cos_sin(pos.to(tl.float32)[:, None] * inv_freq[None, :], CUDA)
                        cos, sin = cos.to(OUT), sin.to(OUT)
                else:
                    cos, sin = _cos_sin(pos.to(tl.float32)[:, None] * inv_freq[None, :], CUDA)
                k1, k2 = k1 * cos - k2 * sin, k2 * cos + k1 * sin
                if not EXACT:  # q . R(base w + t w) k = (R(base w)^T q) . (R(t w) k)
                    cb, sb = _cos_sin(base.to(tl.float32) * inv_freq, CUDA)
                    qa = (q1 * cb[None, :] + q2 * sb[None, :]).to(DOT_DTYPE)
                    qb = (q2 * cb[None, :] - q1 * sb[None, :]).to(DOT_DTYPE)
            s = _qk(qa, k1, DOT_DTYPE, PRECISION) + _qk(qb, k2, DOT_DTYPE, PRECISION)
            p, m, alpha = softmax_step(s, ok & (S + tok >= first), m)
            v = _affine(_centroids(vc, tok, ok, v_tab, v_lo, 0, D, W, BITS, EPW, OUT, CUDA),
                        tl.load(v_scale + tok, mask=ok, other=0.0)[:, None],
                        tl.load(v_off + tok, mask=ok, other=0.0)[:, None])
            if N_OUT > 0:
                v, _ = _write_outliers(v, chan, v_chan_ptr, v_val_ptr, (bh.to(tl.int64) * T + tok) * N_OUT,
                                       tl.where(ok, N_OUT, 0), CUDA, UNROLL=N_OUT)
            l, acc = accumulate(p, v, alpha, l, acc, DOT_DTYPE, PRECISION)
    else:  # the last program of each (b, kv head): the sink (cache tokens 0 ... S - 1) and the exact store tokens
        q = (tl.load(q_row + chan[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32) * sm_scale).to(DOT_DTYPE)
        m, l, acc = dense_tokens(q, sk_ptr + bh.to(tl.int64) * (S * D), sv_ptr + bh.to(tl.int64) * (S * D), S, 0,
                                  first, 0, m, l, acc, chan, D, BLOCK_T, DOT_DTYPE, PRECISION, False)
        m, l, acc = dense_tokens(q, rk_ptr + bh.to(tl.int64) * (TR * D), rv_ptr + bh.to(tl.int64) * (TR * D), TR,
                                  S + TQ, first, 0, m, l, acc, chan, D, BLOCK_T, DOT_DTYPE, PRECISION, False)
    store_partial(m_ptr, l_ptr, acc_ptr, m, l, acc, bh * REP, rows, row_ok, chan, split, splits, D)


def check_inputs(q, keys, values, params, sink_k, sink_v, res_k, res_v, bits, rope, positions, start) -> None:
    """Raise ValueError naming the first input whose dtype or shape does not fit the layouts above."""
    fmt.check_bits(bits)
    b, hq, d, hkv, s = check_heads(q, sink_k, "sink_k")
    if d & (d - 1) or d < 16:
        raise ValueError(f"head size {d} must be a power of two >= 16")
    if any(x.dtype != q.dtype for x in (sink_k, sink_v, res_k, res_v)):
        raise ValueError(f"sink_k / sink_v / res_k / res_v must be in q's dtype {q.dtype}; got {sink_k.dtype}, "
                         f"{sink_v.dtype}, {res_k.dtype}, {res_v.dtype}")
    t, w = values.codes.shape[2], -(-d // (32 // bits))
    if res_k.dim() != 4 or res_k.shape[2] > t:
        raise ValueError(f"res_k must be [B, Hkv, R <= {t} stored tokens, D]; got {tuple(res_k.shape)}")
    n_out = 0 if values.sparse is None else values.sparse.channel.shape[-1]
    k_sp = keys.sparse
    expected = {"sink_v": (sink_v, (b, hkv, s, d), (q.dtype,)),
                "res_k": (res_k, (b, hkv, res_k.shape[2], d), (q.dtype,)),
                "res_v": (res_v, tuple(res_k.shape), (q.dtype,)),
                "keys.codes": (keys.codes, (b, hkv, t, w), (torch.int32,)),
                "values.codes": (values.codes, (b, hkv, t, w), (torch.int32,)),
                "values.scale": (values.scale, (b, hkv, t), (torch.float16,)),
                "values.offset": (values.offset, (b, hkv, t), (torch.float16,)),
                "key_offset": (params.key_offset, (hkv, d), (torch.float32,)),
                "key_scale": (params.key_scale, (hkv, d), (torch.float32,)),
                "key_codebook": (params.key_codebook, (2**bits,), (torch.float32,)),
                "value_codebook": (params.value_codebook, (2**bits,), (torch.float32,))}
    if k_sp is not None:
        expected |= {"keys.sparse.row_ptr": (k_sp.row_ptr, (t * b * hkv + 1,), (torch.int32,)),
                     "keys.sparse.index": (k_sp.index, (k_sp.value.numel(),), (torch.int16,)),
                     "keys.sparse.value": (k_sp.value, (k_sp.index.numel(),), (torch.float16,))}
    if values.sparse is not None:
        expected |= {"values.sparse.channel": (values.sparse.channel, (b, hkv, t, n_out), (torch.int16,)),
                     "values.sparse.value": (values.sparse.value, (b, hkv, t, n_out), (torch.float16,))}
    if rope is not None:
        expected |= {"positions": (positions, (b, t), (torch.int32,)),
                     "rope inv_freq": (rope[0], (d // 2,), (torch.float32,))}
        if positions is None:
            raise ValueError("pre-RoPE keys (rope given) need positions int32 [B, T]")
    check_tensors(expected, f"q {tuple(q.shape)}, {s} sink and {t} stored tokens, {bits} bits")
    if start is not None and (start.shape != (b,) or start.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"start must be an integer tensor [B={b}]; got {start.dtype} {tuple(start.shape)}")


def launch(config, q, keys, values, params, sink_k, sink_v, res_k, res_v, bits, sm_scale, rope, positions,
           start) -> torch.Tensor:
    b, hq, d = q.shape
    hkv, s, tr = sink_k.shape[1], sink_k.shape[2], res_k.shape[2]
    t = values.codes.shape[2]
    block_t = config["BLOCK_T"]
    per_split = max(block_t, triton.cdiv(triton.cdiv(t - tr, config["SPLITS"]), block_t) * block_t)
    splits = triton.cdiv(t - tr, per_split) + 1  # shares of the store read quantized, then the exact tokens' program
    m = torch.empty(b * hq * splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(b * hq * splits, d, dtype=torch.float32, device=q.device)
    k_sp = keys.sparse or (m, m, m)  # unread placeholders without outliers (likewise below)
    v_sp = values.sparse or (m, m)
    inv_freq, scaling = rope if rope is not None else (m, 1.0)
    tensors = [x.contiguous() for x in (q, keys.codes, params.key_offset, params.key_scale, params.key_codebook,
                                        *k_sp, values.codes, values.scale, values.offset, params.value_codebook,
                                        *v_sp, m if positions is None else positions, inv_freq, sink_k, sink_v, res_k,
                                        res_v)]
    _kvquant_attention_kernel[(b * hkv, splits)](
        *tensors, start.contiguous() if start is not None else m, m, l, acc, hkv, t, t - tr, s, tr, per_split,
        sm_scale, scaling,
        D=d, REP=hq // hkv, BITS=bits, EPW=32 // bits, KEY_OUTLIERS=keys.sparse is not None,
        N_OUT=0 if values.sparse is None else values.sparse.channel.shape[-1], ROPE=rope is not None,
        BLOCK_T=block_t, HAS_START=start is not None, **dot_args(q.dtype), R=REP_PAD,
        CUDA=not interpreter_on(), num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    o = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    combine_kernel[(b * hq,)](m, l, acc, o, SPLITS=splits, SPLITS_PAD=max(2, next_power_of_2(splits)), D=d)
    return o


def candidates(tokens: int) -> list[dict]:
    """split_kv.configs with the 8-warp ones first: the default (configs[0], what an untuned GPU runs) is then
    BLOCK_T 64 in 8 warps, whose tiles fit the registers, where every 4-warp config spills (benchmarks/RESULTS.md)."""
    return sorted(configs(tokens), key=lambda c: c["num_warps"] != 8)


def kvquant_decode_attention(q, keys: fmt.PackedKeys, values: fmt.PackedValues, params: fmt.LayerParams, sink_k,
                             sink_v, res_k, res_v, *, bits: int, sm_scale: float | None = None, rope=None,
                             positions=None, start=None) -> torch.Tensor:
    """o [B, Hq, D] = softmax(sm_scale q K^T) V over the sink, the quantized store and its last R tokens exact in
    res_k, res_v (module docstring); sm_scale defaults to 1 / sqrt(D). rope = (inv_freq, scaling) with positions:
    pre-RoPE keys, rotated in the kernel."""
    check_inputs(q, keys, values, params, sink_k, sink_v, res_k, res_v, bits, rope, positions, start)
    check_device({"q": q, "keys": keys.codes, "values": values.codes, "key_codebook": params.key_codebook,
                  "sink_k": sink_k, "res_k": res_k, "positions": positions,
                  "rope inv_freq": None if rope is None else rope[0], "start": start})
    sm_scale = 1 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    t = values.codes.shape[2]
    if t + sink_k.shape[2] == 0:
        raise ValueError("the cache is empty: nothing to attend to")
    key = {"T": next_power_of_2(t - res_k.shape[2]), "B": q.shape[0], "Hq": q.shape[1], "Hkv": sink_k.shape[1],
           "D": q.shape[2], "bits": bits, "outliers": int(values.sparse is not None or keys.sparse is not None),
           "rope": int(rope is not None), "dtype": str(q.dtype).removeprefix("torch.")}
    args = (q, keys, values, params, sink_k, sink_v, res_k, res_v, bits, sm_scale, rope, positions, start)
    config = tune("kvquant_decode_attention", key, candidates(key["T"]), lambda c: launch(c, *args), q.device)
    return launch(config, *args)


__all__ = ["kvquant_decode_attention", "kvquant_decode_attention_ref"]

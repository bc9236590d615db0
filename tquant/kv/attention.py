"""Decode attention over a quantized KV cache (KIVI's formats; flash-decoding): Triton kernels and the torch
reference.

One new query token per sequence attends to every cached token:
    o[b, h] = softmax(sm_scale * q[b, h] K_b^T + mask) V_b,     K_b = [dequant(packed K) ; residual K]  (same for V)
    q      [B, Hq, D] fp16 / bf16 / fp32; Hq = rep * Hkv (GQA: query head h reads KV head h // rep)
    packed keys    tquant.kv.uniform_format.PackedKV, per channel (KIVI, key_axis="channel"): codes int32
                   [B, Hkv, Tq / G * wpg, D], scale, mn fp16 [B, Hkv, Tq / G, D]; or per token (key_axis="token",
                   QoQ's KV4) in the values' layout
    packed values  PackedKV: codes int32 [B, Hkv, Tq, D / G * wpg], scale, mn fp16 [B, Hkv, Tq, D / G]
    res_k, res_v   [B, Hkv, Tr, D] in q's dtype (the full-precision window), Tr >= 0
    start  int32 [B] or None: tokens before start[b] are masked (a left-padded batch; ragged lengths)
    length int32 [B] or None: packed tokens at or past length[b] are masked and not read (a static cache whose
           store is allocated for Tq tokens and filled up to length[b]; tquant.decode)
    newest int32 [B] or None (needs length): the window is a ring of Tr slots (a static KIVI cache): slot s holds
           position newest[b] - ((newest[b] - s) mod Tr), and only positions length[b] ... newest[b] are attended
    o      [B, Hq, D] in q's dtype; fp32 softmax and accumulation
Every cache part is read as heads of contiguous rows, head (b, h) at element (b * H + h) * s of the part, s its own
head stride (by_heads): a growing store's view (its heads `capacity` rows apart) is read in place, not copied.
Kernel: grid (B * Hkv, SPLITS + 1). A program takes one KV head and all its rep query heads (K and V are read
once for them; the rep rows are padded to 16 for tl.dot). Programs 0 ... SPLITS - 1 each take one contiguous
share of the Tq packed tokens, BLOCK_T at a time: contiguous tiles of code words and parameters are loaded,
the codes shifted out of the words in registers and scaled (code * scale + mn; _tile, _dequant); the last program
takes the Tr residual tokens. Scores, the running max / sum and the rep x D accumulator stay in fp32 (online
softmax; the accumulator holds the share's output so far, normalized, so that bf16 / fp32 values up to 3e38 do not
overflow it: split_kv). Each program writes its (max, sum, accumulator) to a workspace; `combine_kernel` merges them:
o = sum_s c_s acc_s, c_s = e^(m_s - M) l_s / sum e^(m_s - M) l_s. A fully masked share contributes nothing (its max
is -inf).
`kivi_decode_attention_ref` is plain torch in fp32 from tquant.kv.uniform_format's decoders. `float_decode_attention` runs
the same kernel over a float cache [B, Hkv, T, D] (the static decoder's fp16 cache): its store shares load keys
and values as they are (no codes), its reference is `reference_attention`. `fp8_decode_attention` runs it over the fp8
KV cache (tquant.kv.fp8_format: float8_e4m3fn [B, Hkv, Tq, D], one fp32 scale a KV head for keys and one for values):
its store shares load e4m3 tiles, convert them to fp32 (exact) and multiply by the head's scale (FP8 constexpr),
then attend as over a float cache; reference `fp8_decode_attention_ref` (torch's float8 cast, fp32).

Folded parameters (FOLD_K / FOLD_V, issue 30; `folded` says where): a part stored per token with one group a head
(group == D at 2 / 4 / 8 bits: QoQ's KV4 keys and values, KIVI's values at group D) has one (scale_t, mn_t) a token,
so they leave the element loop:
    s[r, t] = sum_d q[r, d] (c[t, d] scale_t + mn_t) = scale_t (q_r . c_t) + mn_t qsum[r],   qsum[r] = sum_d q[r, d]
    sum_t p[r, t] (c[t, :] scale_t + mn_t) = sum_t (p[r, t] scale_t) c[t, :] + sum_t p[r, t] mn_t
The dots take the raw codes c as floats (exact small integers: fp16 (code | 0x6400) - 1024, on the GPU one LOP3 and
one HSUB2 per half2 pair of codes i and i + EPW / 2 of a word, 16 bits apart, so a tile's channels come in that
pair order and q and the accumulator are permuted to match, _paired_channels). Rounding: the scores' dot is exact
products summed in fp32 and scale_t, mn_t qsum are applied in fp32 on [R, BLOCK_T] (no fp16 rounding of keys, unlike
the unfolded fp16 path's code * scale + mn in fp16). The values' weights p scale_t are rounded once to the dot's
dtype: in fp16 as p scale_t 2^15 / top, top the largest value scale of the program's share (_largest_scale, a
pre-pass), so every weight lies in [0, 2^15] (no overflow) and keeps fp16's 11 bits down
to p scale_t / top = 2^-29 (the dot's sum, at most BLOCK_T 2^15 255, fits fp32); bf16 / fp32 as p / l' scale_t in
[0, 65504]. sum_t p mn_t is an fp32 row sum. Masked tokens' parameters are zeroed, not only their p.

Real rows (v6, REAL_ROWS = R > 0, issue 30; `real_rows` says where): where both parts are folded and rep <= 8, the
online softmax runs on the R = next_power_of_2(rep) real query rows instead of the 16 padded ones (_real_row_tiles).
Both dots are transposed so that the query rows are the MMA's N side (16 columns, tl.dot's minimum) and the tokens /
channels its M side:
    s^T [BLOCK_T, 16] = c q16^T,   o^T [D, 16] = c^T P^T,   q16 row 2 i = query head i (i < rep), other rows 0
In the MMA's output layout a thread holds columns 2 j + {0, 1} (lane bits 0, 1 give j's low bits) and columns
n + {0, 8} (registers), so column bits 0 and 3 lie in each thread's registers: the real rows, columns 2 i, are taken
by tl.split of register dims (_real_rows: [N, 16] -> [N, 8, 2], keep the even half; then halves of the rest while
wider than R), which moves no data, and each thread keeps BLOCK_T R / (32 num_warps) scores (2 at BLOCK_T 64, R 4,
4 warps, against 8 of the 16 padded rows) and D R / (32 num_warps) accumulator elements (4 against 16). P^T for
the second dot is the inverse (_padded_rows: join with zeros), whose padding columns multiply to exact zeros.
The maths and rounding are the folded ones above, per column instead of per row: s^T[t, i] = scale_t (c_t . q_i)
+ mn_t qsum[i], m, l [R], acc [D, R] (stored transposed, rows i < rep). Rep 1 / 2 also split a lane-held dim
(a layout conversion; still fewer instructions than v5); rep 9 ... 16 keeps v5. On sm_90, M = BLOCK_T or D >= 64
lets Triton use wgmma (HGMMA 64x16x16) for both dots.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .fp8_format import dequantize_fp8_kv
from .uniform_format import PackedKV, check_key_axis, check_kv_bits, dequantize_values, key_format, words_per_group
from ..formats.packing import values_per_word
from ..kernels.autotune_cache import tune
from ..kernels.runtime import DTYPES, check_device, check_tensors, dot_args, interpreter_on, next_power_of_2
from ..kernels.tiling import unpack_words
from .split_kv import (REP_PAD, accumulate, check_heads, combine_kernel, configs, dense_tokens, initial_state,
                       reference_attention, scores, softmax_step, store_partial)

def kivi_decode_attention_ref(q, packed_k: PackedKV, packed_v: PackedKV, res_k, res_v, *, bits: int, group: int,
                              sm_scale: float, start=None, key_axis: str = "channel", length=None,
                              newest=None) -> torch.Tensor:
    """The same attention in fp32 through tquant.kv.uniform_format's decoders, in q's dtype."""
    keys = key_format(key_axis)[1](packed_k, bits, group)
    k = torch.cat([keys, res_k.float()], dim=-2)
    v = torch.cat([dequantize_values(packed_v, bits, group), res_v.float()], dim=-2)
    unread = None
    if length is not None:  # packed positions >= length[b]; the residual window after them is read
        pos = torch.arange(k.shape[2], device=q.device)[None, :]
        unread = (pos >= length.to(q.device)[:, None]) & (pos < keys.shape[2])
    if newest is not None:  # ring slot s holds position newest - (newest - s) mod Tr, read from length on
        tr, tq = res_k.shape[2], keys.shape[2]
        slot = torch.arange(tr, device=q.device)[None, :]
        held = newest.to(q.device)[:, None] - (newest.to(q.device)[:, None] - slot) % tr
        unread[:, tq:] = held < length.to(q.device)[:, None]
        if start is not None:  # the ring's positions are not tq + slot: mask its tokens before start here
            unread[:, tq:] |= held < start.to(q.device)[:, None]
            unread[:, :tq] |= torch.arange(tq, device=q.device)[None, :] < start.to(q.device)[:, None]
            start = None
    return reference_attention(q, k, v, sm_scale, start, unread)


@triton.jit
def _dequant(code, scale, mn, OUT: tl.constexpr):
    """code * scale + mn in OUT (the dot's dtype) for int32 codes in [0, 256), with no int-to-float conversion
    (a quarter-rate instruction): the code is or-ed into the mantissa of a float whose exponent makes it land
    on an integer (fp16 0x6400 = 1024: 1024 + code; fp32 0x4B000000 = 2^23: 2^23 + code), and the offset is
    subtracted exactly. fp16 caches compute in fp16 (one rounding, as the cast of an fp32 result would round);
    bf16 / fp32 in fp32, cast last."""
    if OUT == tl.float16:
        c = _code_float(code, tl.float16)
        # one fma: c * scale alone can pass fp16's max where c * scale + mn does not (a range past 65504 at 2 bits)
        return tl.fma(c, scale.to(tl.float16), mn.to(tl.float16))
    else:
        return (_code_float(code, tl.float32) * scale.to(tl.float32) + mn.to(tl.float32)).to(OUT)


@triton.jit
def _code_float(code, OUT: tl.constexpr):
    """int32 codes in [0, 256) as exact floats in OUT, by the magic number (_dequant): fp16 (code | 0x6400) - 1024;
    fp32 (code | 0x4B000000) - 2^23; bf16 through fp32 (bf16's 8 significant bits hold 0 ... 255 exactly, but
    no bf16 exponent spans them with a step of 1)."""
    if OUT == tl.float16:
        return (code | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    else:
        return ((code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0).to(OUT)


@triton.jit
def _gathered_tile(codes_ptr, scale_ptr, mn_ptr, tok, chan, ok, CODE_ROW: tl.constexpr, PARAM_ROW: tl.constexpr,
                   PER_CHANNEL: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, EPW: tl.constexpr,
                   WPG: tl.constexpr, OUT: tl.constexpr):
    """Values (in OUT) of tokens tok [T, 1] x channels chan [1, D], each code word gathered by its own address
    (any layout; the path of 3-bit codes, whose EPW * WPG slots do not fill a group exactly). PER_CHANNEL: codes
    packed along tokens within each group, parameters per (token group, channel); else along channels, per
    (token, channel group). CODE_ROW / PARAM_ROW: elements per token row of the codes / parameters of one
    (b, head)."""
    if PER_CHANNEL:
        i = tok % G
        word = ((tok // G) * WPG + i // EPW) * CODE_ROW + chan
        param = (tok // G) * PARAM_ROW + chan
    else:
        i = chan % G
        word = tok * CODE_ROW + (chan // G) * WPG + i // EPW
        param = tok * PARAM_ROW + chan // G
    w = tl.load(codes_ptr + word, mask=ok, other=0)
    scale = tl.load(scale_ptr + param, mask=ok, other=0.0)
    mn = tl.load(mn_ptr + param, mask=ok, other=0.0)
    return _dequant((w >> ((i % EPW) * BITS)) & ((1 << BITS) - 1), scale, mn, OUT)


@triton.jit
def _tile(codes_ptr, scale_ptr, mn_ptr, t0, TQ, chan, PER_CHANNEL: tl.constexpr, BLOCK_T: tl.constexpr,
          D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, EPW: tl.constexpr, WPG: tl.constexpr,
          OUT: tl.constexpr):
    """[BLOCK_T, D] values (in OUT) of tokens t0 ... t0 + BLOCK_T - 1 of a packed store of TQ tokens (zero past
    TQ). Where a group's words hold exactly its G codes (2, 4, 8 bits), every load is a contiguous tile: per
    channel (keys), word row r holds tokens r EPW ... r EPW + EPW - 1 of every channel ([BLOCK_T / EPW, D]
    words); per token, a token's D / EPW words hold its channels in order ([BLOCK_T, D / EPW] words); the codes
    come out of the words in registers (tiling.unpack_words), and the parameters ([BLOCK_T / G, D] per channel,
    [BLOCK_T, D / G] per token) are broadcast over their groups. 3-bit codes take _gathered_tile."""
    tok = t0 + tl.arange(0, BLOCK_T)
    ok = tok < TQ
    if EPW * WPG != G:
        out = _gathered_tile(codes_ptr, scale_ptr, mn_ptr, tok[:, None], chan[None, :], ok[:, None],
                             D if PER_CHANNEL else D // G * WPG, D if PER_CHANNEL else D // G, PER_CHANNEL, BITS,
                             G, EPW, WPG, OUT)
    else:
        if PER_CHANNEL:
            r = t0 // EPW + tl.arange(0, BLOCK_T // EPW)
            w = tl.load(codes_ptr + r[:, None] * D + chan[None, :], mask=(r < TQ // EPW)[:, None], other=0)
            code = tl.trans(unpack_words(tl.trans(w), BITS))
            if BLOCK_T >= G:
                g = t0 // G + tl.arange(0, BLOCK_T // G)
                g_ok = (g < TQ // G)[:, None]
                scale = tl.load(scale_ptr + g[:, None] * D + chan[None, :], mask=g_ok, other=0.0)
                mn = tl.load(mn_ptr + g[:, None] * D + chan[None, :], mask=g_ok, other=0.0)
                scale = tl.reshape(tl.broadcast_to(scale[:, None, :], [BLOCK_T // G, G, D]), [BLOCK_T, D])
                mn = tl.reshape(tl.broadcast_to(mn[:, None, :], [BLOCK_T // G, G, D]), [BLOCK_T, D])
            else:  # the whole tile lies in one group, a stored one (the loop's t0 < TQ)
                scale = tl.load(scale_ptr + (t0 // G) * D + chan)[None, :]
                mn = tl.load(mn_ptr + (t0 // G) * D + chan)[None, :]
        else:
            c = tl.arange(0, D // EPW)
            w = tl.load(codes_ptr + tok[:, None] * (D // EPW) + c[None, :], mask=ok[:, None], other=0)
            code = unpack_words(w, BITS)
            p = tl.arange(0, D // G)
            scale = tl.load(scale_ptr + tok[:, None] * (D // G) + p[None, :], mask=ok[:, None], other=0.0)
            mn = tl.load(mn_ptr + tok[:, None] * (D // G) + p[None, :], mask=ok[:, None], other=0.0)
            scale = tl.reshape(tl.broadcast_to(scale[:, :, None], [BLOCK_T, D // G, G]), [BLOCK_T, D])
            mn = tl.reshape(tl.broadcast_to(mn[:, :, None], [BLOCK_T, D // G, G]), [BLOCK_T, D])
        out = _dequant(code, scale, mn, OUT)
    return out


@triton.jit
def _code_pair(w, J: tl.constexpr, BITS: tl.constexpr, EPW: tl.constexpr, OUT: tl.constexpr, ASM: tl.constexpr):
    """(code J, code J + EPW / 2) of every word w as exact floats in OUT (_code_float). The two lie 16 bits apart,
    so on the GPU (ASM, fp16) one LOP3 (mask both, or 0x6400 into both halves) after the shift and one HSUB2 of
    1024 make both as one half2 register that needs no repacking."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; lop3.b32 t, $2, $3, $4, 0xEA; sub.f16x2 t, t, $4; mov.b32 {$0, $1}, t; }",
            "=h,=h,r,r,r", [w >> (J * BITS), ((1 << BITS) - 1) * 0x10001, 0x64006400],
            dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        return (_code_float((w >> (J * BITS)) & ((1 << BITS) - 1), OUT),
                _code_float((w >> ((J + EPW // 2) * BITS)) & ((1 << BITS) - 1), OUT))


@triton.jit
def _code_pairs(w, J: tl.constexpr, STRIDE: tl.constexpr, COUNT: tl.constexpr, BITS: tl.constexpr,
                EPW: tl.constexpr, OUT: tl.constexpr, ASM: tl.constexpr):
    """(codes J + STRIDE i, codes J + STRIDE i + EPW / 2) for i < COUNT of every word, each stacked on trailing
    dims of size 2 (tl.join: they stay in each thread), flattened trailing index i holding code J + STRIDE i."""
    if COUNT == 1:
        return _code_pair(w, J, BITS, EPW, OUT, ASM)
    else:
        a_lo, a_hi = _code_pairs(w, J, 2 * STRIDE, COUNT // 2, BITS, EPW, OUT, ASM)
        b_lo, b_hi = _code_pairs(w, J + STRIDE, 2 * STRIDE, COUNT // 2, BITS, EPW, OUT, ASM)
        return tl.join(a_lo, b_lo), tl.join(a_hi, b_hi)


@triton.jit
def _paired_channels(p, EPW: tl.constexpr):
    """The channel that position p of a _token_codes tile holds: word p // EPW, code i + s EPW / 2 of it at
    position 2 i + s within the word (a permutation of 0 ... D - 1)."""
    r = p % EPW
    return p - r + r // 2 + (r % 2) * (EPW // 2)


@triton.jit
def _token_codes(codes_ptr, tok, ok, BITS: tl.constexpr, D: tl.constexpr, EPW: tl.constexpr, OUT: tl.constexpr,
                 ASM: tl.constexpr):
    """[BLOCK_T, D] codes (exact floats in OUT, 0 where not ok [BLOCK_T]) of tokens tok [BLOCK_T] of a per-token
    store with one group a head (G = D, 2 / 4 / 8 bits: each token's D / EPW words hold its D codes in order),
    from a contiguous [BLOCK_T, D / EPW] tile of words, the channels in _paired_channels' order: codes i and
    i + EPW / 2 of a word (16 bits apart) side by side, one half2 register of the dot operand on the GPU."""
    c = tl.arange(0, D // EPW)
    w = tl.load(codes_ptr + tok[:, None] * (D // EPW) + c[None, :], mask=ok[:, None], other=0)
    lo, hi = _code_pairs(w, 0, 1, EPW // 2, BITS, EPW, OUT, ASM)
    return tl.reshape(tl.join(lo, hi), [tok.shape[0], D])


@triton.jit
def _folded_scores(q, qsum, codes_ptr, scale_ptr, mn_ptr, tok, ok, live, m, BITS: tl.constexpr, D: tl.constexpr,
                   EPW: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ASM: tl.constexpr):
    """Online softmax, first half (split_kv.softmax_step), over per-token keys with one (scale, mn) a token and
    head (module docstring, "Folded parameters"): s[r, t] = scale_t (q_r . c_t) + mn_t qsum[r], the dot over the
    codes c (_token_codes), the parameters applied to the [R, BLOCK_T] scores in fp32."""
    c = _token_codes(codes_ptr, tok, ok, BITS, D, EPW, DOT_DTYPE, ASM)
    scale = tl.load(scale_ptr + tok, mask=ok, other=0.0).to(tl.float32)
    mn = tl.load(mn_ptr + tok, mask=ok, other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(c), input_precision=PRECISION) * scale[None, :] + qsum[:, None] * mn[None, :]
    return softmax_step(s, live, m)


@triton.jit
def _live_value_params(scale_ptr, mn_ptr, tok, ok, live):
    """(scale, mn) [BLOCK_T] in fp32 of the folded values' tokens tok, 0 where not live: a masked token's p is 0, but
    a static store's unfilled rows may hold inf / NaN parameters, and 0 * inf would poison the dot."""
    scale = tl.where(live, tl.load(scale_ptr + tok, mask=ok, other=0.0).to(tl.float32), 0.0)
    mn = tl.where(live, tl.load(mn_ptr + tok, mask=ok, other=0.0).to(tl.float32), 0.0)
    return scale, mn


@triton.jit
def _folded_accumulate(p, codes_ptr, scale_ptr, mn_ptr, tok, ok, live, alpha, l, acc, top, BITS: tl.constexpr,
                       D: tl.constexpr, EPW: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                       ASM: tl.constexpr):
    """Online softmax, second half (split_kv.accumulate), over per-token values with one (scale, mn) a token and
    head (module docstring, "Folded parameters"): sum_t p[r, t] (c[t, :] scale_t + mn_t) as one dot over the codes
    c (_token_codes) with weights p scale_t (fp16: p scale_t 2^15 / top, top >= every scale_t of the share) and
    the fp32 sum_t p mn_t added to every channel."""
    c = _token_codes(codes_ptr, tok, ok, BITS, D, EPW, DOT_DTYPE, ASM)
    scale, mn = _live_value_params(scale_ptr, mn_ptr, tok, ok, live)
    l_new = l * alpha + tl.sum(p, axis=1)
    inv = tl.where(l_new > 0, 1.0 / l_new, 0.0)
    if DOT_DTYPE == tl.float16:
        w = (p * (scale * (32768.0 / top))[None, :]).to(DOT_DTYPE)  # in [0, 2^15]
        pv = tl.dot(w, c, input_precision=PRECISION) * (inv * (top * (1.0 / 32768.0)))[:, None]
    else:  # p / l' scale_t in [0, 65504]
        pv = tl.dot((p * inv[:, None] * scale[None, :]).to(DOT_DTYPE), c, input_precision=PRECISION)
    shift = tl.sum(p * mn[None, :], axis=1)
    return l_new, acc * (alpha * l * inv)[:, None] + pv + (shift * inv)[:, None]


@triton.jit
def _real_rows(x, R: tl.constexpr, W: tl.constexpr = 16):
    """x [N, W] (W = 16 the padded query rows, as tl.dot's output s^T or o^T gives them) -> [N, R]: its columns
    2 i, i < R (the real rows: the kernel loads query head i into row 2 i of q16), by tl.split (no data movement
    where the split dim lies in each thread's registers, as an MMA output's column bits 0 and 3 do: R = 4 keeps
    column bits 1, 2, held by lanes; R = 1, 2 also split a lane bit)."""
    if W == 16:
        x, _ = tl.split(tl.reshape(x, [x.shape[0], 8, 2]))
        return _real_rows(x, R, 8)
    elif W > R:
        x, _ = tl.split(tl.permute(tl.reshape(x, [x.shape[0], 2, W // 2]), (0, 2, 1)))
        return _real_rows(x, R, W // 2)
    else:
        return x


@triton.jit
def _padded_rows(x, R: tl.constexpr, W: tl.constexpr = 16):
    """The inverse of _real_rows: x [N, R] -> [N, W = 16] holding x's column i at column 2 i, zeros elsewhere."""
    if R == W // 2:
        return tl.reshape(tl.join(x, tl.zeros_like(x)), [x.shape[0], W])
    else:
        x = tl.reshape(tl.permute(tl.join(x, tl.zeros_like(x)), (0, 2, 1)), [x.shape[0], 2 * R])
        return _padded_rows(x, 2 * R, W)


@triton.jit
def _real_row_tiles(qt, qsum, codes_k, ks_ptr, km_ptr, codes_v, vs_ptr, vm_ptr, lo, hi, first, top, chan,
                    BITS: tl.constexpr, D: tl.constexpr, EPW: tl.constexpr, BLOCK_T: tl.constexpr, R: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ASM: tl.constexpr):
    """v6 (module docstring, "Real rows"): the folded loop (_folded_scores, _folded_accumulate) with both dots
    transposed, s^T = c q^T [BLOCK_T, 16] and o^T = c^T P^T [D, 16], so that the query rows are the MMA's N
    columns; the online softmax and the accumulator run on the R real columns only (_real_rows). qt [D, 16]: q^T
    with real row i in column 2 i (zeros elsewhere); qsum [R]. Returns (m [R], l [R], acc [D, R])."""
    m = tl.full([R], float("-inf"), dtype=tl.float32)
    l = tl.zeros([R], dtype=tl.float32)
    acc = tl.zeros([D, R], dtype=tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        tok = t0 + tl.arange(0, BLOCK_T)
        ok = tok < hi
        live = ok & (tok >= first)
        c = _token_codes(codes_k, tok, ok, BITS, D, EPW, DOT_DTYPE, ASM)
        scale = tl.load(ks_ptr + tok, mask=ok, other=0.0).to(tl.float32)
        mn = tl.load(km_ptr + tok, mask=ok, other=0.0).to(tl.float32)
        s = _real_rows(tl.dot(c, qt, input_precision=PRECISION), R) * scale[:, None] + mn[:, None] * qsum[None, :]
        s = tl.where(live[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[None, :])
        alpha = tl.exp(m - m_safe)
        m = m_new
        c = _token_codes(codes_v, tok, ok, BITS, D, EPW, DOT_DTYPE, ASM)
        scale, mn = _live_value_params(vs_ptr, vm_ptr, tok, ok, live)
        l_new = l * alpha + tl.sum(p, axis=0)
        inv = tl.where(l_new > 0, 1.0 / l_new, 0.0)
        if DOT_DTYPE == tl.float16:
            w = _padded_rows((p * (scale * (32768.0 / top))[:, None]).to(DOT_DTYPE), R)  # in [0, 2^15]
            pv = _real_rows(tl.dot(tl.trans(c), w, input_precision=PRECISION), R) * \
                (inv * (top * (1.0 / 32768.0)))[None, :]
        else:  # p / l' scale_t in [0, 65504]
            w = _padded_rows((p * inv[None, :] * scale[:, None]).to(DOT_DTYPE), R)
            pv = _real_rows(tl.dot(tl.trans(c), w, input_precision=PRECISION), R)
        shift = tl.sum(p * mn[:, None], axis=0)
        acc = acc * (alpha * l * inv)[None, :] + pv + (shift * inv)[None, :]
        l = l_new
    return m, l, acc


@triton.jit
def _largest_scale(scale_ptr, lo, hi, first, BLOCK: tl.constexpr):
    """max(scale[t] for first <= t, lo <= t < hi) in fp32, 1 if none is positive: _folded_accumulate's top."""
    top = tl.zeros([BLOCK], dtype=tl.float32)
    for t0 in range(lo, hi, BLOCK):
        tok = t0 + tl.arange(0, BLOCK)
        top = tl.maximum(top, tl.load(scale_ptr + tok, mask=(tok < hi) & (tok >= first), other=0.0).to(tl.float32))
    top = tl.max(top, axis=0)
    return tl.where(top > 0, top, 1.0)


@triton.jit
def _kv_attention_kernel(
    q_ptr, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, rk_ptr, rv_ptr, start_ptr, length_ptr, newest_ptr, m_ptr,
    l_ptr, acc_ptr, kc_head, ks_head, km_head, vc_head, vs_head, vm_head, rk_head, rv_head, HKV, TQ, TR,
    tokens_per_split, sm_scale,
    D: tl.constexpr, REP: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, EPW: tl.constexpr,
    WPG: tl.constexpr, KEYS_PER_CHANNEL: tl.constexpr, BLOCK_T: tl.constexpr, HAS_START: tl.constexpr,
    HAS_LENGTH: tl.constexpr, RING: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, R: tl.constexpr,
    FLOAT: tl.constexpr = False, FP8: tl.constexpr = False, FOLD_K: tl.constexpr = False,
    FOLD_V: tl.constexpr = False, ASM: tl.constexpr = False, REAL_ROWS: tl.constexpr = 0,
):
    bh, split = tl.program_id(0), tl.program_id(1)
    b = bh // HKV
    splits = tl.num_programs(1)
    rows = tl.arange(0, R)  # the rep query heads, padded to R = REP_PAD rows
    chan = tl.arange(0, D)
    row_ok = rows < REP
    q = tl.load(q_ptr + (bh * REP + rows)[:, None] * D + chan[None, :], mask=row_ok[:, None], other=0.0)
    q = (q.to(tl.float32) * sm_scale).to(DOT_DTYPE)
    first, m, l, acc = initial_state(start_ptr, b, HAS_START, R, D)
    out_chan = chan  # the accumulator's channels
    if split < splits - 1:  # a share of the store
        lo = split * tokens_per_split
        hi = tl.minimum(lo + tokens_per_split, TQ)
        if HAS_LENGTH:  # a static store: tokens past length[b] are not read
            hi = tl.minimum(hi, tl.load(length_ptr + b))
        if FLOAT:  # keys kc_ptr, values vc_ptr [B * Hkv, TQ, D] as they are
            m, l, acc = dense_tokens(q, kc_ptr + bh.to(tl.int64) * kc_head + lo * D,
                                      vc_ptr + bh.to(tl.int64) * vc_head + lo * D, hi - lo, lo, first, 0, m, l, acc,
                                      chan, D, BLOCK_T, DOT_DTYPE, PRECISION, False)
        elif FP8:  # e4m3 keys kc_ptr, values vc_ptr [B * Hkv, TQ, D] times the head's fp32 scale at ks_ptr, vs_ptr
            m, l, acc = dense_tokens(q, kc_ptr + bh.to(tl.int64) * kc_head + lo * D,
                                      vc_ptr + bh.to(tl.int64) * vc_head + lo * D, hi - lo, lo, first, 0, m, l, acc,
                                      chan, D, BLOCK_T, DOT_DTYPE, PRECISION, False,
                                      tl.load(ks_ptr + bh * ks_head), tl.load(vs_ptr + bh * vs_head))
        else:  # packed codes
            kc = kc_ptr + bh.to(tl.int64) * kc_head
            ks, km = ks_ptr + bh.to(tl.int64) * ks_head, km_ptr + bh.to(tl.int64) * km_head
            vc = vc_ptr + bh.to(tl.int64) * vc_head
            vs, vm = vs_ptr + bh.to(tl.int64) * vs_head, vm_ptr + bh.to(tl.int64) * vm_head
            if FOLD_K:  # the folded tiles' channels come in _paired_channels' order: q's too
                slot, slot_ok = rows, row_ok
                if REAL_ROWS > 0:  # v6: query head i in row 2 i of the 16 (_real_rows' order)
                    slot, slot_ok = rows // 2, (rows % 2 == 0) & (rows // 2 < REP)
                q = tl.load(q_ptr + (bh * REP + slot)[:, None] * D + _paired_channels(chan, EPW)[None, :],
                            mask=slot_ok[:, None], other=0.0)
                q = (q.to(tl.float32) * sm_scale).to(DOT_DTYPE)
            if FOLD_V:  # and the output's
                out_chan = _paired_channels(chan, EPW)
            qsum = tl.sum(q.to(tl.float32), axis=1)  # the folded keys' minimum term (FOLD_K)
            top = 1.0
            if FOLD_V and DOT_DTYPE == tl.float16:  # the share's largest value scale (fp16 weights' range)
                top = _largest_scale(vs, lo, hi, first, 8 * BLOCK_T)
            if REAL_ROWS > 0:  # v6 (FOLD_K and FOLD_V): q's real rows at 2 i (above), [R] softmax state
                qsum_r = tl.reshape(_real_rows(qsum[None, :], REAL_ROWS), [REAL_ROWS])
                m_r, l_r, acc_r = _real_row_tiles(tl.trans(q), qsum_r, kc, ks, km, vc, vs, vm, lo, hi, first, top,
                                                  chan, BITS, D, EPW, BLOCK_T, REAL_ROWS, DOT_DTYPE, PRECISION, ASM)
                real = tl.arange(0, REAL_ROWS)
                store_partial(m_ptr, l_ptr, acc_ptr, m_r, l_r, tl.trans(acc_r), bh * REP, real, real < REP,
                              out_chan, split, splits, D)
            else:
                for t0 in range(lo, hi, BLOCK_T):
                    tok = t0 + tl.arange(0, BLOCK_T)
                    live = (tok < hi) & (tok >= first)
                    if FOLD_K:  # per-token keys, one (scale, mn) a head: the parameters on the scores
                        p, m, alpha = _folded_scores(q, qsum, kc, ks, km, tok, tok < hi, live, m, BITS, D, EPW,
                                                     DOT_DTYPE, PRECISION, ASM)
                    else:
                        k = _tile(kc, ks, km, t0, TQ, chan, KEYS_PER_CHANNEL, BLOCK_T, D, BITS, G, EPW, WPG,
                                  DOT_DTYPE)
                        p, m, alpha = scores(q, k, live, m, DOT_DTYPE, PRECISION)
                    if FOLD_V:  # one (scale, mn) a token and head: the parameters on p
                        l, acc = _folded_accumulate(p, vc, vs, vm, tok, tok < hi, live, alpha, l, acc, top, BITS,
                                                    D, EPW, DOT_DTYPE, PRECISION, ASM)
                    else:
                        v = _tile(vc, vs, vm, t0, TQ, chan, False, BLOCK_T, D, BITS, G, EPW, WPG, DOT_DTYPE)
                        l, acc = accumulate(p, v, alpha, l, acc, DOT_DTYPE, PRECISION)
                store_partial(m_ptr, l_ptr, acc_ptr, m, l, acc, bh * REP, rows, row_ok, out_chan, split, splits, D)
        if FLOAT or FP8:
            store_partial(m_ptr, l_ptr, acc_ptr, m, l, acc, bh * REP, rows, row_ok, out_chan, split, splits, D)
    else:  # the last program of each (b, kv head): the full-precision residual window
        pos0, newest = TQ, 0
        if RING:  # a static window: positions length[b] ... newest[b] in a ring of TR slots
            pos0, newest = tl.load(length_ptr + b), tl.load(newest_ptr + b)
        m, l, acc = dense_tokens(q, rk_ptr + bh.to(tl.int64) * rk_head, rv_ptr + bh.to(tl.int64) * rv_head, TR,
                                  pos0, first, newest, m, l, acc, chan, D, BLOCK_T, DOT_DTYPE, PRECISION, RING)
        store_partial(m_ptr, l_ptr, acc_ptr, m, l, acc, bh * REP, rows, row_ok, out_chan, split, splits, D)


def check_inputs(q, packed_k, packed_v, res_k, res_v, bits, group, start, key_axis, length=None, newest=None) -> None:
    """Raise ValueError naming the first input whose dtype or shape does not fit the layouts above."""
    check_kv_bits(bits)
    check_key_axis(key_axis)
    b, hq, d, hkv, tr = check_heads(q, res_k, "res_k")
    if d % group or d & (d - 1) or d < 16:
        raise ValueError(f"head size {d} must be a power of two >= 16 and a multiple of group={group}")
    tq = packed_v.codes.shape[2]
    if key_axis == "channel" and tq % group:
        raise ValueError(f"the packed store holds {tq} tokens, not whole groups of {group}")
    if res_v.dtype != q.dtype or res_k.dtype != q.dtype:
        raise ValueError(f"res_k / res_v must be in q's dtype {q.dtype}; got {res_k.dtype}, {res_v.dtype}")
    wpg = words_per_group(bits, group)
    per_token = (b, hkv, tq, d // group * wpg), (b, hkv, tq, d // group)  # codes, parameters
    k_codes, k_params = ((b, hkv, tq // group * wpg, d), (b, hkv, tq // group, d)) if key_axis == "channel" \
        else per_token
    check_tensors({"res_v": (res_v, (b, hkv, tr, d), (q.dtype,)),
                   "keys.codes": (packed_k.codes, k_codes, (torch.int32,)),
                   "keys.scale": (packed_k.scale, k_params, DTYPES),
                   "keys.mn": (packed_k.mn, k_params, DTYPES),
                   "values.codes": (packed_v.codes, per_token[0], (torch.int32,)),
                   "values.scale": (packed_v.scale, per_token[1], DTYPES),
                   "values.mn": (packed_v.mn, per_token[1], DTYPES)},
                  f"q {tuple(q.shape)}, {tq} packed and {tr} residual tokens, {bits} bits, group {group}, "
                  f"keys per {key_axis}")
    for name, t in (("start", start), ("length", length), ("newest", newest)):
        if t is not None and (t.shape != (b,) or t.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"{name} must be an integer tensor [B={b}]; got {t.dtype} {tuple(t.shape)}")
    if newest is not None and (length is None or tr == 0):
        raise ValueError("newest (a ring window) needs length (where the window's positions start) and a window of "
                         "at least one slot")


def by_heads(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(t, s) for a cache part t [B, H, rows, W] whose head (b, h) starts at element (b * H + h) * s and holds its
    rows of W contiguous, as the kernel reads it: t itself where it already is (a view of a growing store,
    tquant.kv.growing, is: its heads are `capacity` rows apart), else a contiguous copy (s = rows * W)."""
    b, h, rows, w = t.shape
    s = t.stride(1) if h > 1 else t.stride(0)
    if t.stride(3) == 1 and (t.stride(2) == w or rows <= 1) and (b == 1 or t.stride(0) == h * s):
        return t, s
    return t.contiguous(), rows * w


def folded(key_axis: str, bits: int, group: int, d: int) -> tuple[bool, bool]:
    """(keys, values): whether the kernel takes each part's parameters out of the element loop (FOLD_K, FOLD_V:
    _folded_scores, _folded_accumulate), which needs one (scale, mn) per token and head: group == D, keys per token
    (QoQ's KV4) for the keys; the values (always per token) of any packed store with group == D (KIVI's too)."""
    whole_head = key_axis in ("channel", "token") and group == d and values_per_word(bits) * words_per_group(
        bits, group) == group
    return whole_head and key_axis == "token", whole_head


def real_rows(folded_kv: bool, rep: int) -> int:
    """R, the real query rows the v6 path (REAL_ROWS: _real_row_tiles) runs the softmax on: rep rounded up to a power
    of two, where both parts are folded and rep <= 8 (the real rows take the even columns of the 16); else 0 (v5).
    The launcher passes it unless the config says {"REAL_ROWS": False} (v5 forced: tests, instruction counts)."""
    return next_power_of_2(rep) if folded_kv and rep <= REP_PAD // 2 else 0


def launch(config, q, packed_k, packed_v, res_k, res_v, bits, group, sm_scale, start, key_axis, length=None,
           newest=None) -> torch.Tensor:
    b, hq, d = q.shape
    hkv, tr = res_k.shape[1], res_k.shape[2]
    tq = packed_v.codes.shape[2]
    block_t = config["BLOCK_T"]
    per_split = max(block_t, triton.cdiv(triton.cdiv(tq, config["SPLITS"]), block_t) * block_t)
    splits = triton.cdiv(tq, per_split) + 1  # shares of the packed store, then the residual window's program
    m = torch.empty(b * hq * splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(b * hq * splits, d, dtype=torch.float32, device=q.device)
    parts = [by_heads(t) for t in (*packed_k, *packed_v, res_k, res_v)]
    tensors = [q.contiguous(), *(t for t, _ in parts)]
    # packed_k / packed_v hold the float keys / values (float_decode_attention), or the e4m3 ones and their scales
    store_float = key_axis in ("float", "fp8")
    fold_k, fold_v = folded(key_axis, bits, group, d)
    _kv_attention_kernel[(b * hkv, splits)](
        *tensors, *(m if t is None else t.contiguous() for t in (start, length, newest)), m, l, acc,
        *(stride for _, stride in parts), hkv, tq, tr, per_split, sm_scale,
        D=d, REP=hq // hkv, BITS=bits, G=group, EPW=1 if store_float else values_per_word(bits),
        WPG=1 if store_float else words_per_group(bits, group), KEYS_PER_CHANNEL=key_axis == "channel",
        BLOCK_T=block_t, HAS_START=start is not None, HAS_LENGTH=length is not None, RING=newest is not None,
        **dot_args(q.dtype), R=REP_PAD, FLOAT=key_axis == "float", FP8=key_axis == "fp8", FOLD_K=fold_k,
        FOLD_V=fold_v, ASM=q.dtype == torch.float16 and not interpreter_on(),
        REAL_ROWS=real_rows(fold_k and fold_v, hq // hkv) if config.get("REAL_ROWS", True) else 0,
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    o = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    combine_kernel[(b * hq,)](m, l, acc, o, SPLITS=splits, SPLITS_PAD=max(2, next_power_of_2(splits)), D=d)
    return o


def kivi_decode_attention(q, packed_k: PackedKV, packed_v: PackedKV, res_k, res_v, *, bits: int, group: int,
                          sm_scale: float | None = None, start=None, key_axis: str = "channel", length=None,
                          newest=None) -> torch.Tensor:
    """o [B, Hq, D] = softmax(sm_scale q K^T) V over the packed store and the residual window (module docstring);
    sm_scale defaults to 1 / sqrt(D). key_axis "token": keys in the values' per-token layout (QoQ's KV4).
    length: the filled part of a static store (no host read of it, so a CUDA graph can replay the call).
    newest (with length): the window is a ring (module docstring), positions length[b] ... newest[b]."""
    check_inputs(q, packed_k, packed_v, res_k, res_v, bits, group, start, key_axis, length, newest)
    check_device({"q": q, "keys": packed_k.codes, "values": packed_v.codes, "res_k": res_k, "start": start,
                  "length": length, "newest": newest})
    sm_scale = 1 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    tq = packed_v.codes.shape[2]
    if tq + res_k.shape[2] == 0:
        raise ValueError("the cache is empty: nothing to attend to")
    key = {"T": next_power_of_2(tq), "B": q.shape[0], "Hq": q.shape[1], "Hkv": res_k.shape[1], "D": q.shape[2],
           "bits": bits, "group": group, "keys": key_axis, "dtype": str(q.dtype).removeprefix("torch.")}
    args = (q, packed_k, packed_v, res_k, res_v, bits, group, sm_scale, start, key_axis, length, newest)
    config = tune("kv_decode_attention", key, configs(key["T"]), lambda c: launch(c, *args), q.device)
    return launch(config, *args)


def float_decode_attention(q, k, v, *, length, sm_scale: float | None = None) -> torch.Tensor:
    """o [B, Hq, D] = softmax(sm_scale q K^T) V over the first length[b] tokens of a float cache k, v [B, Hkv, T, D]
    (a static cache's layer, in q's dtype; length int32 [B], read on the device): the same flash-decoding kernel,
    its store shares loading keys and values as they are. Reference: reference_attention with positions past
    length masked."""
    b, hq, d, hkv, t = check_heads(q, k, "k")
    if d & (d - 1) or d < 16:
        raise ValueError(f"head size {d} must be a power of two >= 16")
    check_tensors({"k": (k, (b, hkv, t, d), (q.dtype,)), "v": (v, (b, hkv, t, d), (q.dtype,)),
                   "length": (length, (b,), (torch.int32, torch.int64))}, f"q {tuple(q.shape)}, a cache of {t} tokens")
    check_device({"q": q, "k": k, "v": v, "length": length})
    if t == 0:
        raise ValueError("the cache is empty: nothing to attend to")
    sm_scale = 1 / math.sqrt(d) if sm_scale is None else sm_scale
    window = k[:, :, :0]
    key = {"T": next_power_of_2(t), "B": b, "Hq": hq, "Hkv": hkv, "D": d, "bits": 16, "group": d, "keys": "float",
           "dtype": str(q.dtype).removeprefix("torch.")}
    args = (q, PackedKV(k, k, k), PackedKV(v, v, v), window, window, 16, d, sm_scale, None, "float", length)
    config = tune("kv_decode_attention", key, configs(key["T"]), lambda c: launch(c, *args), q.device)
    return launch(config, *args)


def fp8_decode_attention_ref(q, k, v, k_scale, v_scale, res_k, res_v, *, sm_scale: float, start=None,
                             length=None) -> torch.Tensor:
    """fp8_decode_attention in fp32 through tquant.kv.fp8_format's decoder (torch's float8 cast), in q's dtype."""
    keys = torch.cat([dequantize_fp8_kv(k, k_scale), res_k.float()], dim=-2)
    values = torch.cat([dequantize_fp8_kv(v, v_scale), res_v.float()], dim=-2)
    unread = None
    if length is not None:  # stored positions >= length[b]; the window after them is read
        pos = torch.arange(keys.shape[2], device=q.device)[None, :]
        unread = (pos >= length.to(q.device)[:, None]) & (pos < k.shape[2])
    return reference_attention(q, keys, values, sm_scale, start, unread)


def fp8_decode_attention(q, k, v, k_scale, v_scale, res_k, res_v, *, sm_scale: float | None = None, start=None,
                         length=None) -> torch.Tensor:
    """o [B, Hq, D] = softmax(sm_scale q K^T) V over an fp8 store and a full-precision window (module docstring):
    K = [float(k) * k_scale[h] ; res_k], V likewise; k, v float8_e4m3fn [B, Hkv, Tq, D] (a growing store's view is
    read in place), k_scale, v_scale fp32 [Hkv], res_k, res_v [B, Hkv, Tr, D] in q's dtype (Tr >= 0: a decode step's
    own exact token, or none). start int32 [B] or None: tokens before start[b] masked (left padding). length int32 [B]
    or None: stored tokens at or past length[b] are not read (a static store's unfilled rows, or a dynamic store's
    last token that the window holds exact). sm_scale defaults to 1 / sqrt(D)."""
    b, hq, d, hkv, tr = check_heads(q, res_k, "res_k")
    if d & (d - 1) or d < 16:
        raise ValueError(f"head size {d} must be a power of two >= 16")
    if k.dim() != 4:
        raise ValueError(f"k must be float8_e4m3fn [B, Hkv, Tq, D]; got {k.dtype} {tuple(k.shape)}")
    tq, e4m3 = k.shape[2], (torch.float8_e4m3fn,)
    check_tensors({"k": (k, (b, hkv, tq, d), e4m3), "v": (v, (b, hkv, tq, d), e4m3),
                   "k_scale": (k_scale, (hkv,), (torch.float32,)), "v_scale": (v_scale, (hkv,), (torch.float32,)),
                   "res_v": (res_v, (b, hkv, tr, d), (q.dtype,))},
                  f"q {tuple(q.shape)}, an fp8 store of {tq} tokens and {tr} window tokens")
    if res_k.dtype != q.dtype:
        raise ValueError(f"res_k must be in q's dtype {q.dtype}; got {res_k.dtype}")
    for name, t in (("start", start), ("length", length)):
        if t is not None and (t.shape != (b,) or t.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"{name} must be an integer tensor [B={b}]; got {t.dtype} {tuple(t.shape)}")
    check_device({"q": q, "k": k, "v": v, "k_scale": k_scale, "v_scale": v_scale, "res_k": res_k, "start": start,
                  "length": length})
    if tq + tr == 0:
        raise ValueError("the cache is empty: nothing to attend to")
    sm_scale = 1 / math.sqrt(d) if sm_scale is None else sm_scale
    scales = [s.view(1, hkv, 1, 1).expand(b, hkv, 1, 1) for s in (k_scale, v_scale)]
    key = {"T": next_power_of_2(tq), "B": b, "Hq": hq, "Hkv": hkv, "D": d, "bits": 8, "group": d, "keys": "fp8",
           "dtype": str(q.dtype).removeprefix("torch.")}
    args = (q, PackedKV(k, scales[0], scales[0]), PackedKV(v, scales[1], scales[1]), res_k, res_v, 8, d, sm_scale,
            start, "fp8", length)
    config = tune("kv_decode_attention", key, configs(key["T"]), lambda c: launch(c, *args), q.device)
    return launch(config, *args)


__all__ = ["float_decode_attention", "fp8_decode_attention", "fp8_decode_attention_ref", "kivi_decode_attention",
           "kivi_decode_attention_ref", "masked_attention"]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, live: torch.Tensor,
                     sm_scale: float) -> torch.Tensor:
    """The static caches' torch decode step (tquant.kv.static_cache, fp8_static_cache). o [B, Hq, D] = softmax(sm_scale q K^T) V over the positions of k, v [B, Hkv, T, D] where live [B, T]: the
    rep query heads of KV head j (heads j rep ... j rep + rep - 1, as HF's repeat_kv) as rep query rows of one masked
    SDPA (no repeated K / V)."""
    b, hq, d = q.shape
    o = torch.nn.functional.scaled_dot_product_attention(q.view(b, k.shape[1], hq // k.shape[1], d), k.to(q.dtype),
                                                         v.to(q.dtype), attn_mask=live[:, None, None], scale=sm_scale)
    return o.reshape(b, hq, d)

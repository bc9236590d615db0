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
    o        [B, Hq, D] in q's dtype; fp32 decode, rotation, softmax and accumulation
Kernel: grid (B * Hkv, SPLITS + 1), kv_attention's launch pattern. A program takes one KV head and its rep query
heads (padded to REP_PAD rows). Programs 0 ... SPLITS - 1 each take a contiguous share of the T stored tokens,
BLOCK_T at a time, of its first T - R tokens; the last takes the S sink tokens and the R exact ones (kv_attention's
dense_tokens); combine_kernel merges the (max, sum, accumulator) partials. Per store tile:
    codes     the tile's code words [BLOCK_T, N / epw] are loaded contiguously and the codes split out in registers
              (tiling.unpack_words) when a half-vector's N channels fill whole words (2 and 4 bits, N >= epw);
              else (3 bits: 10 codes a word) each channel's word is gathered (an L1 hit for all but the first of
              its channels)
    codebook  centroid = tl.load(codebook + code): a gather from the 2^bits fp32 table (16-64 bytes, L1-resident),
              one load per element. A select chain costs 2^bits compares and selects per element (32 instructions
              at 4 bits), more ALU than a memory-bound decode has to spare; the table load costs one.
    keys      k = key_codebook[code] * key_scale[h, d] + key_offset[h, d], decoded as two halves k1 = channels
              0 ... D/2 - 1 and k2 = D/2 ... D - 1 (key_scale / key_offset halves loaded once per program)
    outliers  each replaces the dense decode at its (token, channel): for j < the tile's largest count (computed
              from the row pointers in the kernel: keys tl.max(row_ptr[r + 1] - row_ptr[r]), values n),
              tile = where(channel == entry j's channel, entry j's value, tile), entry j of a token masked when
              j >= its count. (Adding each key outlier's effect to the scores instead takes one [R, BLOCK_T] pass per j:
              slower, benchmarks/RESULTS.md.)
    RoPE      angle = position * inv_freq [BLOCK_T, D/2] (fp32), cos = cos(angle) * scaling, sin likewise (_cos_sin)
              (fmt.rope_cos_sin); rotate_half pairs channel i with i + D/2, so on the halves
              k_rot1 = k1 cos - k2 sin,  k_rot2 = k2 cos + k1 sin  (no register shuffles)
    scores    s = q1 . k_rot1 + q2 . k_rot2 (q1, q2: q's halves; post-RoPE caches: the same on k1, k2 unrotated)
    values    v = value_codebook[code] * scale[t] + offset[t], outliers written in, then acc += p v
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
from ..kernels.tiling import unpack_words


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
def _codes(codes_ptr, tok, ok, C0: tl.constexpr, N: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr,
           EPW: tl.constexpr):
    """int32 codes [BLOCK_T, N] of channels C0 ... C0 + N - 1 of tokens tok [BLOCK_T] (0 where not ok) from one
    (b, head)'s codes [T, W]."""
    if N % EPW == 0:  # whole words: a contiguous [BLOCK_T, N / EPW] tile
        words = C0 // EPW + tl.arange(0, N // EPW)
        code = unpack_words(tl.load(codes_ptr + tok[:, None] * W + words[None, :], mask=ok[:, None], other=0), BITS)
    else:  # each channel's word gathered
        chan = C0 + tl.arange(0, N)
        w = tl.load(codes_ptr + tok[:, None] * W + (chan // EPW)[None, :], mask=ok[:, None], other=0)
        code = (w >> ((chan % EPW) * BITS)[None, :]) & ((1 << BITS) - 1)
    return code


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
def _write_outliers(x, chan, channel_ptr, value_ptr, lo, n):
    """x [BLOCK_T, N] (channels chan [N]) with each token's n [BLOCK_T] outliers, entries lo ... lo + n - 1 of
    channel_ptr / value_ptr, written in by selects; the loop runs to the tile's largest n."""
    for j in range(0, tl.max(n, axis=0)):
        has = j < n
        c = tl.load(channel_ptr + lo + j, mask=has, other=-1).to(tl.int32)
        e = tl.load(value_ptr + lo + j, mask=has, other=0.0).to(tl.float32)
        x = tl.where(chan[None, :] == c[:, None], e[:, None], x)
    return x


@triton.jit
def _qk(q, k, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """q [R, N] . k [BLOCK_T, N]^T in fp32: tl.dot, or a broadcast sum below tl.dot's K >= 16 (D = 16 heads)."""
    if k.shape[1] >= 16:
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION)
    else:
        s = tl.sum(q.to(tl.float32)[:, None, :] * k[None, :, :], axis=2)
    return s


@triton.jit
def _kvquant_attention_kernel(
    q_ptr, kc_ptr, k_off_ptr, k_scale_ptr, k_cb_ptr, k_rows_ptr, k_chan_ptr, k_val_ptr,
    vc_ptr, v_scale_ptr, v_off_ptr, v_cb_ptr, v_chan_ptr, v_val_ptr,
    pos_ptr, inv_freq_ptr, sk_ptr, sv_ptr, rk_ptr, rv_ptr, start_ptr, m_ptr, l_ptr, acc_ptr,
    HKV, T, TQ, S, TR, tokens_per_split, sm_scale, rope_scaling,
    D: tl.constexpr, REP: tl.constexpr, BITS: tl.constexpr, EPW: tl.constexpr, KEY_OUTLIERS: tl.constexpr,
    N_OUT: tl.constexpr, ROPE: tl.constexpr, BLOCK_T: tl.constexpr, HAS_START: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, R: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // HKV, bh % HKV
    splits = tl.num_programs(1)
    HALF: tl.constexpr = D // 2
    W: tl.constexpr = (D + EPW - 1) // EPW
    rows = tl.arange(0, R)  # the rep query heads, padded to R = REP_PAD rows
    row_ok = rows < REP
    chan = tl.arange(0, D)
    q_row = q_ptr + (bh * REP + rows)[:, None] * D
    first, m, l, acc = initial_state(start_ptr, b, HAS_START, R, D)
    if split < splits - 1:  # a share of the quantized store
        half = tl.arange(0, HALF)
        q1 = (tl.load(q_row + half[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32) * sm_scale).to(DOT_DTYPE)
        q2 = (tl.load(q_row + HALF + half[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
              * sm_scale).to(DOT_DTYPE)
        k_scale1, k_scale2 = tl.load(k_scale_ptr + h * D + half), tl.load(k_scale_ptr + h * D + HALF + half)
        k_off1, k_off2 = tl.load(k_off_ptr + h * D + half), tl.load(k_off_ptr + h * D + HALF + half)
        kc, vc = kc_ptr + bh.to(tl.int64) * T * W, vc_ptr + bh.to(tl.int64) * T * W
        v_scale, v_off = v_scale_ptr + bh.to(tl.int64) * T, v_off_ptr + bh.to(tl.int64) * T
        lo = split * tokens_per_split
        hi = tl.minimum(lo + tokens_per_split, TQ)  # the store's tokens read quantized: 0 ... TQ - 1
        for t0 in range(lo, hi, BLOCK_T):
            tok = t0 + tl.arange(0, BLOCK_T)
            ok = tok < hi
            k1 = tl.load(k_cb_ptr + _codes(kc, tok, ok, 0, HALF, W, BITS, EPW))
            k2 = tl.load(k_cb_ptr + _codes(kc, tok, ok, HALF, HALF, W, BITS, EPW))
            k1, k2 = k1 * k_scale1[None, :] + k_off1[None, :], k2 * k_scale2[None, :] + k_off2[None, :]
            if KEY_OUTLIERS:  # CSR rows r = t * B * Hkv + b * Hkv + h
                r = tok.to(tl.int64) * tl.num_programs(0) + bh
                k_lo = tl.load(k_rows_ptr + r, mask=ok, other=0)
                n = tl.load(k_rows_ptr + r + 1, mask=ok, other=0) - k_lo
                k1 = _write_outliers(k1, half, k_chan_ptr, k_val_ptr, k_lo, n)
                k2 = _write_outliers(k2, HALF + half, k_chan_ptr, k_val_ptr, k_lo, n)
            if ROPE:
                pos = tl.load(pos_ptr + b.to(tl.int64) * T + tok, mask=ok, other=0).to(tl.float32)
                cos, sin = _cos_sin(pos[:, None] * tl.load(inv_freq_ptr + half)[None, :], FAST_TRIG)
                cos, sin = cos * rope_scaling, sin * rope_scaling
                k1, k2 = k1 * cos - k2 * sin, k2 * cos + k1 * sin
            s = _qk(q1, k1, DOT_DTYPE, PRECISION) + _qk(q2, k2, DOT_DTYPE, PRECISION)
            p, m, alpha = softmax_step(s, ok & (S + tok >= first), m)
            v = tl.load(v_cb_ptr + _codes(vc, tok, ok, 0, D, W, BITS, EPW))
            v = v * tl.load(v_scale + tok, mask=ok, other=0.0).to(tl.float32)[:, None] \
                + tl.load(v_off + tok, mask=ok, other=0.0).to(tl.float32)[:, None]
            if N_OUT > 0:
                v = _write_outliers(v, chan, v_chan_ptr, v_val_ptr, (bh.to(tl.int64) * T + tok) * N_OUT,
                                    tl.where(ok, N_OUT, 0))
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
        FAST_TRIG=not interpreter_on(), num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    o = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    combine_kernel[(b * hq,)](m, l, acc, o, SPLITS=splits, SPLITS_PAD=max(2, next_power_of_2(splits)), D=d)
    return o


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
    config = tune("kvquant_decode_attention", key, configs(key["T"]), lambda c: launch(c, *args), q.device)
    return launch(config, *args)


__all__ = ["kvquant_decode_attention", "kvquant_decode_attention_ref"]

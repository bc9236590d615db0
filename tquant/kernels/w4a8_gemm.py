"""W4A8 GEMM (as in QQQ) and W4A4 GEMM: int8 (or packed int4) activations x symmetric int4 weights, int8
tensor-core dots with int32 accumulation and a dequantizing epilogue.

    y[m, n]  = float32(acc[m, n]) * x_scale[m] * w_scale[n] (+ bias[n]),   acc[m, n] = sum_k xq[m, k] * w8[k, n]
    w8[k, n] = (c[k, n] - z[k // group_size, n]) * sg[k // group_size, n]   (per-group; z = 8 without group_zero)
                                                          (c - 8 per-channel: no sg, no z)
    c[k, n]  = (qweight[k // 8, n] >> 4 * (k % 8)) & 15   (tquant/packing.py; q = c - 8 in [-8, 7], zero point 8)
    xq       int8 [M, K]   (per-token codes, e.g. act_quant.quantize_activations(bits=8))     x_scale fp32 [M]
             act_bits=4 (W4A4): int8 [M, ceil(K / 2)] of two nibbles, low = even k (quantize_activations(bits=4));
             K = in_features (default 2 * xq.shape[1])
    qweight  int32 [ceil(K / 8), N]                   w_scale fp32 [N] (per output channel)
    sg       int8 [K // group_size, N] >= 1 (group_scale), group_size dividing K; None: per-channel.
    z        int8 [K // group_size, N] in 0..15 (group_zero, QoQ's progressive grid) or None (z = 8, QQQ's grid).
             The caller guarantees |(c - z) * sg| <= 127 for every weight (QQQ: q in [-8, 7] and sg <= 15;
             QoQ: the protective range; modules.act_quant_linear.int8_gemm_weight checks it), so w8 is an int8 value; the
             kernel does not check it (that would sync the GPU).
    bias     fp16 / bf16 / fp32 [N] or None, added in fp32;    y [M, N] in out_dtype (fp16 / bf16 / fp32)
acc is exact in int32 (|acc| <= 128 * 127 * K); its conversion to fp32 rounds once past 2^24.

`w4a8_matmul`: program (pid, split) owns a [BLOCK_M, BLOCK_N] tile of y (GROUP_M-grouped order) and walks its share
of K in BLOCK_K = 8 * BLOCK_KW steps. Per step: one coalesced load of words as [BLOCK_N, BLOCK_KW]; the codes are
unpacked in registers by int4_codes in integer ops (XOR 0x88888888 once per word, then shift left and
arithmetic shift right per code, q = c - 8; with zeros, 8 - z added, so q + 8 - z = c - z; sg multiplied per word
when group_size % 8 == 0, else per code), converted to
int8 w8^T [BLOCK_N, BLOCK_K]; then one int8 tl.dot(xq tile, w8) into the int32 accumulator (xq is 0 past K,
so padding codes add nothing). Split-K (SPLIT_K > 1, candidates up to M = 64, SPLIT_TILES): grid axis 1 splits
the KW = ceil(K / 8) words into S ranges of P = ceil(ceil(KW / SPLIT_K) / BLOCK_KW) * BLOCK_KW words
(dequant_gemm.split_args), so every split starts on a K step (8 P codes, a multiple of BLOCK_K) and the step's group
lookups (one group a step, a word, or a code) are the unsplit kernel's;
    acc[m, n] = sum_{s = 0}^{S-1} acc_s[m, n]   (int32 partials, dequant_gemm.split_k_sum, one launch)
then the same epilogue once, so y is bit for bit the unsplit kernel's (as w8a8_gemm). From M=256 the tuner may pick "dense" instead: one Triton pass unpacks
w8 = q * sg to int8 [N, K], then w8a8_gemm runs (as the weight-only GEMM's dense path). Packed 4-bit activations (act_bits=4) are unpacked the same way and interleaved
back to k order. When a K step lies in one group, sg is loaded once per column. The launch config is tuned
per GPU and key by autotune_cache; the interpreter runs one fixed small config.
`w4a8_matmul_ref` unpacks w8 in torch and runs w8a8_gemm.w8a8_matmul_ref (integer products summed exactly).
tquant.modules.act_quant_linear.w4a8_quantize_weight makes QQQ-style weights (or QoQ's, zero_point=True) from a float
[N, K] weight (round-to-nearest).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.packing import unpack_codes
from .autotune_cache import tune
from .dequant_gemm import k_range, split_args, split_k_sum
from .runtime import DTYPES, check_device, check_tensors, interpreter_on, next_power_of_2
from .tiling import tile_offsets
from . import w8a8_gemm
from .w8a8_gemm import store_dequantized, w8a8_matmul_ref

EPW = 8  # 4-bit codes per int32 word
ZERO = 8  # implicit zero point: q = c - 8
XOR8 = tl.constexpr(0x88888888 - 2**32)  # as an int32: flips bit 3 of every nibble, c -> q = c - 8 (two's complement)


def width(xq, act_bits, k) -> int:
    """K: xq's width for 8-bit activations; for packed 4-bit ones, k (2 * xq.shape[1] - 1 or 2 * xq.shape[1])."""
    if act_bits not in (4, 8):
        raise ValueError(f"act_bits={act_bits} is not supported; use 8 (W4A8) or 4 (W4A4)")
    if act_bits == 8 or xq.dim() != 2:
        return xq.shape[-1] if k is None else k
    if k is None:
        return 2 * xq.shape[1]
    if -(-k // 2) != xq.shape[1]:
        raise ValueError(f"in_features={k} does not match packed 4-bit xq of width {xq.shape[1]} (ceil(K / 2))")
    return k


def check_inputs(xq, x_scale, qweight, w_scale, group_scale, group_size, bias, out_dtype, act_bits=8, k=None,
                 group_zero=None) -> None:
    """Raise ValueError naming the first argument whose dtype, shape or value is wrong."""
    k = width(xq, act_bits, k)
    if act_bits == 8 and k != xq.shape[-1]:
        raise ValueError(f"in_features={k} does not match 8-bit xq of width {xq.shape[-1]}")
    if out_dtype not in DTYPES:
        raise ValueError(f"out_dtype {out_dtype} is not supported; use one of {DTYPES}")
    for name, t, dtype in (("xq", xq, torch.int8), ("qweight", qweight, torch.int32)):
        if t.dim() != 2 or t.dtype != dtype:
            raise ValueError(f"{name} must be a 2-D {str(dtype).removeprefix('torch.')} tensor; got {t.dtype} "
                             f"of shape {tuple(t.shape)}")
    m, n = xq.shape[0], qweight.shape[1]
    if qweight.shape[0] != -(-k // EPW):
        raise ValueError(f"qweight shape {tuple(qweight.shape)} does not match: expected [ceil(K / 8), N] = "
                         f"[{-(-k // EPW)}, N] for K={k} (xq is {tuple(xq.shape)})")
    if (group_scale is None) != (group_size is None):
        raise ValueError("group_scale and group_size go together: give both (per-group) or neither (per-channel)")
    if group_zero is not None and group_scale is None:
        raise ValueError("group_zero needs group_scale and group_size (zero points are per group)")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1 or k % group_size):
        raise ValueError(f"group_size={group_size} must be a positive integer dividing K={k}")
    expected = {
        "x_scale": (x_scale, (m,), (torch.float32,)),
        "w_scale": (w_scale, (n,), (torch.float32,)),
        "group_scale": (group_scale, (k // (group_size or 1), n), (torch.int8,)),
        "group_zero": (group_zero, (k // (group_size or 1), n), (torch.int8,)),
        "bias": (bias, (n,), DTYPES),
    }
    check_tensors(expected, f"M={m}, N={n}, K={k}" + (f", group_size={group_size}" if group_size else ""))


def unpack_int4_activations(xq: torch.Tensor, k: int) -> torch.Tensor:
    """int8 codes [M, K] from packed 4-bit activations [M, ceil(K / 2)] (sign-extended nibbles, low = even k)."""
    lo, hi = (xq << 4) >> 4, xq >> 4  # int8 arithmetic shifts
    return torch.stack([lo, hi], dim=-1).reshape(xq.shape[0], -1)[:, :k].contiguous()


def w4a8_matmul_ref(xq, x_scale, qweight, w_scale, *, group_scale=None, group_zero=None, group_size=None, bias=None,
                    out_dtype=torch.float16, act_bits=8, in_features=None):
    check_inputs(xq, x_scale, qweight, w_scale, group_scale, group_size, bias, out_dtype, act_bits, in_features,
                 group_zero)
    k = width(xq, act_bits, in_features)
    if act_bits == 4:
        xq = unpack_int4_activations(xq, k)
    zero = ZERO if group_zero is None else group_zero.to(torch.int32).repeat_interleave(group_size, dim=0)
    w8 = unpack_codes(qweight, 4, k) - zero  # [K, N]
    if group_scale is not None:
        w8 = w8 * group_scale.to(torch.int32).repeat_interleave(group_size, dim=0)
    return w8a8_matmul_ref(xq, x_scale, w8.t().to(torch.int8), w_scale, bias=bias, out_dtype=out_dtype)


@triton.jit
def int4_codes(words, J: tl.constexpr, STRIDE: tl.constexpr, COUNT: tl.constexpr):
    """q (int32) for codes J, J + STRIDE, ... (COUNT, a power of two) of every word, where `words` has been
    XOR-ed with 0x88888888 so each nibble holds q = c - 8 in two's complement: q = (w << 28 - 4J) >> 28, two
    integer ops. Stacked on trailing dims of size 2 (tl.join) with the lowest stride last: flattened,
    trailing index i holds code J + STRIDE * i (as dequant_gemm.codes_tree)."""
    if COUNT == 1:
        return (words << (28 - 4 * J)) >> 28
    else:
        return tl.join(int4_codes(words, J, 2 * STRIDE, COUNT // 2), int4_codes(words, J + STRIDE, 2 * STRIDE, COUNT // 2))


@triton.jit
def _w4a8_kernel(x_ptr, xs_ptr, q_ptr, ws_ptr, sg_ptr, sz_ptr, bias_ptr, y_ptr, part_ptr, count_ptr, M, N, K, KW,
                 group_size, stride_xm, stride_qk, stride_sg, stride_ym, kw_per_split, splits, ACT_BITS: tl.constexpr,
                 GROUPED: tl.constexpr, HAS_ZERO: tl.constexpr, WORD_GROUPS: tl.constexpr, STEP_GROUPS: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    BLOCK_KW: tl.constexpr = BLOCK_K // 8
    pid = tl.program_id(0)
    offs_m, offs_n, m_ok, n_ok = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tl.arange(0, BLOCK_KW)
    slot = tl.arange(0, BLOCK_K)  # slot = word * 8 + j holds code j of that word
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    kw_start, kw_end = k_range(KW, kw_per_split, tl.program_id(1), SPLIT)
    for kw0 in range(kw_start, kw_end, BLOCK_KW):
        word_ok = (kw0 + rows) < KW
        words = tl.load(q_ptr + (kw0 + rows)[None, :] * stride_qk + offs_n[:, None],
                        mask=word_ok[None, :] & n_ok[:, None], other=0)  # [BLOCK_N, BLOCK_KW]
        scale = 1
        shift = 0  # 8 - z: q = c - 8 becomes c - z
        if GROUPED and STEP_GROUPS:  # the whole K step lies in one group: one sg (and z) per column
            at = (kw0 * 8 // group_size) * stride_sg + offs_n
            scale = tl.load(sg_ptr + at, mask=n_ok, other=0).to(tl.int32)[:, None, None, None, None]
            if HAS_ZERO:
                shift = 8 - tl.load(sz_ptr + at, mask=n_ok, other=8).to(tl.int32)[:, None, None, None, None]
        elif GROUPED and WORD_GROUPS:  # each word lies in one group: sg (and z) per word
            g = ((kw0 + rows) * 8 // group_size)[None, :]
            at = g * stride_sg + offs_n[:, None]
            ok = word_ok[None, :] & n_ok[:, None]
            scale = tl.load(sg_ptr + at, mask=ok, other=0).to(tl.int32)[:, :, None, None, None]
            if HAS_ZERO:
                shift = 8 - tl.load(sz_ptr + at, mask=ok, other=8).to(tl.int32)[:, :, None, None, None]
        k = kw0 * 8 + slot
        w = tl.reshape((int4_codes(words ^ XOR8, 0, 1, 8) + shift) * scale, (BLOCK_N, BLOCK_K))
        if GROUPED and not WORD_GROUPS:  # groups split words: sg (and z) per code
            at = (tl.minimum(k, K - 1) // group_size)[None, :] * stride_sg + offs_n[:, None]
            if HAS_ZERO:
                w += 8 - tl.load(sz_ptr + at, mask=n_ok[:, None], other=8).to(tl.int32)
            w *= tl.load(sg_ptr + at, mask=n_ok[:, None], other=0).to(tl.int32)
        if ACT_BITS == 8:
            xa = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0)
        else:  # bytes [BLOCK_M, BLOCK_K / 2] -> sign-extended nibbles (low = even k), interleaved back to k order
            byte = kw0 * 4 + tl.arange(0, BLOCK_K // 2)
            b = tl.load(x_rows + byte[None, :], mask=m_ok[:, None] & (byte < (K + 1) // 2)[None, :], other=0)
            b = b.to(tl.int32)
            xa = tl.reshape(tl.join((b << 28) >> 28, b >> 4), (BLOCK_M, BLOCK_K)).to(tl.int8)
        acc = tl.dot(xa, tl.trans(w.to(tl.int8)), acc, out_dtype=tl.int32)
    last = True
    if SPLIT:  # int32 partials summed exactly, then one epilogue
        acc, last = split_k_sum(acc, offs_m, offs_n, M, N, part_ptr, count_ptr, pid, tl.program_id(1), splits)
    if last:
        store_dequantized(acc, xs_ptr, ws_ptr, bias_ptr, y_ptr, offs_m, offs_n, m_ok, n_ok, stride_ym, HAS_BIAS)


# as W8A8's, but the 128 x 256 tile takes BLOCK_K 64: the int4 unpack needs the registers
LARGE_M_TILES = [(128, 128, 64, 8), (64, 128, 128, 4), (128, 256, 64, 8), (128, 64, 128, 4), (256, 128, 64, 8)]
# split-K tiles (w8a8_gemm.split_configs' (BLOCK_N, BLOCK_K, SPLIT_K, num_stages, num_warps)), BLOCK_N * BLOCK_K at most
# 16K codes as the small-M tiles (the unpack's registers); W4A8 is ALU-bound on the unpack at small M, so the programs
# (N 4096: 64-512, N 14336: 224-448 after pruning) put more SMs to it
SPLIT_TILES = [(64, 128, 2, 3, 4), (64, 128, 4, 3, 4), (64, 128, 8, 3, 4), (128, 128, 2, 3, 4), (128, 128, 4, 3, 4),
               (128, 128, 8, 3, 4), (64, 256, 4, 3, 4), (256, 64, 4, 3, 8)]


DENSE = dict(path="dense")
DENSE_FROM_M = 256


def configs(m: int, act_bits: int = 8, n: int | None = None, k: int | None = None) -> list[dict]:
    """Candidates for batch m (rounded up to a power of two); the first is the untuned default. Up to M = 64 also
    split-K (SPLIT_TILES, pruned for N = n, K = k where given). From M=256 on (8-bit activations), also "dense":
    unpack w8 = q * sg to an int8 [N, K] buffer (one Triton pass), then the W8A8 GEMM (per-group costs the same as
    per-channel there)."""
    tiles = w8a8_gemm.configs(m, LARGE_M_TILES, n, k, SPLIT_TILES)
    return tiles + ([DENSE] if m >= DENSE_FROM_M and act_bits == 8 and not interpreter_on() else [])


@triton.jit
def _unpack_kernel(q_ptr, sg_ptr, sz_ptr, out_ptr, N, K, KW, group_size, stride_qk, stride_sg, stride_on,
                   GROUPED: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """out[n, k] = (c[k, n] - z) * sg[k // group_size, n] as int8 (z = 8, or z[k // group_size, n] with zeros), one
    [BLOCK_N, 8 * BLOCK_KW] tile."""
    BLOCK_K: tl.constexpr = BLOCK_KW * 8
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    n_ok = offs_n < N
    words = tl.load(q_ptr + rows[None, :] * stride_qk + offs_n[:, None], mask=(rows < KW)[None, :] & n_ok[:, None],
                    other=0)
    w = tl.reshape(int4_codes(words ^ XOR8, 0, 1, 8), (BLOCK_N, BLOCK_K))
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if GROUPED:
        at = (tl.minimum(k, K - 1) // group_size)[None, :] * stride_sg + offs_n[:, None]
        if HAS_ZERO:
            w += 8 - tl.load(sz_ptr + at, mask=n_ok[:, None], other=8).to(tl.int32)
        w *= tl.load(sg_ptr + at, mask=n_ok[:, None], other=0).to(tl.int32)
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + k[None, :], w.to(tl.int8),
             mask=n_ok[:, None] & (k < K)[None, :])


def unpack_int8(qweight, group_scale, group_size, k, group_zero=None) -> torch.Tensor:
    """w8 int8 [N, K] = (c - z) * sg (z = 8 without zeros, sg = 1 per-channel): the W8A8 GEMM's weight layout."""
    kw, n = qweight.shape
    out = torch.empty(n, k, dtype=torch.int8, device=qweight.device)
    grouped = group_scale is not None
    grid = (triton.cdiv(n, 64), triton.cdiv(kw, 16))
    _unpack_kernel[grid](qweight, group_scale if grouped else qweight,
                         group_zero if group_zero is not None else qweight, out, n, k, kw, group_size or k,
                         qweight.stride(0), group_scale.stride(0) if grouped else 0, out.stride(0), GROUPED=grouped,
                         HAS_ZERO=group_zero is not None, BLOCK_N=64, BLOCK_KW=16, num_warps=4)
    return out


def launch(config, xq, x_scale, qweight, w_scale, group_scale, group_size, bias, out_dtype, act_bits=8,
           k=None, group_zero=None) -> torch.Tensor:
    """One launch with config (inputs checked and contiguous; k: in_features, needed for act_bits=4)."""
    m, n = xq.shape[0], qweight.shape[1]
    k = k or xq.shape[1]
    if config.get("path") == "dense":
        w8 = unpack_int8(qweight, group_scale, group_size, k, group_zero)
        return w8a8_gemm.w8a8_matmul(xq, x_scale, w8, w_scale, bias=bias, out_dtype=out_dtype)
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    tiles = triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"])
    kw = qweight.shape[0]
    per_split, splits, part, counters = split_args(config, kw, config["BLOCK_K"] // EPW, m, n, tiles, y, torch.int32)
    grouped = group_scale is not None
    _w4a8_kernel[(tiles, splits)](
        xq, x_scale, qweight, w_scale, group_scale if grouped else qweight,
        group_zero if group_zero is not None else qweight, bias if bias is not None else y, y, part, counters,
        m, n, k, kw, group_size or k, xq.stride(0), qweight.stride(0),
        group_scale.stride(0) if grouped else 0, y.stride(0), per_split, splits, ACT_BITS=act_bits, GROUPED=grouped,
        HAS_ZERO=group_zero is not None,
        WORD_GROUPS=grouped and group_size % EPW == 0, STEP_GROUPS=grouped and group_size % config["BLOCK_K"] == 0,
        HAS_BIAS=bias is not None, SPLIT=splits > 1, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
        BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"], num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return y


def w4a8_matmul(xq, x_scale, qweight, w_scale, *, group_scale=None, group_zero=None, group_size=None, bias=None,
                out_dtype=torch.float16, act_bits=8, in_features=None):
    """act_bits=4 runs W4A4 (xq packed 4-bit; in_features gives an odd K); group_zero: QoQ's zero points."""
    check_inputs(xq, x_scale, qweight, w_scale, group_scale, group_size, bias, out_dtype, act_bits, in_features,
                 group_zero)
    k = width(xq, act_bits, in_features)
    check_device(dict(xq=xq, x_scale=x_scale, qweight=qweight, w_scale=w_scale, group_scale=group_scale,
                      group_zero=group_zero, bias=bias))
    m, n = xq.shape[0], qweight.shape[1]
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=out_dtype, device=xq.device)
    xq, x_scale, qweight, w_scale, group_scale, group_zero, bias = [
        t.contiguous() if t is not None else None
        for t in (xq, x_scale, qweight, w_scale, group_scale, group_zero, bias)]
    args = (xq, x_scale, qweight, w_scale, group_scale, group_size, bias, out_dtype, act_bits, k, group_zero)
    key = dict(M=next_power_of_2(m), N=n, K=k, g=group_size or 0, out=str(out_dtype).removeprefix("torch."),
               bias=int(bias is not None)) | ({"zero": 1} if group_zero is not None else {})
    name = "w4a8_matmul" if act_bits == 8 else "w4a4_matmul"
    config = tune(name, key, configs(key["M"], act_bits, n, k), lambda c: launch(c, *args), xq.device)
    return launch(config, *args)

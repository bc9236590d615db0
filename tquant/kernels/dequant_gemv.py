"""Dequantizing GEMV for batch 1: memory bound, so each weight word is loaded once and no tl.dot is used.

    y[1, N] = x[:, perm] @ w (+ bias),   w[k, n] = (code(k, n) - zeros[k // group_size, n]) * scales[k // group_size, n]

Grid (N / BLOCK_N, SPLIT_K). A program streams [BLOCK_KW, BLOCK_N] tiles of words (coalesced along N)
over its share of K (tl.range with num_stages copies tiles ahead through shared memory). With each tile
it loads the x values of its words as [BLOCK_KW, EPW_P2] (one vector a word; perm gathered here), splits
them into columns (accumulate_codes) and multiply-adds x_j * (code_j - zero) for every code j, dequantized
in registers (code_minus_zero: one LOP3 and one FADD a code), into a [BLOCK_KW, BLOCK_N] fp32
accumulator that is reduced over rows once at the end. Unless a word spans groups (3-bit only), scale
is applied once a tile: sum_k x_k (c_k - z) s = s * sum_k x_k (c_k - z). A word spanning two groups runs that
twice, with x zeroed outside the group (GROUPS 2, bilevel stats), else code by code (GROUPS 3).
Range: sum_k x_k (c_k - z) can overflow fp32 where the products x w do not (bf16 x of 3e38, s < 1), so a tile whose
max |x| is 2^65 or more runs on x * 2^-e (max |x 2^-e| in [2^64, 2^65)) with its scale times 2^e (shrink_factor;
bf16 / fp32 x only: fp16 x cannot reach it).
3-bit words take 16 slots, 6 of them with x = 0. SPLIT_K > 1: the last split of each N tile sums the fp32 partials (store_output).
The packed half2 dequantization of the GEMM (dequant_pair_asm) is not used here: products with x and their
sums would have to be half2 as well to save instructions, which loses precision and can overflow fp16.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

from . import dequant_gemm
from .dequant_gemm import (MAGIC_BITS, code_minus_zero, code_scale, group_mode, k_range, load_group_params,
                           split_args, store_output)


@triton.jit
def accumulate_codes(tile, words, xw, zero, scale, magic, J: tl.constexpr, STRIDE: tl.constexpr, COUNT: tl.constexpr,
                     BITS: tl.constexpr, EPW: tl.constexpr):
    """tile + sum_i xw[:, i] * (code_{J + STRIDE i} - zero) * scale over the COUNT (a power of two) codes
    whose x values xw [BLOCK_KW, COUNT] holds; xw is split in halves (even, odd i) down to single columns.
    Slots J >= EPW (3-bit words' 6 empty ones) are skipped."""
    if COUNT == 1:
        if J < EPW:
            tile += (xw / code_scale(J, BITS)) * code_minus_zero(words, J, zero, magic, BITS) * scale
        return tile
    else:
        even, odd = tl.split(tl.reshape(xw, (xw.shape[0], COUNT // 2, 2)))
        tile = accumulate_codes(tile, words, even, zero, scale, magic, J, 2 * STRIDE, COUNT // 2, BITS, EPW)
        return accumulate_codes(tile, words, odd, zero, scale, magic, J + STRIDE, 2 * STRIDE, COUNT // 2, BITS, EPW)


@triton.jit
def shrink_factor(xw, XEXP: tl.constexpr):
    """(f, 1/f): powers of two with f = 1 unless max |xw| >= 2^(XEXP + 1), else max |xw * f| in [2^XEXP, 2^(XEXP+1))."""
    amax = tl.max(tl.max(tl.abs(xw), axis=1), axis=0)
    eb = tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, XEXP + 127)  # biased exponent of max |x|, clamped
    return ((254 + XEXP - eb) << 23).to(tl.float32, bitcast=True), ((eb - XEXP) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _dequant_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr,
    N, K, KW, group_size, stride_qk, stride_sg, kw_per_split, splits, magic,
    BITS: tl.constexpr, EPW: tl.constexpr, EPW_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    GROUPS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    NUM_STAGES: tl.constexpr, SCALE_BITS: tl.constexpr, STAT_GROUP: tl.constexpr,
):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = tl.arange(0, BLOCK_KW)
    j = tl.arange(0, EPW_P2)
    kw_start, kw_end = k_range(KW, kw_per_split, pid_k, SPLIT)
    acc = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)
    for kw0 in tl.range(kw_start, kw_end, BLOCK_KW, num_stages=NUM_STAGES):
        words = tl.load(q_ptr + (kw0 + rows)[:, None] * stride_qk + offs_n[None, :],
                        mask=((kw0 + rows) < KW)[:, None] & n_ok[None, :], other=0)
        k = (kw0 + rows)[:, None] * EPW + j[None, :]  # [BLOCK_KW, EPW_P2]
        k_ok = (j < EPW)[None, :] & (k < K)
        col = k
        if HAS_PERM:
            col = tl.load(perm_ptr + k, mask=k_ok, other=0)
        xw = tl.load(x_ptr + col, mask=k_ok, other=0.0).to(tl.float32)
        # sum x (code - zero) is taken before the scale, so a tile of |x| near fp32's max (bf16 3e38) would overflow
        # where x w does not: such a tile runs on x * 2^-e, and its scale times 2^e (f = 1 for |x| < 2^65). fp16 x
        # (|x| <= 65504) cannot overflow these sums: its kernels skip the tile's max-reduction
        if x_ptr.dtype.element_ty == tl.float16:
            inv = 1.0
        else:
            f, inv = shrink_factor(xw, 64)
            xw = xw * f
        if GROUPS < 2:
            s, z = load_group_params(s_ptr, z_ptr, kw0, rows, offs_n, n_ok, N, K, EPW, group_size, stride_sg, GROUPS, 0,
                                     SCALE_BITS, STAT_GROUP)
            acc += accumulate_codes(tl.zeros_like(acc), words, xw, z, 1.0, magic, 0, 1, EPW_P2, BITS, EPW) * (s * inv)
        elif GROUPS == 2:  # a word spans two groups (3-bit): the codes of each, with that group's zero and scale
            s0, z0 = load_group_params(s_ptr, z_ptr, kw0, rows, offs_n, n_ok, N, K, EPW, group_size, stride_sg, 2, 0,
                                       SCALE_BITS, STAT_GROUP)
            s1, z1 = load_group_params(s_ptr, z_ptr, kw0, rows, offs_n, n_ok, N, K, EPW, group_size, stride_sg, 2,
                                       EPW - 1, SCALE_BITS, STAT_GROUP)
            first = (k // group_size) == ((kw0 + rows) * EPW // group_size)[:, None]
            x0 = tl.where(first, xw, 0.0)
            acc += accumulate_codes(tl.zeros_like(acc), words, x0, z0, 1.0, magic, 0, 1, EPW_P2, BITS, EPW) * (s0 * inv)
            acc += accumulate_codes(tl.zeros_like(acc), words, xw - x0, z1, 1.0, magic, 0, 1, EPW_P2, BITS,
                                    EPW) * (s1 * inv)
        else:  # groups smaller than a word: codes one by one, each with its own zero and scale
            for jj in tl.static_range(EPW):
                s, z = load_group_params(s_ptr, z_ptr, kw0, rows, offs_n, n_ok, N, K, EPW, group_size, stride_sg, 2, jj,
                                         SCALE_BITS, STAT_GROUP)
                xj = tl.sum(tl.where(j[None, :] == jj, xw, 0.0), axis=1)[:, None]
                acc = accumulate_codes(acc, words, xj, z, s * inv, magic, jj, 1, 1, BITS, EPW)
    out = tl.sum(acc, axis=0)[None, :]
    store_output(y_ptr, out, tl.arange(0, 1), offs_n, 1, N, 0, bias_ptr, ws_ptr, count_ptr, pid_n, pid_k, splits,
                 HAS_BIAS, SPLIT)


def gemv(x, qweight, scales, zeros, perm, bias, *, bits: int, group_size: int, config: dict,
         bilevel: tuple[int, int] | None = None):
    """y = x[:, perm] @ dequant(qweight) (+ bias) for x [1, K] with x.stride(1) == 1 (bilevel: stat_args)."""
    k = x.shape[1]
    n = qweight.shape[1]
    epw = 32 // bits
    y = dequant_gemm.output_buffer(1, n, x.dtype, x.device)
    tiles = triton.cdiv(n, config["BLOCK_N"])
    per_split, splits, ws, counters = split_args(config, qweight.shape[0], config["BLOCK_KW"], 1, n, tiles, y)
    _dequant_gemv_kernel[(tiles, splits)](
        x, qweight, scales, zeros, perm if perm is not None else qweight, bias if bias is not None else y, y, ws,
        counters, n, k, qweight.shape[0], group_size, qweight.stride(0), scales.stride(0), per_split, splits,
        MAGIC_BITS, BITS=bits, EPW=epw, EPW_P2=triton.next_power_of_2(epw), BLOCK_N=config["BLOCK_N"],
        BLOCK_KW=config["BLOCK_KW"], GROUPS=group_mode(config["BLOCK_KW"], epw, group_size, k, bilevel is not None),
        HAS_PERM=perm is not None, HAS_BIAS=bias is not None, SPLIT=splits > 1, NUM_STAGES=config["num_stages"],
        **dequant_gemm.stat_args(bilevel), num_warps=config["num_warps"],
    )
    return y


INTERPRETER_CONFIG = dict(path="gemv", BLOCK_N=32, BLOCK_KW=4, SPLIT_K=2, num_warps=4, num_stages=1)


def split_k_candidates(path: str, tiles, n: int, kw: int, programs: int, n_splits: int, stages) -> list[dict]:
    """GEMV launch configs of `path` for N = n and kw words along K: each tile (num_warps, BLOCK_N, BLOCK_KW) with
    the n_splits split-K counts whose grid lies nearest `programs` programs (an octave measure), each with every
    pipeline depth in stages; sorted by that distance, so the first is the default."""
    out = []
    for warps, block_n, bkw in tiles:
        def off_target(sk):  # distance from `programs` programs, in octaves
            return abs(math.log2(-(-n // block_n) * sk / programs))

        splits = sorted((sk for sk in (1, 2, 4, 8, 16, 32, 64) if sk == 1 or kw >= 2 * sk * bkw), key=off_target)
        out += [(off_target(sk), dict(path=path, BLOCK_N=block_n, BLOCK_KW=bkw, SPLIT_K=sk, num_warps=warps,
                                      num_stages=st)) for sk in splits[:n_splits] for st in stages]
    out.sort(key=lambda c: c[0])
    return [c for _, c in out]


def configs(n: int, kw: int) -> list[dict]:
    """Candidates for N = n, kw words along K, the default first: the tiles a first tuning kept, each with the four
    split-K counts nearest 3 programs per SM (400), 1 and 4 pipeline stages."""
    return split_k_candidates("gemv", ((4, 512, 2), (4, 512, 4), (4, 1024, 2), (8, 1024, 2), (8, 1024, 4),
                                       (8, 512, 8)), n, kw, 400, 4, (1, 4))

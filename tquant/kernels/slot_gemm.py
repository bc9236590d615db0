"""Weight-only GEMM as one tl.dot per code slot of a word: the dequantized weights never change layout.

    y[M, N] = x[:, perm] @ w (+ bias),   w[k, n] = (code(k, n) - zeros[g, n]) * scales[g, n],  g = k // group_size
    x       [M, K] fp16 / bf16 / fp32        qweight int32 [K / epw, N] (tquant/packing.py: code j of word r of a
                                              column is k = r * epw + j at bits j * bits), bits 2, 4 or 8 (epw 16, 8, 4)
    scales, zeros [K // group_size, N] in x's dtype, zeros integer valued; group_size a multiple of epw (or K)
    perm    [K] or None (gathered by the caller)          y [M, N] in x's dtype, accumulated in fp32

Why: dequant_gemm's BLOCK_M <= 16 path (y^T = w^T x^T, the dequantized tile as the wgmma operand from registers)
unpacks each word's codes next to each other along K (tl.join, then a reshape to [BLOCK_N, BLOCK_K]); the MMA's
register operand wants another distribution of K over the threads, so Triton converts the dequantized fp16 tile
through shared memory every K step (a convert_layout of BLOCK_N x BLOCK_K in its TTGIR: STS, then LDSM). Its larger
tiles (x @ w^T) take the dequantized tile as wgmma's B operand, which must be stored to shared memory. Here y^T =
w^T x^T at every BLOCK_M (16, 32 or 64: wgmma's N side), so the weights are always the operand from registers.

Here the K order of the dot is chosen so that no reshape exists. A K step is a [BLOCK_N, BLOCK_KW] tile of words
(words r = kw0 .. kw0 + BLOCK_KW - 1 of columns n); for each code slot j of a word (j = 0 .. epw - 1),
    w_j[n, r] = (code j of word (r, n) - zero) * scale        elementwise on the word tile: [BLOCK_N, BLOCK_KW]
    x_j[m, r] = x[m, r * epw + j]                            the x columns those codes multiply (strided), or
                                                             with SLOT_MAJOR_X x re-laid once per call as
                                                             xs[m, j * KW + r] = x[m, r * epw + j]: contiguous
    acc[n, m] += sum_r w_j[n, r] x_j[m, r]                   tl.dot(w_j, x_j^T): K = BLOCK_KW of the MMA
so acc sums every k = r * epw + j once. Every w_j has the word tile's own layout, so Triton loads the words
straight in the MMA operand's register layout and dequantizes in place; only the small x_j tiles ([16, BLOCK_KW])
pass through shared memory, as the MMA's B operand must. Groups: a word lies in one group (group_size a multiple of
epw); WHOLE: every K step in one group (group_size a multiple of BLOCK_KW * epw, or per-channel), one [BLOCK_N] load
of scale and zero a step, else one per word column.
Dequantization: shift, mask, int -> fp32, (c - z) * s (exact but for the one rounding of the product), then the dot
dtype. Not dequant_gemm.code_minus_zero's float bit trick: Triton (3.6-3.9) does not carry the operand layout back
through its bitcasts, and the tile would go through shared memory again.
Grid (N / BLOCK_N, SPLIT_K, M / BLOCK_M); SPLIT_K > 1: the last split of each output tile sums the fp32 partials
(dequant_gemm.store_output).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant_gemm import output_buffer, split_k_buffers, split_k_grid, store_output
from .runtime import dot_args, interpreter_on

BITS = (2, 4, 8)  # codes a word: a power of two, so a word's codes are whole slots of one K step


@triton.jit
def _slot_gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, KW, group_size,
                      stride_xm, stride_qk, stride_sg, stride_ym, kw_per_split, splits,
                      BITS: tl.constexpr, EPW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_KW: tl.constexpr, WHOLE: tl.constexpr, SLOT_MAJOR_X: tl.constexpr,
                      HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_KW)
    n_ok = offs_n < N
    m_ok = offs_m < M
    kw_start = pid_k * kw_per_split
    kw_end = tl.minimum(kw_start + kw_per_split, KW)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for kw0 in tl.range(kw_start, kw_end, BLOCK_KW, num_stages=NUM_STAGES):
        r = kw0 + cols
        r_ok = r < kw_end
        words = tl.load(q_ptr + r[None, :].to(tl.int64) * stride_qk + offs_n[:, None],
                        mask=n_ok[:, None] & r_ok[None, :], other=0)  # [BLOCK_N, BLOCK_KW]
        if WHOLE:
            at = (kw0 * EPW // group_size) * stride_sg + offs_n
            s = tl.load(s_ptr + at, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            z = tl.load(z_ptr + at, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        else:
            g = tl.minimum(r * EPW, K - 1) // group_size
            at = g[None, :] * stride_sg + offs_n[:, None]
            s = tl.load(s_ptr + at, mask=n_ok[:, None], other=0.0).to(tl.float32)
            z = tl.load(z_ptr + at, mask=n_ok[:, None], other=0.0).to(tl.float32)
        for j in tl.static_range(EPW):
            w = (((words >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.float32) - z) * s
            xk = j * KW + r if SLOT_MAJOR_X else r * EPW + j
            xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + xk[None, :],
                         mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_KW]
            acc = tl.dot(w.to(DOT_DTYPE), tl.trans(xj.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    store_output(y_ptr, tl.trans(acc), offs_m, offs_n, M, N, stride_ym, bias_ptr, ws_ptr, count_ptr,
                 pid_m * tl.num_programs(0) + pid_n, pid_k, splits, HAS_BIAS, SPLIT)


def supports(x: torch.Tensor, bits: int, group_size: int, k: int, bilevel=None) -> bool:
    """Whether slot_gemm takes these inputs: 2 / 4 / 8-bit codes filling whole words of K, plain scales and zeros,
    groups of whole words (or per-channel)."""
    epw = 32 // bits if bits in BITS else 0
    return (epw > 0 and k % epw == 0 and bilevel is None
            and (group_size == k or group_size % epw == 0))


def whole_steps(block_kw: int, epw: int, group_size: int, k: int) -> bool:
    """Every K step of block_kw words lies in one group."""
    return group_size == k or group_size % (block_kw * epw) == 0


def gemm(x, qweight, scales, zeros, bias, *, bits: int, group_size: int, config: dict) -> torch.Tensor:
    """y = x @ dequant(qweight) (+ bias) for x [M, K] with x.stride(1) == 1 (module docstring); x already gathered by
    perm. config["x"] == "slot-major": x re-laid once (one copy) so every x_j tile is contiguous."""
    m, k = x.shape
    if not supports(x, bits, group_size, k):
        raise ValueError(f"slot_gemm takes bits {BITS}, K a multiple of 32 / bits and groups of whole words; got "
                         f"bits={bits}, K={k}, group_size={group_size}")
    n, kw, epw = qweight.shape[1], qweight.shape[0], 32 // bits
    slot_major = config.get("x") == "slot-major"
    if slot_major:
        x = x.view(m, kw, epw).transpose(1, 2).reshape(m, k)
    block_kw = config["BLOCK_KW"]
    per_split, splits = split_k_grid(kw, block_kw, config["SPLIT_K"])
    y = output_buffer(m, n, x.dtype, x.device)
    grid = (triton.cdiv(n, config["BLOCK_N"]), splits, triton.cdiv(m, config["BLOCK_M"]))
    ws, counters = split_k_buffers(splits, m, n, grid[0] * grid[2], x.device) if splits > 1 else (y, y)
    _slot_gemm_kernel[grid](
        x, qweight, scales, zeros, bias if bias is not None else y, y, ws, counters, m, n, k, kw, group_size,
        x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0), per_split, splits,
        BITS=bits, EPW=epw, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_KW=block_kw,
        WHOLE=whole_steps(block_kw, epw, group_size, k), SLOT_MAJOR_X=slot_major, HAS_BIAS=bias is not None,
        SPLIT=splits > 1,
        NUM_STAGES=config["num_stages"], **dot_args(x.dtype), num_warps=config["num_warps"],
    )
    return y


INTERPRETER_CONFIG = dict(path="slots", BLOCK_M=16, BLOCK_N=32, BLOCK_KW=16, SPLIT_K=2, num_warps=4, num_stages=1,
                          x="strided")


def configs(m: int, n: int, kw: int) -> list[dict]:
    """GPU candidates for batch m (a power of two; the first is the untuned default). BLOCK_M (wgmma's N side) = m
    from 16 to 64, 128 beyond; BLOCK_N the MMA's M side (64 or 128); BLOCK_KW 16 or 32 words (the MMA's K); split-K
    counts that leave each split at least two steps and at most 4 waves of programs (M <= 64 only). x: strided
    gathers for M <= 16 (x is a few KB), both forms up to 64, slot-major beyond."""
    if interpreter_on():
        return [INTERPRETER_CONFIG]
    bm = 16 if m <= 16 else min(m, 128)
    layouts = ("strided",) if m <= 16 else ("strided", "slot-major") if m <= 64 else ("slot-major",)
    out = []
    for bn, bkw, warps in ((64, 16, 4), (128, 16, 4), (64, 32, 4), (128, 32, 8)):
        for sk in (1, 2, 4, 8, 16) if m <= 64 else (1,):
            if sk > 1 and (kw < 2 * sk * bkw or -(-n // bn) * sk > 4 * 132):
                continue
            out += [dict(path="slots", BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bkw, SPLIT_K=sk, num_warps=warps,
                         num_stages=st, x=x) for st in (2, 3) for x in layouts]
    return out


__all__ = ["gemm", "supports", "configs"]

"""W4A16 GEMV for batch 1 in packed half2 arithmetic: about 2 instructions a 4-bit code instead of 3.

    y[1, N] = x[:, perm] @ w (+ bias),   w[k, n] = (code(k, n) - zeros[g, n]) * scales[g, n],  g = k // group_size
    x       [1, K] fp16 / bf16           qweight int32 [ceil(K / 8), N] (tquant/packing.py, 4-bit, K-packed)
    scales, zeros [K // group_size, N] in x's dtype, zeros integer valued; group_size a multiple of 8 (or K)
    y       [1, N] in x's dtype

Grid (N / BLOCK_N, SPLIT_K), as dequant_gemv: a program streams [BLOCK_KW, BLOCK_N] tiles of words (coalesced along
N, tl.range pipelining) over its share of K. What differs is the arithmetic of a word's 8 codes c_0..c_7 (code j at
bits 4j): one asm block (word_dot_asm) computes p = sum_j xs_j (c_j - z) in half2 lanes:
    t_j   = (word >> s) & mask | 0x6400 in each 16-bit lane     LOP3 (+ one SHF for j = 2, 3)
          -> lanes (1024 + c_j, 1024 + c_{j+4}) for j = 0, 2 and (1024 + 16 c_j, 1024 + 16 c_{j+4}) for j = 1, 3
    d_j   = t_j - (1024 + z)   or   t_j / 16 - (64 + z)            HADD2 / HFMA2, exact: c - z is a small integer
    acc2  = sum_j X_j * d_j,  X_j = (xs_j, xs_{j+4}) as half2        HMUL2 + HFMA2s, fp16 products and sums
    p     = float(acc2.lo) + float(acc2.hi)                         2 conversions and 1 FADD, then fp32 onwards
PAIR (tiles inside one group): two words of one column (rows 2r and 2r + 1) share one half2 accumulator, so the
conversions are paid once per 16 codes. fp32 accumulates p over the program's words; scale is applied in fp32,
then 2^-e ((p s) 2^-e: p times s 2^-e would overflow for x near fp32's max and a scale above 512).
Range: xs = x * 2^e per tile, e chosen from the tile's max |x| so that max |xs| lies in [2^XEXP, 2^(XEXP+1))
(XEXP 8, PAIR 7): a lane sums at most 4 (PAIR 8) products |xs (c - z)| <= 2^(XEXP+1) * 15, below fp16's 65504 for
any x, and small x keep fp16's full relative precision (the 2^-e goes back into the fp32 scale factor).
bf16 x is taken through the same fp16 arithmetic (after the 2^e scaling its 8-bit mantissa fits fp16's 11 exactly).
Without CUDA (the interpreter) ASM=False computes the same sums in fp32 (code_minus_zero), same indexing and scaling.
SPLIT_K > 1: the last split of each N tile sums the fp32 partials (dequant_gemm.store_output).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dequant_gemm
from .dequant_gemv import split_k_candidates
from .dequant_gemm import MAGIC_BITS, code_minus_zero, code_scale, split_k_grid, store_output
from .runtime import interpreter_on

SIXTEENTH = 0x2C002C00  # fp16 1/16 in both halves


@triton.jit
def pack_half2(lo, hi):
    """int32 holding (fp16(lo) in bits 0..15, fp16(hi) in 16..31), lo and hi fp32, rounded to nearest."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.int32,
                                     is_pure=True, pack=1)


def _word_ptx(word: str, xs: tuple[str, ...], first: bool) -> str:
    """PTX of one word's 8 codes multiplied into the half2 accumulator `a` (module docstring): the codes of `word`
    (an operand such as "$1") dequantized two at a time with the 0x6400 magic number, made exact c - z with the
    placeholders $ZA, $ZB, $C16 (za, zb, 1/16), then multiplied by the half2 x pairs xs; first: `a` starts at the
    first product."""
    return (f"lop3.b32 t0, {word}, 0x000f000f, 0x64006400, 0xea;"
            f"lop3.b32 t1, {word}, 0x00f000f0, 0x64006400, 0xea;"
            f"shr.u32 w2, {word}, 8;"
            "lop3.b32 t2, w2, 0x000f000f, 0x64006400, 0xea;"
            "lop3.b32 t3, w2, 0x00f000f0, 0x64006400, 0xea;"
            "add.rn.f16x2 t0, t0, $ZA;"
            "fma.rn.f16x2 t1, t1, $C16, $ZB;"
            "add.rn.f16x2 t2, t2, $ZA;"
            "fma.rn.f16x2 t3, t3, $C16, $ZB;"
            + (f"mul.rn.f16x2 a, t0, {xs[0]};" if first else f"fma.rn.f16x2 a, t0, {xs[0]}, a;")
            + "".join(f"fma.rn.f16x2 a, t{j}, {xs[j]}, a;" for j in (1, 2, 3)))


def _words_ptx(words: int) -> str:
    """The asm block for `words` words (operands $1 ..), then their x pairs (4 a word), then za, zb, c16: their
    products summed in one half2 accumulator, returned as fp32 ($0)."""
    xs = [tuple(f"${words + 1 + 4 * i + j}" for j in range(4)) for i in range(words)]
    za, zb, c16 = (f"${5 * words + 1 + i}" for i in range(3))
    body = "".join(_word_ptx(f"${i + 1}", xs[i], i == 0) for i in range(words))
    return ("{ .reg .b32 t0, t1, t2, t3, w2, a; .reg .b16 l, h; .reg .f32 fl, fh;"
            + body.replace("$ZA", za).replace("$ZB", zb).replace("$C16", c16)
            + "mov.b32 {l, h}, a;cvt.f32.f16 fl, l; cvt.f32.f16 fh, h;add.f32 $0, fl, fh; }")


WORD_PTX = tl.constexpr(_words_ptx(1))
WORD_PAIR_PTX = tl.constexpr(_words_ptx(2))


@triton.jit
def word_dot_asm(w, x0, x1, x2, x3, za, zb, c16):
    """sum_j X_j (c_j - z) over one word's 8 codes as fp32 (module docstring); X_j = (xs_j, xs_{j+4}) half2,
    za = -(1024 + z), zb = -(64 + z) as half2 pairs, c16 = 1/16 in both halves."""
    return tl.inline_asm_elementwise(WORD_PTX, "=f,r,r,r,r,r,r,r,r", [w, x0, x1, x2, x3, za, zb, c16],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def word_pair_dot_asm(wa, wb, a0, a1, a2, a3, b0, b1, b2, b3, za, zb, c16):
    """word_dot_asm for two words a, b (same column, same group) into one half2 accumulator: 16 codes, one
    conversion to fp32."""
    return tl.inline_asm_elementwise(WORD_PAIR_PTX, "=f" + ",r" * 13,
                                     [wa, wb, a0, a1, a2, a3, b0, b1, b2, b3, za, zb, c16], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def split8(v):
    """The 8 columns of v [R, 8] as [R] tensors (tl.split tree: codes j = 0..7 in order)."""
    a, b = tl.split(tl.reshape(v, (v.shape[0], 4, 2)))  # j even, odd
    a0, a1 = tl.split(tl.reshape(a, (v.shape[0], 2, 2)))  # j = 0, 4 | 2, 6
    b0, b1 = tl.split(tl.reshape(b, (v.shape[0], 2, 2)))  # j = 1, 5 | 3, 7
    x0, x4 = tl.split(a0)
    x2, x6 = tl.split(a1)
    x1, x5 = tl.split(b0)
    x3, x7 = tl.split(b1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def tile_factor(xv, XEXP: tl.constexpr):
    """(f, 1/f): powers of two with max |xv * f| in [2^XEXP, 2^(XEXP+1)) (f = 2^(XEXP + 126) for xv all zero)."""
    amax = tl.max(tl.max(tl.abs(xv), axis=1), axis=0)
    eb = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent of max |x|
    eb = tl.minimum(tl.maximum(eb, XEXP + 1), 254)
    f = ((254 + XEXP - eb) << 23).to(tl.float32, bitcast=True)  # 2^(XEXP - (eb - 127))
    inv = ((eb - XEXP) << 23).to(tl.float32, bitcast=True)
    return f, inv


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr,
    N, K, KW, group_size, stride_qk, stride_sg, kw_per_split, splits, magic, c16,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, GROUPS: tl.constexpr, PAIR: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, NUM_STAGES: tl.constexpr,
    ASM: tl.constexpr,
):
    XEXP: tl.constexpr = 7 if PAIR else 8
    R: tl.constexpr = BLOCK_KW // 2 if PAIR else BLOCK_KW  # accumulator rows
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = tl.arange(0, BLOCK_KW)
    j = tl.arange(0, 8)
    kw_start = pid_k * kw_per_split
    kw_end = tl.minimum(kw_start + kw_per_split, KW)
    acc = tl.zeros([R, BLOCK_N], dtype=tl.float32)
    for kw0 in tl.range(kw_start, kw_end, BLOCK_KW, num_stages=NUM_STAGES):
        words = tl.load(q_ptr + (kw0 + rows)[:, None] * stride_qk + offs_n[None, :],
                        mask=((kw0 + rows) < KW)[:, None] & n_ok[None, :], other=0)
        k = (kw0 + rows)[:, None] * 8 + j[None, :]  # [BLOCK_KW, 8]
        k_ok = k < K
        col = k
        if HAS_PERM:
            col = tl.load(perm_ptr + k, mask=k_ok, other=0)
        xv = tl.load(x_ptr + col, mask=k_ok, other=0.0).to(tl.float32)
        f, inv = tile_factor(xv, XEXP)
        if GROUPS == 0:  # the tile lies in one group: [1, BLOCK_N]
            g = kw0 * 8 // group_size
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + g * stride_sg + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        else:  # each word lies in one group: [BLOCK_KW, BLOCK_N]
            g = (tl.minimum((kw0 + rows) * 8, K - 1) // group_size)[:, None]
            s = tl.load(s_ptr + g * stride_sg + offs_n[None, :], mask=n_ok[None, :], other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * stride_sg + offs_n[None, :], mask=n_ok[None, :], other=0.0).to(tl.float32)
        xs = xv * f
        if ASM:
            za = pack_half2(-1024.0 - z, -1024.0 - z)
            zb = pack_half2(-64.0 - z, -64.0 - z)
            if PAIR:
                wa, wb = tl.split(tl.permute(tl.reshape(words, (R, 2, BLOCK_N)), (0, 2, 1)))
                xa, xb = tl.split(tl.permute(tl.reshape(xs, (R, 2, 8)), (0, 2, 1)))
                a0, a1, a2, a3, a4, a5, a6, a7 = split8(xa)
                b0, b1, b2, b3, b4, b5, b6, b7 = split8(xb)
                p = word_pair_dot_asm(
                    wa, wb, pack_half2(a0, a4)[:, None], pack_half2(a1, a5)[:, None], pack_half2(a2, a6)[:, None],
                    pack_half2(a3, a7)[:, None], pack_half2(b0, b4)[:, None], pack_half2(b1, b5)[:, None],
                    pack_half2(b2, b6)[:, None], pack_half2(b3, b7)[:, None], za, zb, c16)
            else:
                x0, x1, x2, x3, x4, x5, x6, x7 = split8(xs)
                p = word_dot_asm(words, pack_half2(x0, x4)[:, None], pack_half2(x1, x5)[:, None],
                                 pack_half2(x2, x6)[:, None], pack_half2(x3, x7)[:, None], za, zb, c16)
        else:  # portable: the same sums in fp32
            x0, x1, x2, x3, x4, x5, x6, x7 = split8(xs)
            p = x0[:, None] * code_minus_zero(words, 0, z, magic, 4)
            p += x1[:, None] * code_minus_zero(words, 1, z, magic, 4) / code_scale(1, 4)
            p += x2[:, None] * code_minus_zero(words, 2, z, magic, 4) / code_scale(2, 4)
            p += x3[:, None] * code_minus_zero(words, 3, z, magic, 4) / code_scale(3, 4)
            p += x4[:, None] * code_minus_zero(words, 4, z, magic, 4) / code_scale(4, 4)
            p += x5[:, None] * code_minus_zero(words, 5, z, magic, 4) / code_scale(5, 4)
            p += x6[:, None] * code_minus_zero(words, 6, z, magic, 4) / code_scale(6, 4)
            p += x7[:, None] * code_minus_zero(words, 7, z, magic, 4) / code_scale(7, 4)
            if PAIR:
                pa, pb = tl.split(tl.permute(tl.reshape(p, (R, 2, BLOCK_N)), (0, 2, 1)))
                p = pa + pb
        acc += (p * s) * inv  # not p * (s * inv): 2^119 (x of 3e38) times a scale above 512 is inf, and 0 * inf NaN
    out = tl.sum(acc, axis=0)[None, :]
    store_output(y_ptr, out, tl.arange(0, 1), offs_n, 1, N, 0, bias_ptr, ws_ptr, count_ptr, pid_n, pid_k, splits,
                 HAS_BIAS, SPLIT)


def supports(x: torch.Tensor, bits: int, group_size: int, k: int, bilevel=None) -> bool:
    """Whether gemv_h2 takes these inputs: one row of fp16/bf16 x, 4-bit codes, plain scales and zeros, groups of
    whole words (or per-channel)."""
    return (x.shape[0] == 1 and x.dtype in (torch.float16, torch.bfloat16) and bits == 4 and bilevel is None
            and (group_size == k or group_size % 8 == 0))


def group_mode(block_kw: int, group_size: int, k: int) -> int:
    """0: every tile of block_kw words lies in one group; 1: every word does (group_size % 8 == 0)."""
    if group_size == k or group_size % (8 * block_kw) == 0:
        return 0
    if group_size % 8 == 0:
        return 1
    raise ValueError(f"gemv_h2 needs group_size a multiple of 8 or per-channel, got {group_size} for K={k}")


def check(x, qweight, scales, zeros, bits, group_size, perm, bias):
    """Raise ValueError naming the tensor that gemv_h2 cannot take (shapes and dtypes are checked by
    weight_only_matmul.check_inputs before)."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"x must be [1, K] for gemv_h2; got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x dtype {x.dtype} is not supported by gemv_h2 (fp16 or bf16)")
    if bits != 4:
        raise ValueError(f"gemv_h2 takes 4-bit qweight only, got bits={bits}")
    k = x.shape[1]
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[0] != -(-k // 8):
        raise ValueError(f"qweight must be int32 [ceil(K/8), N] = [{-(-k // 8)}, N]; got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n = qweight.shape[1]
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dtype != x.dtype or tuple(t.shape) != (k // group_size, n):
            raise ValueError(f"{name} must be {x.dtype} [{k // group_size}, {n}]; got {t.dtype} {tuple(t.shape)}")
    if perm is not None and (tuple(perm.shape) != (k,) or perm.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"perm must be int32/int64 [{k}]; got {perm.dtype} {tuple(perm.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be {x.dtype} [{n}]; got {bias.dtype} {tuple(bias.shape)}")


def gemv_h2(x, qweight, scales, zeros, perm, bias, *, bits: int, group_size: int, config: dict,
            bilevel=None) -> torch.Tensor:
    """y = x[:, perm] @ dequant(qweight) (+ bias) for x [1, K] fp16/bf16 with x.stride(1) == 1, 4-bit codes."""
    if bilevel is not None:
        raise ValueError("gemv_h2 takes plain scales and zeros, not bilevel")
    check(x, qweight, scales, zeros, bits, group_size, perm, bias)
    k, n = x.shape[1], qweight.shape[1]
    block_kw = config["BLOCK_KW"]
    groups = group_mode(block_kw, group_size, k)
    per_split, splits = split_k_grid(qweight.shape[0], block_kw, config["SPLIT_K"])
    y = dequant_gemm.output_buffer(1, n, x.dtype, x.device)
    tiles = triton.cdiv(n, config["BLOCK_N"])
    ws, counters = dequant_gemm.split_k_buffers(splits, 1, n, tiles, x.device) if splits > 1 else (y, y)
    _w4a16_gemv_kernel[(tiles, splits)](
        x, qweight, scales, zeros, perm if perm is not None else qweight, bias if bias is not None else y, y, ws,
        counters, n, k, qweight.shape[0], group_size, qweight.stride(0), scales.stride(0), per_split, splits,
        MAGIC_BITS, SIXTEENTH, BLOCK_N=config["BLOCK_N"], BLOCK_KW=block_kw, GROUPS=groups,
        PAIR=groups == 0 and block_kw % 2 == 0 and config.get("pair", True), HAS_PERM=perm is not None,
        HAS_BIAS=bias is not None, SPLIT=splits > 1, NUM_STAGES=config["num_stages"], ASM=not interpreter_on(),
        num_warps=config["num_warps"],
    )
    return y


INTERPRETER_CONFIG = dict(path="gemv_h2", BLOCK_N=32, BLOCK_KW=2, SPLIT_K=2, num_warps=4, num_stages=1)


def configs(n: int, kw: int) -> list[dict]:
    """Candidates for N = n and kw words along K, the default first: tiles (num_warps, BLOCK_N, BLOCK_KW) with many
    columns a thread (the x preparation of a tile is shared by them), each with the two split-K counts nearest 3-4
    programs per SM (450), 3 and 2 pipeline stages."""
    return split_k_candidates("gemv_h2", ((4, 2048, 4), (4, 1024, 4), (4, 2048, 2), (4, 1024, 2), (8, 2048, 4)),
                              n, kw, 450, 2, (3, 2))

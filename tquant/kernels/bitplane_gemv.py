"""Bit-plane GEMV for small batches (ABQ-LLM's binary WpAq GEMV, decode M = 1..8): AND + popcount, no tensor cores.

Format and result of tquant.kernels.bitplane_gemm (p = bits, q = act_bits in 2..8; its module docstring), with
a = xq + 2^(q-1) in [0, 2^q) the activation codes, c in [0, 2^p) the weight codes, KW = ceil(K / 32):
    y[m, n] = x_scale[m] * sum_g w_scale[g, n] * S[m, g, n] (+ bias[n]),
    S[m, g, n] = sum_{k in g} (a[m, k] - x_zero[m]) (c[n, k] - w_zero[g, n])   (an exact integer)
Activation planes (`pack_activations`, one small Triton pass):
    xp    int32 [q, M, KW]: plane j of row m holds bit j of a[m, :] in the weights' byte-SWAR order
          (pack_planes(a, q) with its last two axes swapped, so a row's words are contiguous); bits past K are 0
    xsum  int32 [M, KW]: sum of a over each word's 32 k
Product: with both operands in one bit order, a word w of row m and column n gives
    sum_{k in w} a[m, k] c[n, k] = sum_{j<q, i<p} 2^(i+j) popc(xp[j, m, w] & planes[i, w, n])
Zero points by the row / column-sum identity, per span (a run of words within one group and one split):
    S_span = P - wz * A - xz * (C - |span| * wz),   P the popcount sum, A = sum of xsum, |span| its k < K,
    C = w_sum[g] when the span is the whole group, else (CODE_SUMS) sum_i 2^i popc(planes_i) counted in the kernel
    (bits past K masked), p more popc a word and column. A span ends at its group's end, every MAX_SPAN k inside a
    group, and at the split's end; S_span is converted to fp32 (one rounding a span) and multiplied by w_scale[g].
int32 bounds: every term above is at most (2^q - 1)(2^p - 1) |span| <= 255 * 255 * 16384 < 2^30 in magnitude
(P >= 0, wz * A, |xz (C - |span| wz)| and |S_span| alike), so no sum wraps; popc partial sums are smaller.

`bitplane_gemv`: grid (ceil(N / BLOCK_N), splits, row blocks); program (pid_n, split, pid_m) owns columns
pid_n * BLOCK_N .. + BLOCK_N of ROWS rows (row_blocks: at most 8 rows and MAX_TERMS = rows * p * q; unrolled, one
int32 and one fp32 accumulator [BLOCK_N] a row, no padding to a power of two) and walks its split's words in one
loop of BLOCK_KW-word steps (a span's end is a branch in it, so short groups make no short inner loops), each word
unrolled: its p plane words [BLOCK_N] (a coalesced load each; every tensor in the loop is 1-D along N in one layout,
so no reduction or layout conversion there), and per row and activation plane j one scalar word (a broadcast load,
the same in every lane) ANDed with them. The BLOCK_KW words of one (i, j) pair share the weight 2^(i+j) and are
summed by popc_sum: 8 words through four bit-sliced full adders and 4 popc, 4 through one adder and 3 popc, else a
popc each (POPC issues at a quarter of LOP3's rate on sm_70 .. sm_90: trading a popc for two LOP3 pays until the
pipes balance). Ops per weight word (32 weights), row and (i, j): one AND, a shift-add, and 1/2 popc + 1 LOP3 at
BLOCK_KW 8 (3/4 popc + 1/2 LOP3 at 4, 1 popc at 1 or 2); under CODE_SUMS p popc more a word and column. On sm_90
(M=1 W2A8, BLOCK_KW 8): 0.5 POPC, 2.6 LOP3, 1.3 IMAD per term, against 1 POPC, 1 LOP3, 1 IMAD, 0.4 IADD3 with plain
popcounts. The span's correction and the split-K reduction (dequant_gemm.store_output: fp32 partials, the last split
sums them and stores y) are O(M N) a span. Splits hold whole groups when there are several (BLOCK_KW divides
group_size / 32); with one group per channel a split cuts it (CODE_SUMS). The config (tile, split, warps) is tuned
per GPU and key (M, N, K, p, q, group_size, out dtype, bias) by autotune_cache; the interpreter runs one config.
Popcount: libdevice.popc (one POPC) on the GPU; the interpreter has no libdevice, so there a SWAR count in plain
integer ops (HW_POPC=False). The launcher does not check the codes' ranges (that would sync the GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from ..formats.packing import pack_planes
from . import dequant_gemm
from .autotune_cache import tune
from .bitplane_gemm import check_bits, wpaq_arguments
from .dequant_gemm import k_range, split_args, store_output
from .runtime import interpreter_on, next_power_of_2

MAX_SPAN = 16384  # k summed in int32 before a conversion to fp32 (module docstring: no int32 overflow); its words
# (512) are a multiple of every BLOCK_KW, so spans end on step boundaries
MAX_ROWS = 8  # rows a program unrolls (fewer for large p q: row_blocks); more take more programs along grid axis 2
MAX_TERMS = 192  # rows * p * q: AND + popcount terms a program unrolls per word and column (row_blocks)
TARGET_WARPS = 132 * 16  # the split-K count aims at this many warps in the grid (H100 / H200: 132 SMs)


# ---- activation planes ----

def pack_activations_ref(xq: torch.Tensor, act_bits: int):
    """(xp int32 [q, M, KW], xsum int32 [M, KW]) of xq int8 [M, K] (module docstring), through pack_planes."""
    check_bits("act_bits", act_bits)
    a = xq.to(torch.int32) + 2 ** (act_bits - 1)
    m, k = a.shape
    kw = -(-k // 32)
    xp = pack_planes(a, act_bits, checked=False).transpose(1, 2).contiguous()
    xsum = torch.nn.functional.pad(a, (0, 32 * kw - k)).view(m, kw, 32).sum(dim=-1, dtype=torch.int32)
    return xp, xsum


@triton.jit
def _pack_activations_kernel(xq_ptr, xp_ptr, xsum_ptr, M, K, KW, stride_xm, Q: tl.constexpr, BLOCK_W: tl.constexpr):
    """Program (m, pid) packs words pid * BLOCK_W .. + BLOCK_W of row m: [BLOCK_W, 32] codes, bit b of word w
    taking k = 32 w + 4 (b % 8) + b // 8 (pack_planes' order), a = 0 past K."""
    m = tl.program_id(0)
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    b = tl.arange(0, 32)
    k = 32 * w[:, None] + (4 * (b % 8) + b // 8)[None, :]
    xq = tl.load(xq_ptr + m.to(tl.int64) * stride_xm + k, mask=k < K, other=0).to(tl.int32)
    a = tl.where(k < K, xq + (1 << (Q - 1)), 0)
    w_ok = w < KW
    row = m * KW + w
    tl.store(xsum_ptr + row, tl.sum(a, axis=1), mask=w_ok)
    for j in tl.static_range(Q):  # disjoint bits: their sum is the word (bit 31 as -2^31)
        tl.store(xp_ptr + j * M * KW + row, tl.sum(((a >> j) & 1) << b[None, :], axis=1), mask=w_ok)


def pack_activations(xq: torch.Tensor, act_bits: int):
    """(xp, xsum) of pack_activations_ref on the Triton kernel (xq int8 [M, K], M >= 1, K >= 1)."""
    m, k = xq.shape
    kw = -(-k // 32)
    xp = torch.empty(act_bits, m, kw, dtype=torch.int32, device=xq.device)
    xsum = torch.empty(m, kw, dtype=torch.int32, device=xq.device)
    block_w = 4 if interpreter_on() else 32
    _pack_activations_kernel[(m, triton.cdiv(kw, block_w))](xq, xp, xsum, m, k, kw, xq.stride(0), Q=act_bits,
                                                            BLOCK_W=block_w, num_warps=4)
    return xp, xsum


# ---- the popcount GEMV ----

@triton.jit
def popcount(x, HW: tl.constexpr):
    """Set bits of each int32 word: libdevice.popc on the GPU (HW), else a SWAR count (the interpreter)."""
    if HW:
        return libdevice.popc(x)
    else:
        x = x - ((x >> 1) & 0x55555555)  # the masks drop the bits an arithmetic shift brings in
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        return (x + (x >> 8) + (x >> 16) + (x >> 24)) & 0x3F


@triton.jit
def full_add(a, b, c):
    """Bit-sliced full adder: (a ^ b ^ c, majority(a, b, c)), two LOP3; popc(a) + popc(b) + popc(c) =
    popc(sum) + 2 popc(carry)."""
    return a ^ b ^ c, (a & b) | (c & (a ^ b))


@triton.jit
def popc_sum(acc, x, SHIFT: tl.constexpr, HW: tl.constexpr):
    """acc + (sum_t popc(x[t])) << SHIFT for a tuple x of 1, 2, 4 or 8 words. 4 and 8 words go through carry-save
    adders first (Harley-Seal): 3 popc for 4 words, 4 for 8, each saved popc (a quarter-rate instruction) costing two
    full-rate LOP3."""
    if len(x) == 8:
        s1, c1 = full_add(x[0], x[1], x[2])
        s2, c2 = full_add(x[3], x[4], x[5])
        s3, c3 = full_add(s1, s2, x[6])
        s4, c4 = full_add(c1, c2, c3)
        acc += (popcount(s3, HW) + popcount(x[7], HW)) << SHIFT
        acc += popcount(s4, HW) << (SHIFT + 1)
        acc += popcount(c4, HW) << (SHIFT + 2)
    elif len(x) == 4:
        s1, c1 = full_add(x[0], x[1], x[2])
        acc += (popcount(s1, HW) + popcount(x[3], HW)) << SHIFT
        acc += popcount(c1, HW) << (SHIFT + 1)
    else:
        for t in tl.static_range(len(x)):
            acc += popcount(x[t], HW) << SHIFT
    return acc


@triton.jit
def valid_bits(kw, K):
    """Mask of the bits of words kw holding k < K: byte b of a word holds k = 4 s + b at its bit s, so its low
    ceil((v - b) / 4) bits are valid, v = the word's k < K."""
    v = tl.minimum(tl.maximum(K - 32 * kw, 0), 32)
    mask = v * 0
    for b in tl.static_range(4):
        n = tl.minimum(tl.maximum((v - b + 3) >> 2, 0), 8)
        mask |= ((1 << n) - 1) << (8 * b)
    return mask


@triton.jit
def _bitplane_gemv_kernel(xp_ptr, xsum_ptr, xs_ptr, xz_ptr, p_ptr, ws_ptr, wz_ptr, wsum_ptr, bias_ptr, y_ptr,
                          part_ptr, count_ptr, M, N, K, KW, GW, span, kw_per_split, splits, stride_ym,
                          P: tl.constexpr, Q: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, CODE_SUMS: tl.constexpr,
                          FULL_WORDS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, HW_POPC: tl.constexpr):
    pid_n, pid_s, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row0 = pid_m * ROWS
    kw_start, kw_end = k_range(KW, kw_per_split, pid_s, SPLIT)
    acc = ()  # per row: fp32 sum over the finished spans of w_scale * S, [BLOCK_N]
    dot = ()  # per row: int32 popcount sum of the current span, [BLOCK_N]
    sum_a = ()  # per row: int32 sum of a over the current span
    xz = ()
    for r in tl.static_range(ROWS):
        acc += (tl.zeros([BLOCK_N], tl.float32),)
        dot += (tl.zeros([BLOCK_N], tl.int32),)
        sum_a += (kw_start * 0,)
        xz += (tl.load(xz_ptr + row0 + r, mask=row0 + r < M, other=0),)
    sum_c = tl.zeros([BLOCK_N], tl.int32)  # CODE_SUMS: sum of c over the current span
    s0 = kw_start  # first word of the current span
    for kw0 in tl.range(kw_start, kw_end, BLOCK_KW, num_stages=1):  # not pipelined (module docstring)
        # w[i * BLOCK_KW + t]: plane i of word kw0 + t, [BLOCK_N] (every tensor here has this one layout); masks fold
        # the scalar word bound into the column bound (a mask & a scalar is no mask in the interpreter)
        w = ()
        for i in tl.static_range(P):
            for t in tl.static_range(BLOCK_KW):
                kw = kw0 + t
                w += (tl.load(p_ptr + (i * KW + kw).to(tl.int64) * N + offs_n,
                              mask=offs_n < tl.where(kw < kw_end, N, 0), other=0),)
        if CODE_SUMS:
            for i in tl.static_range(P):
                words = ()
                for t in tl.static_range(BLOCK_KW):
                    if FULL_WORDS:
                        words += (w[i * BLOCK_KW + t],)
                    else:
                        words += (w[i * BLOCK_KW + t] & valid_bits(kw0 + t, K),)
                sum_c = popc_sum(sum_c, words, i, HW_POPC)
        new_dot = ()
        new_sum_a = ()
        for r in tl.static_range(ROWS):
            row = row0 + r
            a_end = tl.where(row < M, kw_end, 0)
            d = dot[r]
            sa = sum_a[r]
            for t in tl.static_range(BLOCK_KW):
                sa += tl.load(xsum_ptr + row * KW + kw0 + t, mask=kw0 + t < a_end, other=0)
            for j in tl.static_range(Q):
                a = ()  # words kw0 .. kw0 + BLOCK_KW - 1 of plane j, row r: scalars, the same in every lane
                for t in tl.static_range(BLOCK_KW):
                    a += (tl.load(xp_ptr + (j * M + row) * KW + kw0 + t, mask=kw0 + t < a_end, other=0),)
                for i in tl.static_range(P):
                    words = ()
                    for t in tl.static_range(BLOCK_KW):
                        words += (a[t] & w[i * BLOCK_KW + t],)
                    d = popc_sum(d, words, i + j, HW_POPC)
            new_dot += (d,)
            new_sum_a += (sa,)
        dot = new_dot
        sum_a = new_sum_a
        e = tl.minimum(kw0 + BLOCK_KW, kw_end)
        g = kw0 // GW
        done = e - g * GW  # words of group g up to e
        if (done == GW) | (done % span == 0) | (e == kw_end):  # the span ends: S into acc
            at = g * N + offs_n
            n_ok = offs_n < N
            wz = tl.load(wz_ptr + at, mask=n_ok, other=0).to(tl.int32)
            ws = tl.load(ws_ptr + at, mask=n_ok, other=0.0)
            if CODE_SUMS:
                c = sum_c
            else:
                c = tl.load(wsum_ptr + at, mask=n_ok, other=0)
            cz = c - (tl.minimum(32 * e, K) - 32 * s0) * wz  # sum over the span of c - wz
            new_acc = ()
            new_dot = ()
            new_sum_a = ()
            for r in tl.static_range(ROWS):
                s = (dot[r] - wz * sum_a[r]) - xz[r] * cz
                new_acc += (acc[r] + s.to(tl.float32) * ws,)
                new_dot += (tl.zeros_like(dot[r]),)
                new_sum_a += (sum_a[r] * 0,)
            acc = new_acc
            dot = new_dot
            sum_a = new_sum_a
            sum_c = tl.zeros_like(sum_c)
            s0 = e
    m_in_tile = tl.arange(0, BLOCK_M)
    out = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r in tl.static_range(ROWS):
        xs = tl.load(xs_ptr + row0 + r, mask=row0 + r < M, other=0.0)
        out = tl.where(m_in_tile[:, None] == r, (acc[r] * xs)[None, :], out)
    # rows ROWS .. BLOCK_M - 1 of the tile belong to the next row block: masked (as row M), not written as zeros
    rows_out = tl.where(m_in_tile < ROWS, row0 + m_in_tile, M)
    store_output(y_ptr, out, rows_out, offs_n, M, N, stride_ym, bias_ptr, part_ptr, count_ptr,
                 pid_m * tl.num_programs(0) + pid_n, pid_s, splits, HAS_BIAS, SPLIT)


# ---- configs and launchers ----

INTERPRETER_CONFIG = dict(BLOCK_N=64, BLOCK_KW=2, SPLIT_K=2, num_warps=1)


def group_words(k: int, group_size: int) -> int:
    """Words of a group: group_size / 32, or all KW words with one group per channel."""
    return -(-k // 32) if group_size == k else group_size // 32


def tile(rows: int, bits: int, act_bits: int, gw: int, groups: int, budget: int) -> tuple[int, int]:
    """(BLOCK_KW, elements a thread along N) with rows * p * q * BLOCK_KW * elements (the AND + popcount terms a
    thread unrolls per step) <= budget where possible: BLOCK_KW first (8 and 4 words go through popc_sum's carry-save
    adders), dividing the group's words when there are several groups. On sm_90 a budget of 128 compiles to 128
    registers at M=1 W2A8 (166 with CODE_SUMS), 256 to about 250, without spills."""
    terms = rows * bits * act_bits
    bkw = next(b for b in (8, 4, 2, 1) if (terms * b <= budget or b == 1) and (groups == 1 or gw % b == 0))
    return bkw, next(e for e in (4, 2, 1) if terms * bkw * e <= budget or e == 1)


def split_for(tiles: int, warps: int, kw: int, bkw: int, groups: int) -> int:
    """The power-of-two split count nearest TARGET_WARPS warps in all, each split keeping >= 2 steps of K (or one
    group)."""
    best = 1
    for sk in (2, 4, 8, 16, 32, 64):
        if (kw < 2 * sk * bkw if groups == 1 else groups < sk):
            break
        if abs(tiles * warps * sk - TARGET_WARPS) < abs(tiles * warps * best - TARGET_WARPS):
            best = sk
    return best


def row_blocks(m: int, bits: int, act_bits: int) -> tuple[int, int]:
    """(ROWS, row blocks): the batch in ceil(M / ROWS) blocks of ROWS rows (the last masked), at most MAX_ROWS rows
    and MAX_TERMS terms (rows * p * q) a block: W8A8 takes 3 rows a program, W4A8 6, W2A8 8 (each block reads the
    weights once). On sm_90, 8 rows of W4A8 (256 terms) spill; 4 rows of W8A8 or 7 of W6A6 take 255 registers."""
    cap = max(1, min(MAX_ROWS, MAX_TERMS // (bits * act_bits)))
    blocks = -(-m // cap)
    return -(-m // blocks), blocks


def configs(m: int, n: int, k: int, group_size: int, bits: int, act_bits: int) -> list[dict]:
    """Candidates (<= 8, the untuned default first): tiles from tile() at budgets 128 (default), 256 and 64, BLOCK_N =
    32 * num_warps * elements, 1 / 2 / 4 / 8 warps, the split count for TARGET_WARPS (a quarter of it, and 1: no
    split, so no CODE_SUMS with one group per channel). No software pipelining: the many small loads of a step make
    Triton's pipeliner take minutes to compile a config, and the programs are short (a few steps each); latency is
    hidden by the programs an SM holds instead. The interpreter: INTERPRETER_CONFIG (BLOCK_KW 1 for groups of 32)."""
    kw, gw, groups = -(-k // 32), group_words(k, group_size), k // group_size
    if interpreter_on():
        return [dict(INTERPRETER_CONFIG, BLOCK_KW=1 if groups > 1 and gw % 2 else INTERPRETER_CONFIG["BLOCK_KW"])]
    rows, blocks_m = row_blocks(m, bits, act_bits)

    def config(warps, budget=128, split=None):
        bkw, per_thread = tile(rows, bits, act_bits, gw, groups, budget)
        block_n = 32 * warps * per_thread
        if split is None:
            split = split_for(-(-n // block_n) * blocks_m, warps, kw, bkw, groups)
        return dict(BLOCK_N=block_n, BLOCK_KW=bkw, SPLIT_K=split, num_warps=warps)

    quarter = max(1, config(4)["SPLIT_K"] // 4)
    out = [config(4), config(2), config(8), config(1), config(4, split=quarter), config(4, split=1),
           config(4, budget=256), config(4, budget=64)]
    return [c for i, c in enumerate(out) if c not in out[:i]]


def check_config(config, k: int, group_size: int) -> None:
    gw, groups = group_words(k, group_size), k // group_size
    if groups > 1 and gw % config["BLOCK_KW"]:
        raise ValueError(f"BLOCK_KW={config['BLOCK_KW']} must divide group_size / 32 = {gw} (K={k} has several "
                         "groups)")


def launch(config, xq, x_scale, x_zero, planes, w_scale, w_zero, w_sum, bits, act_bits, group_size, bias,
           out_dtype) -> torch.Tensor:
    """Pack the activations, then one launch of the GEMV with config (inputs checked and contiguous, M, N >= 1)."""
    (m, k), n = xq.shape, planes.shape[2]
    check_config(config, k, group_size)
    kw, gw, groups = planes.shape[1], group_words(k, group_size), k // group_size
    xp, xsum = pack_activations(xq, act_bits)
    span = min(gw, MAX_SPAN // 32)
    rows, blocks_m = row_blocks(m, bits, act_bits)
    y = dequant_gemm.output_buffer(m, n, out_dtype, xq.device)
    tiles_n = triton.cdiv(n, config["BLOCK_N"])
    # words a split: BLOCK_KW multiples with one group, else whole groups (kw = groups * gw: gw-word K steps)
    per_split, splits, part, counters = split_args(config, kw, config["BLOCK_KW"] if groups == 1 else gw, m, n,
                                                   tiles_n * blocks_m, y)
    grid = (tiles_n, splits, blocks_m)
    _bitplane_gemv_kernel[grid](
        xp, xsum, x_scale, x_zero, planes, w_scale, w_zero, w_sum, bias if bias is not None else y, y, part, counters,
        m, n, k, kw, gw, span, per_split, splits, y.stride(0), P=bits, Q=act_bits, ROWS=rows,
        BLOCK_M=next_power_of_2(rows), BLOCK_N=config["BLOCK_N"], BLOCK_KW=config["BLOCK_KW"],
        CODE_SUMS=span < gw or (splits > 1 and per_split % gw != 0), FULL_WORDS=k % 32 == 0,
        HAS_BIAS=bias is not None, SPLIT=splits > 1, HW_POPC=not interpreter_on(), num_warps=config["num_warps"],
    )
    return y


def bitplane_gemv(xq, x_scale, x_zero, planes, w_scale, w_zero, w_sum, *, bits, act_bits, group_size, bias=None,
                  out_dtype=torch.float16):
    """y [M, N] of bitplane_gemm.bitplane_matmul_ref (same arguments) by AND + popcount: pack_activations, then the
    GEMV kernel (module docstring). Made for decode (M <= 8); more rows, or more terms than MAX_TERMS, run in row
    blocks (row_blocks), each reading the weights once."""
    args, key = wpaq_arguments(xq, x_scale, x_zero, planes, w_scale, w_zero, w_sum, bits, act_bits, group_size, bias,
                               out_dtype)
    if args is None:
        return torch.empty(key["M"], key["N"], dtype=out_dtype, device=xq.device)
    candidates = configs(key["M"], key["N"], key["K"], group_size, bits, act_bits)
    config = tune("bitplane_gemv", key, candidates, lambda c: launch(c, *args), xq.device)
    return launch(config, *args)


__all__ = ["bitplane_gemv", "pack_activations", "pack_activations_ref"]

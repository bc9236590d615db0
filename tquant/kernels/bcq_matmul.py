"""Matmul with a BCQ weight (tquant.formats.bcq: W = sum_i alpha_i B_i + offset, B_i in {-1, +1}): the Triton kernel and
the torch reference.

    y [M, N] = x[:, perm] @ W^T + bias,   W[n, k] = sum_{i < q} alphas[i, g, n] (2 u_i(k, n) - 1) + offset[g, n],  g = k // group
    planes  int32 [q, K / 32, N]   plane i's bits u_i packed along K (tquant.formats.packing, 1 bit: bit k % 32 of word k // 32)
    alphas  [q, G, N], offset [G, N] or None, bias [N] or None, in x's dtype (fp16 / bf16 / fp32); perm int32 [K] or
    None; K a multiple of 32 and of group
Three paths, chosen per shape by the autotuner (configs: path "dot" always, "lut" and "smem" for M <= LUT_MAX_M):
"dot" (in-register): program (m, n, split) owns a [BLOCK_M, BLOCK_N] tile of y and walks its share of K in BLOCK_K
steps (BLOCK_K divides the group, so a step has one alpha per plane and column): each plane's [BLOCK_K / 32, BLOCK_N]
words are loaded as one coalesced tile, their bits split out in registers (tiling.unpack_words), and W's tile is
summed as where(u, alpha_i, -alpha_i) over the planes (one select and one add a plane and weight), then
acc += tl.dot(x tile, W tile) in fp32.
"lut" (LUT-GEMM's tables, batch <= LUT_MAX_M): _bcq_table_kernel writes, for every row of x and every 8 activations
(chunk c), the signed partial sums t[c, j] = sum_{b < 8} x[8c + b] (2 bit_b(j) - 1) / 8 for j < 128 (in x's dtype,
[M, K / 8, 128]): the other half is t[c, ~j] = -t[c, j], so LUT-GEMM's 256 entries are 128, 256 bytes in fp16.
_bcq_lut_kernel reads plane i's words as [BLOCK_N] rows; each byte holds the signs of 8 weights: if its top bit is
set, it gathers t at the complement of the low 7 bits and flips the entry's sign bit (the complements of a word's 4
bytes taken at once), through L1 / L2, one load per 8 weights and plane: S_i = sum_k x_k (2 u_ik - 1) / 8,
y += sum_i 8 alpha_i S_i (+ 8 offset X, X the sum of the step's activations / 8).
"smem" (the same sums, the tables in shared memory): the table kernel writes tables of 128 signed entries as above or
of all 256 ([M, K / 8, 256]: no complement, no sign flip); _bcq_smem_kernel loads its K step's tables as one register
tensor [BLOCK_K / 8 * entries] (in x's dtype, or converted to fp32) and reads a column's BLOCK_K / 32 words of each
plane into one thread (tl.join), their bytes as gather indices entries (4w + f) + byte f of word w (of 128: its
folded low 7 bits, the sign flipped as in "lut"), [BLOCK_N, BLOCK_K / 8] a plane (two or four planes joined on a
last axis), flattened into one tl.gather of the table (q = 3: two). Triton lowers a gather whose source spans
several warps through shared memory (the source stored, a barrier, one LDS an index, a barrier; sm_90 SASS: 16 q LDS
a K step of 128, no SHFL), and one whose gather axis lies within a warp to warp shuffles, the layout its gather
optimization gives any 2-D or wider source: hence the 1-D table and the flattened indices.
The tuner picks a path per key ("lut" and "smem" read the weights once per row of x: small-batch paths); the
measured trade-offs are in benchmarks/RESULTS.md. sm_90 SASS of the loops (Triton 3.9, q = 3, fp16): "dot" 13
instructions a weight (128 x 128 tiles), "lut" 5.1 (256 x 128; a 2-D tile of fields instead of 1-D rows had its
addresses converted to the gather's layout through shared memory), "smem" 2.7 with tables of 256 (3.9 of 128).
All gather x through perm (act order) in their loads and finish with dequant_gemm.store_output: split-K partials
summed by the last split to arrive, the bias added, y written in x's dtype, one launch.
`bcq_matmul_ref` decodes W with tquant.formats.bcq.dequantize and multiplies in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats import bcq
from ..formats.packing import unpack_codes
from .autotune_cache import tune
from . import dequant_gemm
from .dequant_gemm import k_range, split_args, store_output
from .runtime import DTYPES, check_device, check_tensors, dot_args, interpreter_on
from .tiling import unpack_words



def unpack_planes(planes: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 bits [q, N, K] of packed planes int32 [q, K / 32, N]."""
    return torch.stack([unpack_codes(p, 1, k).t() for p in planes]).to(torch.uint8)


def bcq_matmul_ref(x, planes, alphas, offset=None, perm=None, bias=None) -> torch.Tensor:
    """x[:, perm] @ W^T (+ bias) in fp32 through tquant.formats.bcq.dequantize, in x's dtype."""
    check_inputs(x, planes, alphas, offset, perm, bias)
    w = bcq.dequantize(alphas.float().permute(2, 1, 0), unpack_planes(planes, x.shape[-1]),
                       None if offset is None else offset.float().t())
    y = (x.float() if perm is None else x.float()[:, perm.long()]) @ w.t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


@triton.jit
def input_columns(perm_ptr, k0, BLOCK_K: tl.constexpr, HAS_PERM: tl.constexpr):
    """Columns of x read for storage columns k0 .. k0 + BLOCK_K - 1 (perm[k] with act order)."""
    rk = k0 + tl.arange(0, BLOCK_K)
    if HAS_PERM:
        rk = tl.load(perm_ptr + rk)
    return rk


@triton.jit
def plane_words(p_ptr, i, k0, rn, n_ok, N, K, BLOCK_K: tl.constexpr):
    """Plane i's words [BLOCK_K / 32, BLOCK_N] of storage columns k0 .. k0 + BLOCK_K - 1, output columns rn."""
    rw = i * (K // 32) + k0 // 32 + tl.arange(0, BLOCK_K // 32)
    return tl.load(p_ptr + rw[:, None].to(tl.int64) * N + rn[None, :], mask=n_ok[None, :], other=0)


@triton.jit
def _bcq_matmul_kernel(x_ptr, p_ptr, a_ptr, o_ptr, perm_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, GROUPS,
                       tiles_per_split, splits, Q: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                       HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       PRECISION: tl.constexpr):
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first, t_end = k_range(K // BLOCK_K, tiles_per_split, split, SPLIT)
    for t in range(first, t_end):
        k0 = t * BLOCK_K
        rk = input_columns(perm_ptr, k0, BLOCK_K, HAS_PERM)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], mask=m_ok[:, None], other=0.0)
        g = k0 // GROUP
        w = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(Q):
            u = tl.trans(unpack_words(tl.trans(plane_words(p_ptr, i, k0, rn, n_ok, N, K, BLOCK_K)), 1))
            alpha = tl.load(a_ptr + (i * GROUPS + g) * N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            w += tl.where(u != 0, alpha, -alpha)
        if HAS_OFFSET:
            w += tl.load(o_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=PRECISION)
    store_output(y_ptr, acc, rm, rn, M, N, N, bias_ptr, ws_ptr, count_ptr, pid_m * tl.num_programs(1) + pid_n, split,
                 splits, HAS_BIAS, SPLIT)


@triton.jit
def _bcq_table_kernel(x_ptr, perm_ptr, t_ptr, K, HAS_PERM: tl.constexpr, ENTRIES: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """The tables of row m of x (x[:, perm]) over 8: t[m, c, j] = sum_{b < 8} x[m, 8c + b] / 8 (2 bit_b(j) - 1) for
    j < ENTRIES (128: the signed half, 256: all of LUT-GEMM's entries), summed in fp32 and stored in t's dtype (the
    1/8, exact, keeps a sum of 8 activations of up to the dtype's largest value finite; the LUT kernels multiply it
    back with the alphas); program (m, block) writes BLOCK_C chunks."""
    m, rc = tl.program_id(0), tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < K // 8
    col = rc[:, None] * 8 + tl.arange(0, 8)[None, :]
    if HAS_PERM:
        col = tl.load(perm_ptr + col, mask=c_ok[:, None], other=0)
    xl = tl.load(x_ptr + m.to(tl.int64) * K + col, mask=c_ok[:, None], other=0.0).to(tl.float32) * 0.125
    j = tl.arange(0, ENTRIES)[None, :]
    sign = (2 * ((j >> tl.arange(0, 8)[:, None]) & 1) - 1).to(tl.float32)  # [8, ENTRIES]
    table = tl.sum(xl[:, :, None] * sign[None, :, :], axis=1)
    tl.store(t_ptr + (m.to(tl.int64) * (K // 8) + rc)[:, None] * ENTRIES + j, table.to(t_ptr.dtype.element_ty),
             mask=c_ok[:, None])


@triton.jit
def _bcq_lut_kernel(x_ptr, t_ptr, p_ptr, a_ptr, o_ptr, perm_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, GROUPS,
                    tiles_per_split, splits, Q: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Row m of y from the tables: a tile adds sum_i alpha_i S_i (+ offset X), X the sum of the tile's x and
    S_i[n] = sum_c t[m, c, byte c of plane i's words at n], t[c, j] = -t[c, ~j] for the upper half."""
    m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    x_row = x_ptr + m.to(tl.int64) * K
    first, t_end = k_range(K // BLOCK_K, tiles_per_split, split, SPLIT)
    for t in tl.range(first, t_end, num_stages=NUM_STAGES):
        k0 = t * BLOCK_K
        table = t_ptr + (m.to(tl.int64) * (K // 8) + k0 // 8) * 128  # the tile's first chunk
        g = k0 // GROUP
        for i in tl.static_range(Q):
            # 1-D loads and gathers of [BLOCK_N] in one layout (a 2-D tile of fields would be converted to the
            # gather's layout through shared memory, one 64-bit address an element)
            partial = tl.zeros([BLOCK_N], dtype=tl.float32)
            for w in tl.static_range(BLOCK_K // 32):
                word = tl.load(p_ptr + (i * (K // 32) + k0 // 32 + w).to(tl.int64) * N + rn, mask=n_ok, other=0)
                folded = word ^ (((word >> 7) & 0x01010101) * 0x7F)  # a byte with its top bit set: low 7 complemented
                for f in tl.static_range(4):
                    entry = tl.load(table + (4 * w + f) * 128 + ((folded >> (8 * f)) & 0x7F))
                    sign = (word << (24 - 8 * f)) & -2147483648  # byte f's top bit as bit 31
                    partial += (entry.to(tl.float32).to(tl.int32, bitcast=True) ^ sign).to(tl.float32, bitcast=True)
            alpha = tl.load(a_ptr + (i * GROUPS + g) * N + rn, mask=n_ok, other=0.0).to(tl.float32)
            acc += (alpha * 8.0) * partial  # the tables hold sums over 8
        if HAS_OFFSET:
            acc += offset_term(x_row, perm_ptr, o_ptr, k0, g, rn, n_ok, N, BLOCK_K, HAS_PERM)
    store_output(y_ptr, acc[None, :], m + tl.arange(0, 1), rn, M, N, N, bias_ptr, ws_ptr, count_ptr,
                 m * tl.num_programs(1) + pid_n, split, splits, HAS_BIAS, SPLIT)


@triton.jit
def offset_term(x_row, perm_ptr, o_ptr, k0, g, rn, n_ok, N, BLOCK_K: tl.constexpr, HAS_PERM: tl.constexpr):
    """The table paths' offset part of one K step of a row of x: offset[g, n] * sum of the step's activations
    ([BLOCK_N] fp32; the sum taken over 8ths and scaled back by 8, as the tables hold sums over 8)."""
    total = tl.sum(tl.load(x_row + input_columns(perm_ptr, k0, BLOCK_K, HAS_PERM)).to(tl.float32) * 0.125, axis=0)
    return (tl.load(o_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32) * 8.0) * total


@triton.jit
def join4(a, b, c, d):
    """[..., 4] of four tensors of one shape, [..., f] = (a, b, c, d)[f], the new axis in each thread's registers."""
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), a.shape + [4])


@triton.jit
def column_words(w_ptr, n_ok, N, W: tl.constexpr):
    """The words at w_ptr [BLOCK_N] and the W - 1 rows of N words after it: [BLOCK_N] for W = 1, else [BLOCK_N, W]
    (W = 2, 4), a column's words in one thread."""
    words = tl.load(w_ptr, mask=n_ok, other=0)
    if W == 2:
        words = tl.join(words, tl.load(w_ptr + N, mask=n_ok, other=0))
    elif W == 4:
        words = join4(words, tl.load(w_ptr + N, mask=n_ok, other=0), tl.load(w_ptr + 2 * N, mask=n_ok, other=0),
                      tl.load(w_ptr + 3 * N, mask=n_ok, other=0))
    return words


@triton.jit
def plane_fields(w_ptr, a_ptr, n_ok, N, W: tl.constexpr, ENTRIES: tl.constexpr):
    """One plane's K step as gather fields, from its W words a column at w_ptr (rows of N) and its alphas at a_ptr:
    index [BLOCK_N, 4 W] into the step's tables of ENTRIES (field 4w + f: ENTRIES (4w + f) + byte f of word w;
    signed tables of 128: its low 7 bits, complemented when its top bit is set), sign [BLOCK_N, 4 W] (that top bit
    as bit 31; 0 for full tables of 256) and 8 alpha [BLOCK_N] in fp32."""
    word = column_words(w_ptr, n_ok, N, W)
    if ENTRIES == 128:
        folded = word ^ (((word >> 7) & 0x01010101) * 0x7F)
        sign = join4(word << 24, word << 16, word << 8, word) & -2147483648
    else:
        folded = word
        sign = join4(word, word, word, word) & 0
    if W == 1:
        chunk = 0
    else:
        chunk = tl.arange(0, W)[None, :] * (4 * ENTRIES)
    index = join4(chunk + (folded & (ENTRIES - 1)), chunk + ((folded >> 8) & (ENTRIES - 1)) + ENTRIES,
                  chunk + ((folded >> 16) & (ENTRIES - 1)) + 2 * ENTRIES,
                  chunk + ((folded >> 24) & (ENTRIES - 1)) + 3 * ENTRIES)
    shape: tl.constexpr = [w_ptr.shape[0], 4 * W]
    return tl.reshape(index, shape), tl.reshape(sign, shape), tl.load(a_ptr, mask=n_ok, other=0.0).to(tl.float32) * 8.0


@triton.jit
def shared_gather(table, w_ptr, a_ptr, n_ok, N, plane_stride, alpha_stride, P: tl.constexpr, W: tl.constexpr,
                  ENTRIES: tl.constexpr):
    """sum_{i < P} 8 alpha_i S_i [BLOCK_N] over P = 1, 2, 4 planes (plane i's words at w_ptr + i plane_stride, its
    alphas at a_ptr + i alpha_stride) by one tl.gather from the step's tables (table: [BLOCK_K / 8 * ENTRIES], spread
    over all warps, so the gather goes through shared memory): index, sign [BLOCK_N, 4 W(, P)] flattened for the
    gather, the entries' signs flipped, summed per plane, times its alpha."""
    index, sign, alpha = plane_fields(w_ptr, a_ptr, n_ok, N, W, ENTRIES)
    if P == 2:
        index1, sign1, alpha1 = plane_fields(w_ptr + plane_stride, a_ptr + alpha_stride, n_ok, N, W, ENTRIES)
        index, sign, alpha = tl.join(index, index1), tl.join(sign, sign1), tl.join(alpha, alpha1)
    elif P == 4:
        index1, sign1, alpha1 = plane_fields(w_ptr + plane_stride, a_ptr + alpha_stride, n_ok, N, W, ENTRIES)
        index2, sign2, alpha2 = plane_fields(w_ptr + 2 * plane_stride, a_ptr + 2 * alpha_stride, n_ok, N, W, ENTRIES)
        index3, sign3, alpha3 = plane_fields(w_ptr + 3 * plane_stride, a_ptr + 3 * alpha_stride, n_ok, N, W, ENTRIES)
        index, sign = join4(index, index1, index2, index3), join4(sign, sign1, sign2, sign3)
        alpha = join4(alpha, alpha1, alpha2, alpha3)
    entry = tl.gather(table, tl.reshape(index, [index.numel]), 0).to(tl.float32)
    entry = (tl.reshape(entry, index.shape).to(tl.int32, bitcast=True) ^ sign).to(tl.float32, bitcast=True)
    total = tl.sum(entry, axis=1) * alpha
    if P > 1:
        total = tl.sum(total, axis=1)
    return total


@triton.jit
def _bcq_smem_kernel(x_ptr, t_ptr, p_ptr, a_ptr, o_ptr, perm_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, GROUPS,
                     tiles_per_split, splits, Q: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                     HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, ENTRIES: tl.constexpr, F32_TABLE: tl.constexpr,
                     NUM_STAGES: tl.constexpr):
    """Row m of y as _bcq_lut_kernel computes it, from tables of ENTRIES (128 signed, or 256): the step's tables
    t[m, k0 / 8 ...] loaded as one register tensor (F32_TABLE: converted to fp32) and gathered through shared
    memory, all planes in one gather (q = 3: planes 0-1, then 2)."""
    m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    x_row = x_ptr + m.to(tl.int64) * K
    words, alphas = p_ptr + rn, a_ptr + rn
    plane_stride, alpha_stride = (K // 32).to(tl.int64) * N, GROUPS * N
    W: tl.constexpr = BLOCK_K // 32
    first, t_end = k_range(K // BLOCK_K, tiles_per_split, split, SPLIT)
    for t in tl.range(first, t_end, num_stages=NUM_STAGES):
        k0 = t * BLOCK_K
        table = tl.load(t_ptr + (m.to(tl.int64) * (K // 8) + k0 // 8) * ENTRIES + tl.arange(0, BLOCK_K // 8 * ENTRIES))
        if F32_TABLE:
            table = table.to(tl.float32)
        g = k0 // GROUP
        w_ptr, a_step = words + (k0 // 32).to(tl.int64) * N, alphas + g * N
        if Q == 4 or Q == 1:
            acc += shared_gather(table, w_ptr, a_step, n_ok, N, plane_stride, alpha_stride, Q, W, ENTRIES)
        else:
            acc += shared_gather(table, w_ptr, a_step, n_ok, N, plane_stride, alpha_stride, 2, W, ENTRIES)
            if Q == 3:
                acc += shared_gather(table, w_ptr + 2 * plane_stride, a_step + 2 * alpha_stride, n_ok, N,
                                     plane_stride, alpha_stride, 1, W, ENTRIES)
        if HAS_OFFSET:
            acc += offset_term(x_row, perm_ptr, o_ptr, k0, g, rn, n_ok, N, BLOCK_K, HAS_PERM)
    store_output(y_ptr, acc[None, :], m + tl.arange(0, 1), rn, M, N, N, bias_ptr, ws_ptr, count_ptr,
                 m * tl.num_programs(1) + pid_n, split, splits, HAS_BIAS, SPLIT)


def check_inputs(x, planes, alphas, offset, perm=None, bias=None) -> None:
    """Raise ValueError naming the first input whose dtype or shape does not fit the layouts above."""
    if x.dim() != 2 or x.dtype not in DTYPES:
        raise ValueError(f"x must be [M, K] fp16 / bf16 / fp32; got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    if k % 32:
        raise ValueError(f"K={k} must be a multiple of 32 (one packed word of each plane)")
    if planes.dim() != 3 or alphas.dim() != 3:
        raise ValueError(f"planes must be [q, K / 32, N] and alphas [q, G, N]; got {tuple(planes.shape)}, "
                         f"{tuple(alphas.shape)}")
    q, n, groups = planes.shape[0], planes.shape[2], alphas.shape[1]
    bcq.check_bcq_bits(q)
    if groups < 1 or k % groups or (k // groups) % 32:
        raise ValueError(f"{groups} groups of K={k}: the group size must divide K and be a multiple of 32")
    expected = {"planes": (planes, (q, k // 32, n), (torch.int32,)), "alphas": (alphas, (q, groups, n), (x.dtype,)),
                "offset": (offset, (groups, n), (x.dtype,)), "perm": (perm, (k,), (torch.int32, torch.int64)),
                "bias": (bias, (n,), (x.dtype,))}
    check_tensors(expected, f"x {tuple(x.shape)}, {q} planes, {groups} groups")


INTERPRETER_CONFIGS = {"dot": {"path": "dot", "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 4},
                       "lut": {"path": "lut", "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 4, "num_stages": 1},
                       "smem": {"path": "smem", "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 4,
                                "num_stages": 1, "entries": 256, "f32_table": False}}
LUT_MAX_M = 8  # the table path builds a table per row of x


def configs(m: int, group: int) -> list[dict]:
    """Path "dot": BLOCK_N 64 / 128, BLOCK_K 32-128 dividing the group, split-K 1-16, 4 warps (the first is the default);
    for m <= LUT_MAX_M also paths "lut" and "smem": BLOCK_N 256 (8 warps) / 128 (4), BLOCK_K the
    largest of 128 / 64 / 32 dividing the group, split-K 16-64 (batch 1 needs many programs in flight), the words
    loaded 3 tiles ahead (tl.range stages) or not; "smem" with tables of 256 or 128 (signed) entries, shared in x's
    dtype or fp32. The interpreter runs the small "dot" config (tests launch the other INTERPRETER_CONFIGS
    themselves)."""
    if interpreter_on():
        return [INTERPRETER_CONFIGS["dot"]]
    small = m <= LUT_MAX_M
    dot = [{"path": "dot", "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s, "num_warps": 4}
           for s in ((8, 4) if small else (8, 16, 4, 1) if m <= 16 else (1, 2))
           for bn in (64, 128) for bk in (128, 64, 32) if group % bk == 0 and (bk >= 64 or not small or group == 32)]
    bk = 128 if group % 128 == 0 else 64 if group % 64 == 0 else 32
    lut = [{"path": "lut", "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s, "num_warps": w, "num_stages": stages}
           for s in (16, 32, 64) for bn, w in ((256, 8), (128, 4)) for stages in (3, 1)]
    shared = [dict(c, path="smem", entries=e, f32_table=f32) for c in lut for e in (256, 128) for f32 in (False, True)]
    return dot + (lut + shared if small else [])


def launch(config, x, planes, alphas, offset=None, perm=None, bias=None) -> torch.Tensor:
    m, k = x.shape
    q, _, n = planes.shape
    groups = alphas.shape[1]
    block_m = 16 if m <= 16 else 64
    lut = config["path"] != "dot"
    grid_mn = (m if lut else triton.cdiv(m, block_m), triton.cdiv(n, config["BLOCK_N"]))
    y = dequant_gemm.output_buffer(m, n, x.dtype, x.device)
    # K tiles a split: ceil(tiles / SPLIT_K) (split_k_grid in steps of one tile)
    per_split, splits, ws, counters = split_args(config, k // config["BLOCK_K"], 1, m, n, grid_mn[0] * grid_mn[1], y)
    grid = (*grid_mn, splits)
    x = x.contiguous()
    common = dict(Q=q, GROUP=k // groups, HAS_OFFSET=offset is not None, HAS_PERM=perm is not None,
                  HAS_BIAS=bias is not None, SPLIT=splits > 1, BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
                  num_warps=config["num_warps"])
    tensors = (planes.contiguous(), alphas.contiguous(), alphas if offset is None else offset.contiguous(),
               x if perm is None else perm.contiguous(), y if bias is None else bias.contiguous(), y, ws, counters)
    if lut:
        entries = config.get("entries", 128)
        table = torch.empty(m, k // 8, entries, dtype=x.dtype, device=x.device)
        _bcq_table_kernel[(m, triton.cdiv(k // 8, 1024 // entries))](
            x, tensors[3], table, k, HAS_PERM=perm is not None, ENTRIES=entries, BLOCK_C=1024 // entries,
            num_warps=4)  # 1024 entries a program
        if config["path"] == "lut":
            _bcq_lut_kernel[grid](x, table, *tensors, m, n, k, groups, per_split, splits,
                                  NUM_STAGES=config["num_stages"], **common)
        else:
            _bcq_smem_kernel[grid](x, table, *tensors, m, n, k, groups, per_split, splits, ENTRIES=entries,
                                   F32_TABLE=config["f32_table"], NUM_STAGES=config["num_stages"], **common)
    else:
        _bcq_matmul_kernel[grid](x, *tensors, m, n, k, groups, per_split, splits, BLOCK_M=block_m,
                                 **dot_args(x.dtype), **common)
    return y


def bcq_matmul(x, planes, alphas, offset=None, perm=None, bias=None) -> torch.Tensor:
    """y [M, N] = x[:, perm] @ W^T (+ bias) for a BCQ weight in the packed layout above (module docstring)."""
    check_inputs(x, planes, alphas, offset, perm, bias)
    check_device({"x": x, "planes": planes, "alphas": alphas, "offset": offset, "perm": perm, "bias": bias})
    m, k = x.shape
    group = k // alphas.shape[1]
    key = {"M": triton.next_power_of_2(m), "N": planes.shape[2], "K": k, "q": planes.shape[0], "group": group,
           "offset": int(offset is not None), "dtype": str(x.dtype).removeprefix("torch."), "perm": int(perm is not None)}
    config = tune("bcq_matmul", key, configs(m, group), lambda c: launch(c, x, planes, alphas, offset, perm, bias),
                  x.device)
    return launch(config, x, planes, alphas, offset, perm, bias)


__all__ = ["bcq_matmul", "bcq_matmul_ref", "unpack_planes"]

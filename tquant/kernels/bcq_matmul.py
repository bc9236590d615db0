"""Matmul with a BCQ weight (tquant.bcq: W = sum_i alpha_i B_i + offset, B_i in {-1, +1}): the Triton kernel and
the torch reference.

    y [M, N] = x[:, perm] @ W^T + bias,   W[n, k] = sum_{i < q} alphas[i, g, n] (2 u_i(k, n) - 1) + offset[g, n],  g = k // group
    planes  int32 [q, K / 32, N]   plane i's bits u_i packed along K (tquant.packing, 1 bit: bit k % 32 of word k // 32)
    alphas  [q, G, N], offset [G, N] or None, bias [N] or None, in x's dtype (fp16 / bf16 / fp32); perm int32 [K] or
    None; K a multiple of 32 and of group
Two paths, chosen per shape by the autotuner (configs: path "dot" always, "lut" for M <= LUT_MAX_M):
"dot" (in-register): program (m, n, split) owns a [BLOCK_M, BLOCK_N] tile of y and walks its share of K in BLOCK_K
steps (BLOCK_K divides the group, so a step has one alpha per plane and column): each plane's [BLOCK_K / 32, BLOCK_N]
words are loaded as one coalesced tile, their bits split out in registers (tiling.unpack_words), and W's tile is
summed as where(u, alpha_i, -alpha_i) over the planes (one select and one add a plane and weight), then
acc += tl.dot(x tile, W tile) in fp32.
"lut" (LUT-GEMM's tables, batch <= LUT_MAX_M): with L = LOOKUP (8 or 4) activations a lookup, _bcq_table_kernel
writes, for every row of x and every L activations, the 2^L partial sums t[c, j] = sum_b x[Lc + b] bit_b(j) (fp32
[M, K / L, 2^L], so that 2 S_i - X below does not cancel a rounded entry); _bcq_lut_kernel then reads plane i's
words as [BLOCK_N] rows, splits each into 32 / L fields (the signs of L weights) and gathers S_i = sum_c t[c, field]
through L1 / L2, one load per L weights and plane; y += sum_i alpha_i (2 S_i - X) (+ offset X), X the sum of the
step's activations, since sum_k x_k (2 u_k - 1) = 2 sum_k x_k u_k - X. L = 8 is LUT-GEMM's 256-entry table, L = 4 a
16-entry (64-byte) one. The table stays in global memory: Triton has no shared-memory gather, and tl.gather on a
register table compiles (Triton 3.6-3.9) to warp shuffles. sm_90 SASS of the loops, q = 3: "dot" 13 instructions a
weight (128 x 128 tiles), L = 8 2.8, L = 4 5.1 (256 x 128 tiles, 1-D loads; a 2-D tile of fields was 4.5, its
addresses converted to the gather's layout through shared memory).
Both gather x through perm (act order) in their loads and finish with dequant_gemm.store_output: split-K partials
summed by the last split to arrive, the bias added, y written in x's dtype, one launch.
`bcq_matmul_ref` decodes W with tquant.bcq.dequantize and multiplies in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import bcq
from ..packing import unpack_codes
from .autotune_cache import tune
from . import dequant_gemm
from .dequant_gemm import store_output
from .runtime import check_device, check_tensors, dot_types, interpreter_on
from .tiling import unpack_words

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unpack_planes(planes: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 bits [q, N, K] of packed planes int32 [q, K / 32, N]."""
    return torch.stack([unpack_codes(p, 1, k).t() for p in planes]).to(torch.uint8)


def bcq_matmul_ref(x, planes, alphas, offset=None, perm=None, bias=None) -> torch.Tensor:
    """x[:, perm] @ W^T (+ bias) in fp32 through tquant.bcq.dequantize, in x's dtype."""
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
    first = split * tiles_per_split
    for t in range(first, tl.minimum(first + tiles_per_split, K // BLOCK_K)):
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
def _bcq_table_kernel(x_ptr, perm_ptr, t_ptr, K, LOOKUP: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK_C: tl.constexpr):
    """The tables of row m of x (x[:, perm]): t[m, c, j] = sum_{b < L} x[m, Lc + b] bit_b(j), j < 2^L, L = LOOKUP 4 or 8,
    in fp32; for L = 8 each entry is the sum of a 16-entry table of x[8c + 4 ..] (bits 4-7 of j) and one of
    x[8c ..] (bits 0-3)."""
    m, rc = tl.program_id(0), tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < K // LOOKUP
    col = rc[:, None] * LOOKUP + tl.arange(0, LOOKUP)[None, :]
    if HAS_PERM:
        col = tl.load(perm_ptr + col, mask=c_ok[:, None], other=0)
    xl = tl.load(x_ptr + m.to(tl.int64) * K + col, mask=c_ok[:, None], other=0.0).to(tl.float32)[:, :, None]
    b = tl.arange(0, LOOKUP)[:, None]
    j = tl.arange(0, 16)[None, :]
    table = tl.sum(xl * tl.where(b < 4, (j >> b) & 1, 0).to(tl.float32)[None], axis=1)  # [BLOCK_C, 16]: bits 0-3
    if LOOKUP == 8:
        hi = tl.sum(xl * tl.where(b >= 4, (j >> (b - 4)) & 1, 0).to(tl.float32)[None], axis=1)
        table = tl.reshape(hi[:, :, None] + table[:, None, :], (BLOCK_C, 256))  # entry 16 hi + lo
    tl.store(t_ptr + (m.to(tl.int64) * (K // LOOKUP) + rc)[:, None] * (1 << LOOKUP) + tl.arange(0, 1 << LOOKUP)[None, :],
             table, mask=c_ok[:, None])


@triton.jit
def _bcq_lut_kernel(x_ptr, t_ptr, p_ptr, a_ptr, o_ptr, perm_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, GROUPS,
                    tiles_per_split, splits, Q: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, LOOKUP: tl.constexpr):
    """Row m of y from the tables: a tile adds sum_i alpha_i (2 S_i - X) (+ offset X), X the sum of the tile's x and
    S_i[n] = sum_c t[m, c, field c of plane i's words at n] (L-bit fields, one gather per L weights and plane)."""
    m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    ENTRIES: tl.constexpr = 1 << LOOKUP
    FIELDS: tl.constexpr = 32 // LOOKUP  # fields of a word
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    x_row = x_ptr + m.to(tl.int64) * K
    first = split * tiles_per_split
    for t in range(first, tl.minimum(first + tiles_per_split, K // BLOCK_K)):
        k0 = t * BLOCK_K
        total = tl.sum(tl.load(x_row + input_columns(perm_ptr, k0, BLOCK_K, HAS_PERM)).to(tl.float32), axis=0)
        table = t_ptr + (m.to(tl.int64) * (K // LOOKUP) + k0 // LOOKUP) * ENTRIES  # the tile's first chunk
        g = k0 // GROUP
        for i in tl.static_range(Q):
            # 1-D loads and gathers of [BLOCK_N] in one layout (a 2-D tile of fields would be converted to the
            # gather's layout through shared memory, one 64-bit address an element)
            partial = tl.zeros([BLOCK_N], dtype=tl.float32)
            for w in tl.static_range(BLOCK_K // 32):
                word = tl.load(p_ptr + (i * (K // 32) + k0 // 32 + w).to(tl.int64) * N + rn, mask=n_ok, other=0)
                for f in tl.static_range(FIELDS):
                    partial += tl.load(table + (w * FIELDS + f) * ENTRIES + ((word >> (f * LOOKUP)) & (ENTRIES - 1)))
            alpha = tl.load(a_ptr + (i * GROUPS + g) * N + rn, mask=n_ok, other=0.0).to(tl.float32)
            acc += alpha * (2.0 * partial - total)
        if HAS_OFFSET:
            acc += tl.load(o_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32) * total
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


INTERPRETER_CONFIGS = {"dot": {"path": "dot", "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 4}} | {
    f"lut{lookup}": {"path": "lut", "LOOKUP": lookup, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 4}
    for lookup in (8, 4)}
LUT_MAX_M = 8  # the table path builds a table per row of x


def configs(m: int, group: int) -> list[dict]:
    """Path "dot": BLOCK_N 64 / 128, BLOCK_K 32-128 dividing the group, split-K 1-16, 4 warps (the first is the default);
    for m <= LUT_MAX_M also path "lut" with lookups of 8 / 4 activations: BLOCK_N 128 (4 warps) / 256 (4, 8),
    BLOCK_K 64 / 128 (32 for groups of 32), split-K 8 / 16. The interpreter runs the small "dot" config (tests launch
    the other INTERPRETER_CONFIGS themselves)."""
    if interpreter_on():
        return [INTERPRETER_CONFIGS["dot"]]
    small = m <= LUT_MAX_M
    dot = [{"path": "dot", "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s, "num_warps": 4}
           for s in ((8, 4) if small else (8, 16, 4, 1) if m <= 16 else (1, 2))
           for bn in (64, 128) for bk in (128, 64, 32) if group % bk == 0 and (bk >= 64 or not small or group == 32)]
    lut = [{"path": "lut", "LOOKUP": lookup, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s, "num_warps": w}
           for lookup in (8, 4) for s in (8, 16) for bn, w in ((128, 4), (256, 4), (256, 8))
           for bk in ((128, 64) if group % 64 == 0 else (32,)) if group % bk == 0]
    return dot + (lut if small else [])


def launch(config, x, planes, alphas, offset=None, perm=None, bias=None) -> torch.Tensor:
    m, k = x.shape
    q, _, n = planes.shape
    groups = alphas.shape[1]
    block_m = 16 if m <= 16 else 64
    tiles = k // config["BLOCK_K"]
    per_split = triton.cdiv(tiles, config["SPLIT_K"])
    splits = triton.cdiv(tiles, per_split)
    lut = config["path"] == "lut"
    grid = (m if lut else triton.cdiv(m, block_m), triton.cdiv(n, config["BLOCK_N"]), splits)
    y = dequant_gemm.output_buffer(m, n, x.dtype, x.device)
    ws, counters = dequant_gemm.split_k_buffers(splits, m, n, grid[0] * grid[1], x.device) if splits > 1 else (y, y)
    x = x.contiguous()
    common = dict(Q=q, GROUP=k // groups, HAS_OFFSET=offset is not None, HAS_PERM=perm is not None,
                  HAS_BIAS=bias is not None, SPLIT=splits > 1, BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
                  num_warps=config["num_warps"])
    tensors = (planes.contiguous(), alphas.contiguous(), alphas if offset is None else offset.contiguous(),
               x if perm is None else perm.contiguous(), y if bias is None else bias.contiguous(), y, ws, counters)
    if lut:
        lookup = config["LOOKUP"]
        table = torch.empty(m, k // lookup, 1 << lookup, dtype=torch.float32, device=x.device)
        _bcq_table_kernel[(m, triton.cdiv(k // lookup, 32))](x, tensors[3], table, k, LOOKUP=lookup,
                                                             HAS_PERM=perm is not None, BLOCK_C=32, num_warps=4)
        _bcq_lut_kernel[grid](x, table, *tensors, m, n, k, groups, per_split, splits, LOOKUP=lookup, **common)
    else:
        dot_dtype, precision = dot_types(x.dtype)
        _bcq_matmul_kernel[grid](x, *tensors, m, n, k, groups, per_split, splits, BLOCK_M=block_m,
                                 DOT_DTYPE=dot_dtype, PRECISION=precision, **common)
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

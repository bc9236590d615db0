"""Grouped weight-only MoE matmul: every (token, slot) pair of a step through its expert's quantized weight, one launch.

    y[t, s] = x_ts @ W[expert_ids[t, s]],   x_ts = x[t, perm_e] (x [T, K], one row a token: gate_up)
                                                   or x[t, s, perm_e] (x [T, k, K], one row a pair: down)
    W[e][j, n] = (code_e(j, n) - zeros[e, j // group_size, n]) * scales[e, j // group_size, n]
    x          [T, K] or [T, k, K]  fp16 / bf16 / fp32      expert_ids int32 / int64 [T, k] (top-k routing)
    qweight    int32 [E, ceil(K / epw), N], epw = 32 // bits (expert e's slice: tquant.formats.packing's layout)
    scales     [E, K // group_size, N] in x's dtype          zeros [E, K // group_size, N] in x's dtype
    perm       int32 / int64 [E, K] or None (act order: storage row j of expert e reads input channel perm[e, j])
    y          [T, k, N] in x's dtype, accumulated in fp32;  y[t, s] = 0 where expert_ids[t, s] is not in [0, E)
               (transformers marks a dropped slot with E)
This is tquant.modules.PackedExperts' storage: W_gu[e] = its gate_up projection, W_down[e] its down projection.
group_size <= 0 means per-channel (group_size = K).

Launcher ("moe_align", torch ops on the device, no host sync, so a decode step can be graph-captured): the P = T * k
pairs are sorted by expert (stable argsort: token order within an expert), each expert's run of pairs is cut in blocks
of BLOCK_M rows, and every block gets (expert, first row, end row) in the sorted order. The number of blocks is at most
B = ceil(P / BLOCK_M) + min(E, P) - 1 (each expert hit leaves at most one partial block), so the grid is
(B * ceil(N / BLOCK_N), SPLIT_K) whatever the routing; blocks past the last used one have expert E and skip their K
loop (no weight loads, nothing stored).
Kernel: program (block, n tile, split) loads its block's pair ids, gathers their x rows (pair // k for x [T, K], the
pair for [T, k, K]; perm of its expert gathered in the loads), walks its share of K in tiles of BLOCK_KW words of its
expert's qweight, dequantizes each tile in registers with dequant_gemm's helpers (codes_tree / code_minus_zero,
load_group_params, and on CUDA the packed half2 dequant_pair_asm where dequant_gemm uses it) and accumulates
tl.dot(x rows, w) in fp32 (y^T = w^T x^T for BLOCK_M <= 16, as dequant_gemm). dequant_gemm.store_output writes the
rows of y at the pair ids (masked rows point past P) and, with SPLIT_K > 1, sums the splits in the same launch.
A decode step of T tokens thus reads each hit expert's weights once per N tile, for all the tokens routed to it.

`grouped_weight_only_matmul_ref`: a plain loop over the hit experts with weight_only_matmul_ref (fp32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.packing import values_per_word
from ..formats.quantizer import check_bits, resolve_group_size
from . import dequant_gemm
from .autotune_cache import tune
from .dequant_gemm import ASM_MAGIC, MAGIC_BITS, dequant_tile, group_mode, k_range, split_args, store_output, use_asm
from .runtime import DTYPES, check_device, check_tensors, dot_args, interpreter_on, next_power_of_2
from .weight_only_matmul import weight_only_matmul_ref


def check_inputs(x, qweight, scales, zeros, expert_ids, bits, group_size, in_features, perm) -> int:
    """Raise ValueError naming the first inconsistent tensor; return the concrete group size."""
    check_bits(bits)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [T, K] (a row a token) or [T, k, K] (a row a token's slot); got shape "
                         f"{tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not supported; use one of {DTYPES}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has K={x.shape[-1]} columns but in_features={in_features}")
    if expert_ids.dim() != 2 or expert_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_ids must be int32 / int64 [T, k]; got {expert_ids.dtype} {tuple(expert_ids.shape)}")
    if expert_ids.shape[0] != x.shape[0] or (x.dim() == 3 and x.shape[1] != expert_ids.shape[1]):
        raise ValueError(f"expert_ids shape {tuple(expert_ids.shape)} does not match x shape {tuple(x.shape)}")
    if qweight.dim() != 3:
        raise ValueError(f"qweight must be int32 [E, ceil(K / epw), N]; got shape {tuple(qweight.shape)}")
    group_size = resolve_group_size(group_size, in_features)
    e, n = qweight.shape[0], qweight.shape[2]
    groups = in_features // group_size
    check_tensors({"qweight": (qweight, (e, -(-in_features // values_per_word(bits)), n), (torch.int32,)),
                   "scales": (scales, (e, groups, n), (x.dtype,)), "zeros": (zeros, (e, groups, n), (x.dtype,)),
                   "perm": (perm, (e, in_features), (torch.int32, torch.int64))},
                  f"x of {x.dtype}, E={e} experts, K={in_features}, bits={bits}, group_size={group_size}")
    return group_size


def grouped_weight_only_matmul_ref(x, qweight, scales, zeros, expert_ids, *, bits, group_size, in_features,
                                   perm=None):
    """y [T, k, N] (module docstring) by a loop over the hit experts, each through weight_only_matmul_ref."""
    group_size = check_inputs(x, qweight, scales, zeros, expert_ids, bits, group_size, in_features, perm)
    t, k = expert_ids.shape
    xs = x if x.dim() == 3 else x[:, None].expand(t, k, in_features)
    y = x.new_zeros(t, k, qweight.shape[2])
    for e in torch.unique(expert_ids).tolist():
        if not 0 <= e < qweight.shape[0]:
            continue  # a dropped slot
        token, slot = torch.where(expert_ids == e)
        y[token, slot] = weight_only_matmul_ref(xs[token, slot], qweight[e], scales[e], zeros[e], bits=bits,
                                                group_size=group_size, in_features=in_features,
                                                perm=None if perm is None else perm[e])
    return y


def max_blocks(pairs: int, experts: int, block_m: int) -> int:
    """The most blocks of block_m rows that `pairs` pairs over `experts` experts can need (module docstring)."""
    return triton.cdiv(pairs, block_m) + min(experts, pairs) - 1


def moe_align(expert_ids: torch.Tensor, experts: int, block_m: int):
    """The launch's routing tables, torch ops on expert_ids' device (no host sync):
    pairs [P] int32: pair ids t * k + s sorted by expert (stable), dropped pairs (id not in [0, E)) last;
    block_expert, block_start, block_end [max_blocks] int32: block b covers sorted rows [start, end) of expert
    block_expert[b] (at most block_m of them); blocks past the last used one have expert E and no rows."""
    flat = expert_ids.reshape(-1).long()
    flat = torch.where((flat >= 0) & (flat < experts), flat, experts)
    pairs = torch.argsort(flat, stable=True)
    counts = torch.zeros(experts + 1, dtype=torch.int64, device=flat.device)
    counts = counts.scatter_add_(0, flat, torch.ones_like(flat))[:experts]
    starts = torch.cumsum(counts, 0) - counts
    blocks = (counts + block_m - 1) // block_m
    ends = torch.cumsum(blocks, 0)  # block ids of expert e: [ends[e] - blocks[e], ends[e])
    b = torch.arange(max_blocks(flat.numel(), experts, block_m), device=flat.device)
    expert = torch.searchsorted(ends, b, right=True)
    e = expert.clamp(max=experts - 1)
    start = starts[e] + (b - (ends - blocks)[e]) * block_m
    end = torch.where(expert < experts, torch.minimum(start + block_m, starts[e] + counts[e]), start)
    return pairs.int(), expert.int(), start.int(), end.int()


@triton.jit
def _grouped_gemm_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, perm_ptr, y_ptr, ws_ptr, count_ptr, pairs_ptr, bexp_ptr, bstart_ptr, bend_ptr,
    P, N, K, KW, E, group_size, x_div, stride_xm, stride_qe, stride_qk, stride_se, stride_sg, stride_ym, n_tiles,
    kw_per_split, splits, magic, BITS: tl.constexpr, EPW: tl.constexpr, EPW_P2: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, GROUPS: tl.constexpr, HAS_PERM: tl.constexpr, SPLIT: tl.constexpr,
    ASM: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, MASK_K: tl.constexpr,
):
    BLOCK_K: tl.constexpr = BLOCK_KW * EPW_P2
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    block, pid_n = pid // n_tiles, pid % n_tiles
    expert = tl.load(bexp_ptr + block)
    live = expert < E
    e = tl.minimum(expert, E - 1).to(tl.int64)
    row = tl.load(bstart_ptr + block) + tl.arange(0, BLOCK_M)
    m_ok = row < tl.load(bend_ptr + block)  # unused blocks: end = start
    pair = tl.load(pairs_ptr + row, mask=m_ok, other=0)
    offs_m = tl.where(m_ok, pair, P)  # y rows; P is past y, so store_output masks the block's empty rows
    x_row = pair // x_div
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    q_e, s_e, z_e = q_ptr + e * stride_qe, s_ptr + e * stride_se, z_ptr + e * stride_se
    rows = tl.arange(0, BLOCK_KW)
    slot = tl.arange(0, BLOCK_K)  # slot = word * EPW_P2 + j holds code j of that word
    kw_start, kw_end = k_range(KW, kw_per_split, pid_k, SPLIT)
    kw_end = tl.where(live, kw_end, kw_start)  # unused blocks load nothing
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for kw0 in range(kw_start, kw_end, BLOCK_KW):
        w, k, k_ok = dequant_tile(q_e, s_e, z_e, kw0, rows, slot, offs_n, n_ok, N, K, KW, group_size, stride_qk,
                                  stride_sg, magic, BITS, EPW, EPW_P2, BLOCK_N, BLOCK_K, GROUPS, ASM, DOT_DTYPE, 0, 1,
                                  MASK_K)
        col = k
        if HAS_PERM:
            col = tl.load(perm_ptr + e * K + k, mask=k_ok, other=0)
        xa = tl.load(x_ptr + x_row[:, None] * stride_xm + col[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if BLOCK_M <= 16:  # y^T = w^T x^T, as dequant_gemm
            acc_t = tl.dot(w.to(DOT_DTYPE), tl.trans(xa.to(DOT_DTYPE)), acc_t, input_precision=PRECISION)
        else:
            acc = tl.dot(xa.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    if BLOCK_M <= 16:
        acc = tl.trans(acc_t)
    store_output(y_ptr, acc, offs_m, offs_n, P, N, stride_ym, y_ptr, ws_ptr, count_ptr, pid, pid_k, splits, False,
                 SPLIT)


def launch(config, x, qweight, scales, zeros, expert_ids, perm, *, bits: int, group_size: int) -> torch.Tensor:
    """One grouped launch (inputs checked; x [P or T, K] with unit column stride, the weight tensors contiguous):
    y [P, N], rows of dropped pairs unwritten."""
    experts, kw_total, n = qweight.shape
    k = x.shape[1]
    p = expert_ids.numel()
    epw = 32 // bits
    epw_p2 = triton.next_power_of_2(epw)
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    block_kw = config["BLOCK_K"] // epw_p2
    pairs, bexp, bstart, bend = moe_align(expert_ids, experts, block_m)
    groups = group_mode(block_kw, epw, group_size, k)
    asm = use_asm(x.dtype, bits) and groups < 2 and block_m <= 16
    y = dequant_gemm.output_buffer(p, n, x.dtype, x.device)  # via the module: tests poison it (and the workspace)
    n_tiles = triton.cdiv(n, block_n)
    tiles = bexp.numel() * n_tiles
    per_split, splits, ws, counters = split_args(config, kw_total, block_kw, p, n, tiles, y)
    _grouped_gemm_kernel[(tiles, splits)](
        x, qweight, scales, zeros, perm if perm is not None else qweight, y, ws, counters, pairs, bexp, bstart, bend,
        p, n, k, kw_total, experts, group_size, p // x.shape[0],  # x rows: a token's (pair // k) or a pair's
        x.stride(0), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), y.stride(0), n_tiles,
        per_split, splits, ASM_MAGIC[x.dtype] if asm else MAGIC_BITS, BITS=bits, EPW=epw, EPW_P2=epw_p2,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KW=block_kw, GROUPS=groups, HAS_PERM=perm is not None,
        SPLIT=splits > 1, ASM=asm, MASK_K=k % (block_kw * epw) != 0, **dot_args(x.dtype), num_warps=config["num_warps"],
        num_stages=config["num_stages"] if groups < 2 else 1,
    )
    return y


def candidates(rows: int, n: int, kw: int) -> list[dict]:
    """Launch configs for about `rows` pairs an expert (a power of two), N = n, kw words along K, the default
    first: dequant_gemm's tiles for that batch (BLOCK_M 16 at decode)."""
    if interpreter_on():
        return [dequant_gemm.INTERPRETER_CONFIGS[rows > 16]]
    return dequant_gemm.configs(max(rows, 2), n, kw)


def grouped_weight_only_matmul(x, qweight, scales, zeros, expert_ids, *, bits, group_size, in_features, perm=None,
                               config=None):
    """y [T, k, N] (module docstring) in one Triton launch (after the small moe_align ops). config: a launch config
    (candidates' form) instead of the tuned one."""
    group_size = check_inputs(x, qweight, scales, zeros, expert_ids, bits, group_size, in_features, perm)
    check_device(dict(x=x, qweight=qweight, scales=scales, zeros=zeros, expert_ids=expert_ids, perm=perm))
    t, k = expert_ids.shape
    experts, n = qweight.shape[0], qweight.shape[2]
    p = t * k
    if p == 0:
        return x.new_zeros(t, k, n)
    xs = x.reshape(p if x.dim() == 3 else t, in_features).contiguous()
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    perm = perm.contiguous() if perm is not None else None
    kw = dict(bits=bits, group_size=group_size)
    if config is None:
        rows = next_power_of_2(triton.cdiv(p, min(experts, p)))
        key = dict(P=next_power_of_2(p), E=experts, rows=rows, N=n, K=in_features, bits=bits, group=group_size,
                   dtype=str(x.dtype).removeprefix("torch."), perm=int(perm is not None))
        configs = candidates(rows, n, qweight.shape[1])
        config = tune("grouped_weight_only_matmul", key, configs,
                      lambda c: launch(c, xs, qweight, scales, zeros, expert_ids, perm, **kw), x.device)
    y = launch(config, xs, qweight, scales, zeros, expert_ids, perm, **kw).view(t, k, n)
    dropped = (expert_ids < 0) | (expert_ids >= experts)
    return y.masked_fill_(dropped[..., None], 0)

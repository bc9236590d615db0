"""Matmul with a BCQ weight (tquant.bcq: W = sum_i alpha_i B_i + offset, B_i in {-1, +1}): the Triton kernel and
the torch reference.

    y [M, N] = x [M, K] @ W^T,   W[n, k] = sum_{i < q} alphas[i, g, n] (2 u_i(k, n) - 1) + offset[g, n],  g = k // group
    planes  int32 [q, K / 32, N]   plane i's bits u_i packed along K (tquant.packing, 1 bit: bit k % 32 of word k // 32)
    alphas  [q, G, N], offset [G, N] or None, in x's dtype (fp16 / bf16 / fp32); K a multiple of 32 and of group
Kernel (the in-register formulation): program (m, n, split) owns a [BLOCK_M, BLOCK_N] tile of y and walks its
share of K in BLOCK_K steps (BLOCK_K divides the group, so a step has one alpha per plane and column): each plane's
[BLOCK_K / 32, BLOCK_N] words are loaded as one coalesced tile, their bits split out in registers
(tiling.unpack_words), and W's tile is summed as where(u, alpha_i, -alpha_i) over the planes (one select and one add
a plane and weight), then acc += tl.dot(x tile, W tile) in fp32. Splits write fp32 partials [SPLIT_K, M, N] that
the launcher sums. LUT-GEMM's table formulation (256 partial sums of every 8 activations, indexed by the weight
bytes) needs a per-program table in shared memory, which Triton does not address directly; a table in global
memory costs a gather per weight byte and plane instead.
`bcq_matmul_ref` decodes W with tquant.bcq.dequantize and multiplies in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import bcq
from ..packing import unpack_codes
from .autotune_cache import tune
from .runtime import check_device, check_tensors, dot_types, interpreter_on
from .tiling import unpack_words

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unpack_planes(planes: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 bits [q, N, K] of packed planes int32 [q, K / 32, N]."""
    return torch.stack([unpack_codes(p, 1, k).t() for p in planes]).to(torch.uint8)


def bcq_matmul_ref(x, planes, alphas, offset=None) -> torch.Tensor:
    """x @ W^T in fp32 through tquant.bcq.dequantize, in x's dtype."""
    w = bcq.dequantize(alphas.float().permute(2, 1, 0), unpack_planes(planes, x.shape[-1]),
                       None if offset is None else offset.float().t())
    return (x.float() @ w.t()).to(x.dtype)


@triton.jit
def _bcq_matmul_kernel(x_ptr, p_ptr, a_ptr, o_ptr, y_ptr, M, N, K, GROUPS, tiles_per_split,
                       Q: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       PRECISION: tl.constexpr):
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    kw = K // 32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first = split * tiles_per_split
    for t in range(first, tl.minimum(first + tiles_per_split, K // BLOCK_K)):
        k0 = t * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], mask=m_ok[:, None], other=0.0)
        g = k0 // GROUP
        rw = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        w = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(Q):
            words = tl.load(p_ptr + (i * kw + rw)[:, None].to(tl.int64) * N + rn[None, :], mask=n_ok[None, :],
                            other=0)
            u = tl.trans(unpack_words(tl.trans(words), 1))
            alpha = tl.load(a_ptr + (i * GROUPS + g) * N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            w += tl.where(u != 0, alpha, -alpha)
        if HAS_OFFSET:
            w += tl.load(o_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=PRECISION)
    tl.store(y_ptr + (split * M + rm)[:, None].to(tl.int64) * N + rn[None, :], acc,
             mask=m_ok[:, None] & n_ok[None, :])


def check_inputs(x, planes, alphas, offset) -> None:
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
    expected = {"planes": (planes, (q, k // 32, n), (torch.int32,)), "alphas": (alphas, (q, groups, n), (x.dtype,))}
    if offset is not None:
        expected["offset"] = (offset, (groups, n), (x.dtype,))
    check_tensors(expected, f"x {tuple(x.shape)}, {q} planes, {groups} groups")


INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 4}


def configs(m: int, group: int) -> list[dict]:
    """BLOCK_N 64 / 128, BLOCK_K 32-128 dividing the group, split-K 1-16, 4 warps; the first is the default."""
    if interpreter_on():
        return [INTERPRETER_CONFIG]
    return [{"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s, "num_warps": 4}
            for s in ((8, 16, 4, 1) if m <= 16 else (1, 2))
            for bn in (64, 128) for bk in (128, 64, 32) if group % bk == 0]


def launch(config, x, planes, alphas, offset) -> torch.Tensor:
    m, k = x.shape
    q, _, n = planes.shape
    groups = alphas.shape[1]
    block_m = 16 if m <= 16 else 64
    tiles = k // config["BLOCK_K"]
    per_split = triton.cdiv(tiles, config["SPLIT_K"])
    splits = triton.cdiv(tiles, per_split)
    partial = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    dot_dtype, precision = dot_types(x.dtype)
    _bcq_matmul_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, config["BLOCK_N"]), splits)](
        x.contiguous(), planes.contiguous(), alphas.contiguous(), alphas if offset is None else offset.contiguous(),
        partial, m, n, k, groups, per_split, Q=q, GROUP=k // groups, HAS_OFFSET=offset is not None, BLOCK_M=block_m,
        BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], DOT_DTYPE=dot_dtype,
        PRECISION=precision, num_warps=config["num_warps"])
    return (partial[0] if splits == 1 else partial.sum(0)).to(x.dtype)


def bcq_matmul(x, planes, alphas, offset=None) -> torch.Tensor:
    """y [M, N] = x @ W^T for a BCQ weight in the packed layout above (module docstring)."""
    check_inputs(x, planes, alphas, offset)
    check_device({"x": x, "planes": planes, "alphas": alphas, "offset": offset})
    m, k = x.shape
    group = k // alphas.shape[1]
    key = {"M": triton.next_power_of_2(m), "N": planes.shape[2], "K": k, "q": planes.shape[0], "group": group,
           "offset": int(offset is not None), "dtype": str(x.dtype).removeprefix("torch.")}
    config = tune("bcq_matmul", key, configs(m, group), lambda c: launch(c, x, planes, alphas, offset), x.device)
    return launch(config, x, planes, alphas, offset)


__all__ = ["bcq_matmul", "bcq_matmul_ref", "unpack_planes"]

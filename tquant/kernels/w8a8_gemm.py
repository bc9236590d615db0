"""W8A8 GEMM: int8 activations x int8 weights with int32 accumulation and a dequantizing epilogue.

    y[m, n] = float32(acc[m, n]) * x_scale[m] * w_scale[n] (+ bias[n]),   acc[m, n] = sum_k xq[m, k] * wq[n, k]
    xq      int8 [M, K]   (per-token codes, e.g. from act_quant.quantize_activations(bits=8))
    x_scale fp32 [M]
    wq      int8 [N, K]   (nn.Linear layout: K contiguous in each output row, which is the K-major B operand
                           that int8 tensor-core MMAs (mma.sync row.col, wgmma) read directly)
    w_scale fp32 [N]      bias fp16 / bf16 / fp32 [N] or None, added in fp32
    y       [M, N] in out_dtype (fp16 / bf16 / fp32)
acc is exact in int32 (|acc| <= 128^2 K: any K <= 131 072); its conversion to fp32 rounds once past 2^24.

`w8a8_matmul`: program (pid, split) owns a [BLOCK_M, BLOCK_N] tile of y (GROUP_M-grouped order) and walks its
share of K in BLOCK_K steps of int8 tl.dot into an int32 accumulator; the epilogue scales, adds bias and casts.
Split-K (SPLIT_K > 1, small-M candidates: 32-64 tiles of y leave most of a 132-SM GPU idle at long K): grid axis 1
splits K into S = ceil(K / P) ranges of P = ceil(ceil(K / SPLIT_K) / BLOCK_K) * BLOCK_K (split_k_grid), split s
owning k in [s P, min((s + 1) P, K)) (dequant_gemm.split_args, k_range), and
    acc[m, n] = sum_{s = 0}^{S-1} acc_s[m, n],   acc_s = split s's int32 accumulator
summed in int32 in the same launch (dequant_gemm.split_k_sum: each split stores acc_s in an int32 workspace
[S, M, N], the last to arrive adds them up), then the same epilogue once: integer addition is exact and
associative, so y is bit for bit the unsplit kernel's. The launch config is tuned per GPU and key (M rounded up to a
power of two, N, K, out dtype, bias) by autotune_cache; the interpreter runs one fixed small config
(INTERPRETER_SPLIT_CONFIG, its split-K twin, is forced by the tests). `w8a8_matmul_ref` is plain torch (the int
products summed exactly in fp64).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune_cache import tune
from .dequant_gemm import k_range, split_args, split_k_sum
from .runtime import DTYPES, check_device, check_tensors, interpreter_on, next_power_of_2
from .tiling import store_output, tile_offsets



def check_inputs(xq, x_scale, wq, w_scale, bias, out_dtype) -> None:
    """Raise ValueError naming the first tensor whose dtype or shape is wrong."""
    if out_dtype not in DTYPES:
        raise ValueError(f"out_dtype {out_dtype} is not supported; use one of {DTYPES}")
    for name, t in (("xq", xq), ("wq", wq)):
        if t.dim() != 2 or t.dtype != torch.int8:
            raise ValueError(f"{name} must be a 2-D int8 tensor; got {t.dtype} of shape {tuple(t.shape)}")
    check_operand_shapes(xq, x_scale, wq, w_scale, bias)


def check_operand_shapes(x, x_scale, wq, w_scale, bias, x_name: str = "xq") -> None:
    """Raise ValueError naming the first of wq [N, K] (K as x's [M, K], x named x_name), x_scale [M] and w_scale [N]
    float32, bias [N] in DTYPES (None: absent) whose shape or dtype is wrong: the scaled GEMMs' common checks."""
    if wq.shape[1] != x.shape[1]:
        raise ValueError(f"wq shape {tuple(wq.shape)} does not match: expected [N, K] with K={x.shape[1]} "
                         f"({x_name} is {tuple(x.shape)})")
    m, n = x.shape[0], wq.shape[0]
    expected = {
        "x_scale": (x_scale, (m,), (torch.float32,)),
        "w_scale": (w_scale, (n,), (torch.float32,)),
        "bias": (bias, (n,), DTYPES),
    }
    check_tensors(expected, f"M={m}, N={n}")


def w8a8_matmul_ref(xq, x_scale, wq, w_scale, *, bias=None, out_dtype=torch.float16):
    check_inputs(xq, x_scale, wq, w_scale, bias, out_dtype)
    acc = (xq.double() @ wq.double().T).float()
    y = acc * x_scale[:, None] * w_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@triton.jit
def store_dequantized(acc, xs_ptr, ws_ptr, bias_ptr, y_ptr, offs_m, offs_n, m_ok, n_ok, stride_ym,
                      HAS_BIAS: tl.constexpr):
    """y[m, n] = float32(acc[m, n]) * x_scale[m] * w_scale[n] (+ bias[n]), stored in y's dtype."""
    xs = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
    store_output(acc.to(tl.float32) * xs[:, None] * ws[None, :], bias_ptr, y_ptr, offs_m, offs_n, m_ok, n_ok,
                 stride_ym, HAS_BIAS)


@triton.jit
def _w8a8_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_wn,
                 stride_ym, k_per_split, splits, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    offs_m, offs_n, m_ok, n_ok = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    x_tile = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_tile = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] of wq^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    k_start, k_end = k_range(K, k_per_split, tl.program_id(1), SPLIT)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(x_tile + k0, mask=m_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(w_tile + k0, mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # triton 3.6 does not infer int32
    last = True
    if SPLIT:  # int32 partials summed exactly, then one epilogue
        acc, last = split_k_sum(acc, offs_m, offs_n, M, N, part_ptr, count_ptr, pid, tl.program_id(1), splits)
    if last:
        store_dequantized(acc, xs_ptr, ws_ptr, bias_ptr, y_ptr, offs_m, offs_n, m_ok, n_ok, stride_ym, HAS_BIAS)


INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
INTERPRETER_SPLIT_CONFIG = dict(INTERPRETER_CONFIG, SPLIT_K=2)  # the split-K path under the interpreter (tests)


SMALL_M_TILES = [(16, 64, 128, 4), (16, 128, 128, 4), (32, 64, 256, 4)]  # (BLOCK_M, BLOCK_N, BLOCK_K, warps)
LARGE_M_TILES = [(128, 128, 64, 8), (64, 128, 128, 4), (128, 256, 128, 8), (128, 64, 128, 4), (256, 128, 64, 8),
                 (128, 128, 128, 8)]
# Split-K candidates for M <= SPLIT_MAX_M, (BLOCK_N, BLOCK_K, SPLIT_K, num_stages, num_warps) at
# BLOCK_M = min(max(M, 16), 64) (one row of tiles): at Llama-3-8B's N the programs cdiv(N, BLOCK_N) * SPLIT_K come to
# 0.5-4 waves of 132 SMs after pruning (split_configs): N 4096 64-512 (8 candidates), 6144 96-384 (6), 14336 224-448
# (4), 28672 448 (2)
SPLIT_TILES = [(64, 256, 2, 4, 4), (64, 256, 4, 4, 4), (64, 256, 8, 4, 4), (128, 256, 2, 3, 4), (128, 256, 4, 3, 4),
               (128, 256, 8, 3, 4), (32, 256, 4, 4, 4), (256, 128, 4, 3, 8)]
SPLIT_MAX_M = 64
SPLIT_MAX_PROGRAMS = 4 * 132  # 4 waves of an H100 / H200


def split_configs(m: int, split_tiles, n: int | None = None, k: int | None = None) -> list[dict]:
    """The split-K candidates (split_tiles: (BLOCK_N, BLOCK_K, SPLIT_K, num_stages, num_warps)) for batch
    m <= SPLIT_MAX_M; given N = n and K = k (elements), those that would leave a split fewer than 2 K steps or make
    more than SPLIT_MAX_PROGRAMS programs are left out (without them, all: the superset every key's list is drawn
    from)."""
    if m > SPLIT_MAX_M:
        return []
    out = []
    for bn, bk, sk, stages, warps in split_tiles:
        if k is not None and k < 2 * sk * bk or n is not None and -(-n // bn) * sk > SPLIT_MAX_PROGRAMS:
            continue
        out.append(dict(BLOCK_M=min(max(m, 16), 64), BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps,
                        num_stages=stages, SPLIT_K=sk))
    return out


def configs(m: int, large_m_tiles=LARGE_M_TILES, n: int | None = None, k: int | None = None,
            split_tiles=SPLIT_TILES) -> list[dict]:
    """Candidates for batch m (rounded up to a power of two); the first is the untuned default (never split). Up to
    M = SPLIT_MAX_M also the split-K tiles (split_configs, pruned for N = n, K = k where given). Configs without a
    SPLIT_K key run unsplit. Shared by the int8 GEMMs (w4a8_gemm passes its own large-M and split tiles) and FP8's."""
    if interpreter_on():
        return [INTERPRETER_CONFIG]
    tiles = SMALL_M_TILES if m <= 32 else large_m_tiles
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
            for bm, bn, bk, warps in tiles for stages in (3, 4)] + split_configs(m, split_tiles, n, k)


def launch(config, xq, x_scale, wq, w_scale, bias, out_dtype) -> torch.Tensor:
    """One launch with config (inputs checked and contiguous)."""
    m, k = xq.shape
    n = wq.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    tiles = triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"])
    per_split, splits, part, counters = split_args(config, k, config["BLOCK_K"], m, n, tiles, y, torch.int32)
    _w8a8_kernel[(tiles, splits)](
        xq, x_scale, wq, w_scale, bias if bias is not None else y, y, part, counters, m, n, k, xq.stride(0),
        wq.stride(0), y.stride(0), per_split, splits, HAS_BIAS=bias is not None, SPLIT=splits > 1,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return y


def w8a8_matmul(xq, x_scale, wq, w_scale, *, bias=None, out_dtype=torch.float16):
    check_inputs(xq, x_scale, wq, w_scale, bias, out_dtype)
    check_device(dict(xq=xq, x_scale=x_scale, wq=wq, w_scale=w_scale, bias=bias))
    m, n = xq.shape[0], wq.shape[0]
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=out_dtype, device=xq.device)
    args = [t.contiguous() if t is not None else None for t in (xq, x_scale, wq, w_scale, bias)]
    key = dict(M=next_power_of_2(m), N=n, K=xq.shape[1], out=str(out_dtype).removeprefix("torch."),
               bias=int(bias is not None))
    config = tune("w8a8_matmul", key, configs(key["M"], n=n, k=key["K"]), lambda c: launch(c, *args, out_dtype),
                  xq.device)
    return launch(config, *args, out_dtype)

"""Weight-only quantized matmul: the public launcher and its torch reference.

    y[M, N] = x[:, perm] @ w + bias,   w[k, n] = (code(k, n) - zeros[k // group_size, n]) * scales[k // group_size, n]
    x       [M, K]  fp16 / bf16 / fp32            qweight int32 [ceil(K / epw), N], epw = 32 // bits
    scales  [K // group_size, N] in x's dtype     zeros   [K // group_size, N] in x's dtype, integer valued
    perm    int32/int64 [K] or None               bias    [N] in x's dtype or None
    y       [M, N] in x's dtype, accumulated in fp32
code(k, n) is defined by tquant/packing.py. group_size <= 0 means per-channel (group_size = K).
bilevel=(scale_bits, stat_group) takes SpQR's grid instead (tquant.formats.spqr): scales is uint8 [G, N] holding each
group's scale code | zero << scale_bits, zeros the fp16 second level [2, G, N / stat_group] (step, low), and
scales[g, n] = code * step[g, n // stat_group] + low[g, n // stat_group] (decode_bilevel); the kernels decode it.

`weight_only_matmul` runs the Triton kernels. The path and its launch config are tuned once per GPU and
key (M rounded up to a power of two, N, K, bits, group_size, dtype, perm) by autotune_cache:
    M == 1      dequant_gemv (no tl.dot), split-K
    M <= 16     dequant_gemm with y^T = w^T x^T (BLOCK_M = 16), split-K
    M > 16      dequant_gemm; from M >= 128 on also "dense": dequantize once (Triton), then cuBLAS (x @ w)
With perm and M > 1 each GEMM config also comes with gather=True: x[:, perm] is gathered once (one torch
index_select) and the kernel reads x in storage order, instead of gathering x's K step tiles by perm inside every
program of the grid (benchmarks/RESULTS.md has what the in-kernel gather cost).
`weight_only_matmul_ref` is plain torch in fp32 (for CPU modules and tests).
"""
from __future__ import annotations

import functools

import torch

from ..formats.packing import dequantize_packed, values_per_word
from ..formats.quantizer import check_bits, resolve_group_size
from . import dequant_gemm, dequant_gemv
from .autotune_cache import tune
from .runtime import DTYPES, check_device, check_tensors, interpreter_on, next_power_of_2

DENSE = dict(path="dense")


def check_inputs(x, qweight, scales, zeros, bits, group_size, in_features, perm, bias, bilevel=None) -> int:
    """Raise ValueError on inconsistent inputs; return the concrete group size."""
    check_bits(bits)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K] (flatten leading dims first); got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not supported; use one of {DTYPES}")
    if x.shape[1] != in_features:
        raise ValueError(f"x has K={x.shape[1]} columns but in_features={in_features}")
    group_size = resolve_group_size(group_size, in_features)
    n = qweight.shape[-1]
    groups = in_features // group_size
    if bilevel is None:
        params = {"scales": (scales, (groups, n), (x.dtype,)), "zeros": (zeros, (groups, n), (x.dtype,))}
    else:
        scale_bits, stat_group = bilevel
        if not 1 <= scale_bits <= 8 - bits or stat_group < 1 or n % stat_group:
            raise ValueError(f"bilevel=(scale_bits={scale_bits}, stat_group={stat_group}) does not fit {bits}-bit "
                             f"zeros in a byte or N={n} in whole stat groups")
        params = {"scales": (scales, (groups, n), (torch.uint8,)),
                  "zeros": (zeros, (2, groups, n // stat_group), (torch.float16,))}
    expected = {
        "qweight": (qweight, (-(-in_features // values_per_word(bits)), n), (torch.int32,)),
        **params,
        "perm": (perm, (in_features,), (torch.int32, torch.int64)),
        "bias": (bias, (n,), (x.dtype,)),
    }
    check_tensors(expected, f"x of {x.dtype}, K={in_features}, bits={bits}, group_size={group_size}")
    return group_size


def decode_bilevel(scales, zeros, scale_bits: int, stat_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scales and zeros [G, N] of SpQR's packed grid (module docstring)."""
    from ..formats.spqr import decode_scales

    stats = scales.to(torch.int32)
    scale = decode_scales((stats & (2**scale_bits - 1)).t(), zeros[0].t(), zeros[1].t(), stat_group).t()
    return scale, (stats >> scale_bits).float()


def weight_only_matmul_ref(x, qweight, scales, zeros, *, bits, group_size, in_features, perm=None, bias=None,
                           bilevel=None):
    group_size = check_inputs(x, qweight, scales, zeros, bits, group_size, in_features, perm, bias, bilevel)
    if bilevel is not None:
        scales, zeros = decode_bilevel(scales, zeros, *bilevel)
    w = dequantize_packed(qweight, scales, zeros, bits, group_size, in_features)
    xs = x.float() if perm is None else x.float()[:, perm.long()]
    y = xs @ w
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


@functools.lru_cache(maxsize=256)
def candidates(m: int, n: int, kw: int, perm: bool = False) -> list[dict]:
    """Launch configs to tune over for batch m (rounded up to a power of two), N = n, kw words along K
    (the first is the default); with perm and m > 1 every GEMM config also with gather=True. Cached: callers must
    not modify the list."""
    if interpreter_on():
        return [dequant_gemv.INTERPRETER_CONFIG if m == 1 else dequant_gemm.INTERPRETER_CONFIGS[m > 16]]
    if m == 1:
        return dequant_gemv.configs(n, kw)
    gemms = dequant_gemm.configs(m, n, kw)
    return gemms + ([dict(c, gather=True) for c in gemms] if perm else []) + ([DENSE] if m >= 128 else [])


def run_path(config, x, qweight, scales, zeros, perm, bias, *, bits, group_size, in_features, bilevel=None):
    """One launch of the path that config names (inputs already checked; x, perm, bias contiguous, the weight
    tensors as row_strided gives them)."""
    if config["path"] == "dense":
        w = dequant_gemm.dequantize(qweight, scales, zeros, perm, bits=bits, group_size=group_size,
                                    in_features=in_features, dtype=x.dtype, bilevel=bilevel)
        return x @ w if bias is None else torch.addmm(bias, x, w)
    if config.get("gather") and perm is not None:
        x, perm = x.index_select(1, perm), None
    kernel = dequant_gemv.gemv if config["path"] == "gemv" else dequant_gemm.gemm
    return kernel(x, qweight, scales, zeros, perm, bias, bits=bits, group_size=group_size, config=config,
                  bilevel=bilevel)


def row_strided(qweight, scales, zeros):
    """The weight tensors as the kernels read them: rows of unit column stride at any row stride (the column views of
    tquant.modules.fuse are read in place), scales and zeros with one layout (the kernels take one stride for both);
    others copied contiguous."""
    qweight = qweight if qweight.stride(-1) == 1 else qweight.contiguous()
    if scales.stride(-1) != 1 or scales.stride() != zeros.stride():
        scales, zeros = scales.contiguous(), zeros.contiguous()
    return qweight, scales, zeros


def weight_only_matmul(x, qweight, scales, zeros, *, bits, group_size, in_features, perm=None, bias=None,
                       bilevel=None):
    group_size = check_inputs(x, qweight, scales, zeros, bits, group_size, in_features, perm, bias, bilevel)
    check_device(dict(x=x, qweight=qweight, scales=scales, zeros=zeros, perm=perm, bias=bias))
    m, n = x.shape[0], qweight.shape[1]
    if m == 0:
        return x.new_empty(0, n)
    qweight, scales, zeros = row_strided(qweight, scales, zeros)
    args = [t.contiguous() if t is not None else None for t in (x, perm, bias)]
    args[1:1] = (qweight, scales, zeros)
    kw = dict(bits=bits, group_size=group_size, in_features=in_features, bilevel=bilevel)
    key = dict(M=next_power_of_2(m), N=n, K=in_features, bits=bits, group=group_size,
               dtype=str(x.dtype).removeprefix("torch."), perm=int(perm is not None),
               **({} if bilevel is None else {"bilevel": "{}/{}".format(*bilevel)}))
    configs = candidates(key["M"], n, qweight.shape[0], perm is not None)
    config = tune("weight_only_matmul", key, configs, lambda c: run_path(c, *args, **kw), x.device)
    return run_path(config, *args, **kw)

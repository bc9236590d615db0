"""The bit-plane WpAq matmul as users call it: tuned per key over the tensor-core GEMM (bitplane_gemm.launch) and,
at small batches on a GPU, the popcount GEMV (bitplane_gemv.launch). The format, the maths and the torch
references are bitplane_gemm's (its module docstring); this module only chooses between the two kernels, so neither
kernel file imports the other's launcher.
"""
from __future__ import annotations

import torch

from . import bitplane_gemm, bitplane_gemv
from .autotune_cache import tune
from .bitplane_gemm import bitplane_matmul_a16, bitplane_matmul_a16_ref, bitplane_matmul_ref
from .runtime import interpreter_on, next_power_of_2

GEMV_MAX_M = 8  # batches (rounded up to a power of two) at which bitplane_gemv's candidates join the tuning


def wpaq_candidates(m: int, n: int, k: int, group_size: int, bits: int, act_bits: int) -> list[dict]:
    """What bitplane_matmul tunes over: bitplane_gemm.configs(m, k, group_size), and up to GEMV_MAX_M on a GPU the
    popcount GEMV's candidates as {"path": "gemv", ...}, so the tuner picks the path per key."""
    candidates = bitplane_gemm.configs(m, k, group_size)
    if m <= GEMV_MAX_M and not interpreter_on():
        candidates += [dict(path="gemv", **c) for c in bitplane_gemv.configs(m, n, k, group_size, bits, act_bits)]
    return candidates


def run_wpaq(config, *args) -> torch.Tensor:
    """One launch of the path config names (launch's arguments): the GEMV for {"path": "gemv", ...}, else launch."""
    if config.get("path") == "gemv":
        return bitplane_gemv.launch({key: v for key, v in config.items() if key != "path"}, *args)
    return bitplane_gemm.launch(config, *args)


def bitplane_matmul(xq, x_scale, x_zero, planes, w_scale, w_zero, w_sum, *, bits, act_bits, group_size, bias=None,
                    out_dtype=torch.float16):
    """y [M, N] of bitplane_gemm's module docstring: WpAq with p = bits, q = act_bits, on the Triton kernels (w_sum's
    shape and dtype checked, its values not: bitplane_matmul_ref does)."""
    args, key = bitplane_gemm.wpaq_arguments(xq, x_scale, x_zero, planes, w_scale, w_zero, w_sum, bits, act_bits,
                                             group_size, bias, out_dtype)
    if args is None:
        return torch.empty(key["M"], key["N"], dtype=out_dtype, device=xq.device)
    key["M"] = next_power_of_2(key["M"])
    m, n, k = key["M"], key["N"], key["K"]
    candidates = wpaq_candidates(m, n, k, group_size, bits, act_bits)
    config = tune("bitplane_matmul", key, candidates, lambda c: run_wpaq(c, *args), xq.device)
    return run_wpaq(config, *args)


__all__ = ["bitplane_matmul", "bitplane_matmul_ref", "bitplane_matmul_a16", "bitplane_matmul_a16_ref", "run_wpaq",
           "wpaq_candidates"]

"""Matmul with an SpQR weight (tquant.formats.spqr): the dense bilevel part on the weight-only kernels, then the outliers.

    y [M, N] = x [M, K] @ (W_dense + S)^T + bias
    W_dense: qweight int32 [ceil(K / epw), N] (tquant.formats.packing), stats uint8 [G, N] (scale code | zero << scale_bits),
             meta fp16 [2, G, N / stat_group] (step, low), perm int32 [K] or None: weight_only_matmul's bilevel grid
    S:       CSR over output rows, row_ptr int32 [N + 1], cols int16 [nnz] (input channels; read as unsigned, so
             K <= 65536), vals fp16 [nnz]
Launch sequence: weight_only_matmul (dequant GEMV / GEMM decoding the bilevel stats in registers, split-K
reduced in the launch, bias added) writes y; `_outlier_add_kernel` then adds x @ S^T into it: program (row block,
batch block) walks the outliers of BLOCK_R output rows BLOCK_J at a time (both tuned), gathers x at their columns
and reduces [BLOCK_M, BLOCK_R, BLOCK_J] products in fp32 (y is rounded to x's dtype twice: after the dense part and
after the outliers).
`spqr_matmul_ref`: weight_only_matmul_ref of the dense part plus x @ S^T, both in fp32, rounded once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.spqr import csr_to_dense
from .autotune_cache import tune
from .runtime import check_device, check_tensors, interpreter_on
from .weight_only_matmul import check_inputs, weight_only_matmul, weight_only_matmul_ref


@triton.jit
def _outlier_add_kernel(x_ptr, rp_ptr, c_ptr, v_ptr, y_ptr, M, N, stride_xm, stride_ym, BLOCK_M: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok, m_ok = r < N, rm < M
    start = tl.load(rp_ptr + r, mask=r_ok, other=0)
    count = tl.load(rp_ptr + r + 1, mask=r_ok, other=0) - start
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for j0 in range(0, tl.max(count), BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        ok = j[None, :] < count[:, None]
        idx = start[:, None] + j[None, :]
        col = tl.load(c_ptr + idx, mask=ok, other=0).to(tl.int32) & 0xFFFF
        v = tl.load(v_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + rm[:, None, None].to(tl.int64) * stride_xm + col[None, :, :],
                     mask=m_ok[:, None, None] & ok[None, :, :], other=0.0).to(tl.float32)
        acc += tl.sum(xv * v[None, :, :], axis=2)
    out = y_ptr + rm[:, None].to(tl.int64) * stride_ym + r[None, :]
    mask = m_ok[:, None] & r_ok[None, :]
    tl.store(out, (tl.load(out, mask=mask, other=0.0).to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


INTERPRETER_CONFIG = {"BLOCK_M": 4, "BLOCK_R": 16, "BLOCK_J": 8, "num_warps": 4}


def outlier_configs(m: int) -> list[dict]:
    """Rows a program (BLOCK_R) x outliers a step (BLOCK_J): the first is the default; fewer rows and longer steps put
    more independent gathers in flight. BLOCK_M covers the batch (up to 16 a program)."""
    if interpreter_on():
        return [INTERPRETER_CONFIG]
    block_m = min(triton.next_power_of_2(m), 16)
    return [{"BLOCK_M": block_m, "BLOCK_R": r, "BLOCK_J": j, "num_warps": 4}
            for r, j in ((32, 16), (8, 64), (4, 128), (16, 32), (2, 256)) if block_m * r * j <= 16384]


def outlier_launch(config, y, x, row_ptr, cols, vals) -> torch.Tensor:
    m, n = y.shape
    _outlier_add_kernel[(triton.cdiv(n, config["BLOCK_R"]), triton.cdiv(m, config["BLOCK_M"]))](
        x, row_ptr, cols, vals, y, m, n, x.stride(0), y.stride(0), BLOCK_M=config["BLOCK_M"], BLOCK_R=config["BLOCK_R"],
        BLOCK_J=config["BLOCK_J"], num_warps=config["num_warps"])
    return y


def outlier_add(y: torch.Tensor, x: torch.Tensor, row_ptr, cols, vals) -> torch.Tensor:
    """y += x @ S^T in place (S in CSR as above), y [M, N] and x [M, K] with unit column strides; the launch config
    tuned per (M, N, K, outlier count) on copies of y."""
    m, n = y.shape
    if vals.numel() == 0 or m == 0:
        return y
    key = {"M": triton.next_power_of_2(m), "N": n, "K": x.shape[1], "nnz": triton.next_power_of_2(vals.numel())}
    config = tune("spqr_outliers", key, outlier_configs(m), lambda c: outlier_launch(c, y.clone(), x, row_ptr, cols,
                                                                                        vals), y.device)
    return outlier_launch(config, y, x, row_ptr, cols, vals)


def check_outliers(x, n, row_ptr, cols, vals) -> None:
    """Raise ValueError naming the first outlier tensor whose dtype or shape is off."""
    nnz = cols.shape[0] if cols.dim() == 1 else -1
    check_tensors({"row_ptr": (row_ptr, (n + 1,), (torch.int32,)), "cols": (cols, (nnz,), (torch.int16,)),
                   "vals": (vals, (nnz,), (torch.float16,))}, f"{n} output rows and {nnz} outlier columns")
    if x.shape[1] > 2**16:
        raise ValueError(f"outlier columns are 16-bit: K={x.shape[1]} > 65536")


def spqr_matmul(x, qweight, stats, meta, row_ptr, cols, vals, *, bits, group_size, scale_bits, stat_group,
                perm=None, bias=None) -> torch.Tensor:
    """y [M, N] = x @ (W_dense + S)^T (+ bias) on the kernels (module docstring)."""
    check_outliers(x, qweight.shape[1], row_ptr, cols, vals)
    check_device({"x": x, "row_ptr": row_ptr, "cols": cols, "vals": vals})
    y = weight_only_matmul(x, qweight, stats, meta, bits=bits, group_size=group_size, in_features=x.shape[1],
                           perm=perm, bias=bias, bilevel=(scale_bits, stat_group))
    return outlier_add(y, x.contiguous(), row_ptr.contiguous(), cols.contiguous(), vals.contiguous())


def spqr_matmul_ref(x, qweight, stats, meta, row_ptr, cols, vals, *, bits, group_size, scale_bits, stat_group,
                    perm=None, bias=None) -> torch.Tensor:
    """The same in fp32 torch (weight_only_matmul_ref of the dense part plus x @ S^T), rounded once to x's dtype."""
    check_outliers(x, qweight.shape[1], row_ptr, cols, vals)
    check_inputs(x, qweight, stats, meta, bits, group_size, x.shape[1], perm, bias, (scale_bits, stat_group))
    y = weight_only_matmul_ref(x.float(), qweight, stats, meta, bits=bits, group_size=group_size,
                               in_features=x.shape[1], perm=perm, bias=None if bias is None else bias.float(),
                               bilevel=(scale_bits, stat_group))
    sparse = csr_to_dense(row_ptr.long(), cols.to(torch.int32) & 0xFFFF, vals, (qweight.shape[1], x.shape[1]))
    return (y + x.float() @ sparse.t()).to(x.dtype)


__all__ = ["outlier_add", "spqr_matmul", "spqr_matmul_ref"]

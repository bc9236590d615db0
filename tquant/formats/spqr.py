"""SpQR's grid (Dettmers et al., 2023): small groups with quantized statistics, plus fp16 outliers.

A weight W [N, K] (in storage order, see SpQRWeight.perm) is cut into groups of beta1 input channels of one
output row. Each group gets an asymmetric min-max grid (tquant.formats.quantizer.qparams: scale s, integer zero z in
[0, 2^b)). The scales of beta2 consecutive output rows of one column group are themselves quantized to
scale_bits with a min-max grid stored in fp16 (the second level):
    s_hat = c_s * step + low,      c_s in [0, 2^scale_bits),   step, low fp16 per (beta2 rows, column group)
    code  = clamp(round(w / s_hat) + z, 0, 2^b - 1),   W_dense = (code - z) s_hat
The zero keeps b bits and stays an integer (SpQR's round_zero variant: the zero needs no second level, and the
dense part is exactly a grouped integer grid, which tquant's weight-only kernels run). Weights whose error would
dominate are kept as outliers: W = W_dense + S, S sparse in fp16 (CSR over output rows, input-order columns),
each outlier storing W - W_dense so that the sum is the original weight up to fp16 rounding.

Outlier criterion (SpQR's, against the Hessian's inverse Cholesky factor U of GPTQ, d = diag U):
    before a group is fitted, gain[n, j] = err(group) - err(group without weight j), err = sum ((w_hat - w) / d)^2
    with the first-level grid refit on the remaining weights; weights with gain > tau are left out of the fit,
    then every weight whose own error ((w - w_hat) / d_k)^2 exceeds tau while its column is quantized becomes an
    outlier. tau = outlier_relative_threshold * mean_k(var_n(W[:, k]) / d_k^2).
"""
from __future__ import annotations

import torch

from .quantizer import dequantize, minmax_dequantize, minmax_quantize, qparams, quantize

SPQR_BITS = (2, 3, 4)


def check_spqr_options(bits: int, scale_bits: int, stat_group: int) -> None:
    if bits not in SPQR_BITS:
        raise ValueError(f"SpQR's weights take bits {SPQR_BITS}, not {bits}")
    if not 1 <= scale_bits <= 8 - bits:
        raise ValueError(f"scale_bits={scale_bits}: a group's scale code and {bits}-bit zero share one byte, so "
                         f"scale_bits must be in 1..{8 - bits}")
    if stat_group < 1:
        raise ValueError(f"stat_group must be positive, got {stat_group}")


def bilevel_qparams(w: torch.Tensor, bits: int, scale_bits: int, stat_group: int):
    """Grid of groups w [N, beta1] (N a multiple of stat_group): (s_hat [N] fp32, zero [N], scale codes [N] int32,
    step [N / stat_group] fp16, low [N / stat_group] fp16), s_hat = codes * step + low and the zero refit to s_hat."""
    maxq = 2**bits - 1
    scale, _ = qparams(w, bits, sym=False)
    scale = scale.clamp_min(2.0**-23)  # stays positive through the fp16 second level
    codes, step, low = minmax_quantize(scale.view(-1, stat_group), scale_bits, dim=1, param_dtype=torch.float16)
    s_hat = minmax_dequantize(codes, step, low).view(-1)
    zero = torch.round(-w.float().amin(dim=-1).clamp(max=0) / s_hat).clamp_(0, maxq)
    return s_hat, zero, codes.view(-1), step.view(-1), low.view(-1)


def outlier_gain(w: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """gain [N, g] of leaving weight j of each group w [N, g] out of its first-level grid: the Hessian-weighted
    squared error of the group minus that of the other g - 1 weights on a grid refit without j (d [g]).
    A min-max grid only moves when its row's max or min leaves, so every other j gains exactly its own error and
    only those two are refit (as the row with j set to the next value in from that end), O(g) not O(g^2)."""

    def errors(v):
        s, z = qparams(v, bits, sym=False)
        s, z = s[:, None], z[:, None]
        return ((dequantize(quantize(v, s, z, bits), s, z) - v) / d) ** 2

    own = errors(w)
    gain = own.clone()
    base = own.sum(1)
    for end, fill in ((torch.argmax, float("-inf")), (torch.argmin, float("inf"))):
        j = end(w, dim=1, keepdim=True)
        masked = w.scatter(1, j, fill)
        nxt = masked.amax(1, keepdim=True) if fill < 0 else masked.amin(1, keepdim=True)
        refit = errors(w.scatter(1, j, nxt))
        gain.scatter_(1, j, (base - (refit.sum(1) - refit.gather(1, j)[:, 0]))[:, None])
    return gain


def decode_scales(scale_codes: torch.Tensor, step: torch.Tensor, low: torch.Tensor, stat_group: int) -> torch.Tensor:
    """s_hat [N, G] of scale codes [N, G] and the second level step, low [N / stat_group, G]."""
    return minmax_dequantize(scale_codes, step.repeat_interleave(stat_group, 0), low.repeat_interleave(stat_group, 0))


def csr_of_mask(values: torch.Tensor, mask: torch.Tensor, perm: torch.Tensor | None):
    """CSR (row_ptr int64 [N + 1], cols int64 [nnz] in input order and sorted, vals fp16 [nnz]) of the entries
    of values [N, K] (storage order) where mask is set; storage column k is input channel perm[k]."""
    rows, k = mask.nonzero(as_tuple=True)
    cols = k if perm is None else perm.to(k.device)[k]
    order = torch.argsort(rows * values.shape[1] + cols)
    rows, cols = rows[order], cols[order]
    row_ptr = torch.zeros(values.shape[0] + 1, dtype=torch.int64, device=values.device)
    row_ptr[1:] = torch.bincount(rows, minlength=values.shape[0]).cumsum(0)
    return row_ptr, cols, values[mask.nonzero(as_tuple=True)][order].to(torch.float16)


def csr_to_dense(row_ptr, cols, vals, shape) -> torch.Tensor:
    """fp32 [N, K] of a CSR matrix (input-order columns)."""
    out = torch.zeros(shape, dtype=torch.float32, device=vals.device)
    rows = torch.repeat_interleave(torch.arange(shape[0], device=vals.device), row_ptr.diff())
    out[rows, cols.long()] = vals.float()
    return out

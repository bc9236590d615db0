"""GPTQ (Frantar et al., 2023): column-by-column quantization with Hessian-based error feedback.

For a linear with weight W [N, K] and calibration inputs X [T, K]:
    H = 2/T * X^T X + percdamp * mean(diag H) * I
    U = chol(H^-1)^T (upper)                     # rows of the inverse Cholesky factor
    for each column k (in act order when act_order): q_k = Q(w_k); e = (w_k - q_k) / U_kk
        W[:, k+1:] -= e * U_k,k+1:               # applied lazily per `blocksize` columns
Group parameters (scale, zero) are taken from the current (already error-updated) weights when the
first column of a group is reached, or from the original weights up front with static_groups.
With act_order and non-static groups, columns are stored in activation order (perm) so groups stay
contiguous for the kernel; otherwise codes are returned in the original order. Subclasses that set
integer_groups (QQQ) round each group scale up to an integer multiple of a per-channel scale taken from
the original weights (quantizer.integer_group_scales), the grid the W4A8 GEMM reads.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar

import torch

from ..formats.weights import QuantizedWeight, in_input_order
from ..formats.quantizer import (channel_scale_for_groups, dequantize, grouped_qparams, integer_group_scales, qparams,
                         quantize)
from .base import LayerState, Method, option, register

_HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class HessianState(LayerState):
    """Running H = 2/T * sum_t x_t x_t^T over every calibration token seen."""

    def __init__(self, name, linear, dtype=torch.float32):
        super().__init__(name, linear)
        self.dtype = dtype
        k = linear.in_features
        self.hessian = torch.zeros(k, k, dtype=self.dtype, device=linear.weight.device)
        self.tokens = 0

    def _accumulate(self, x):
        t = x.shape[0]
        x = x.to(self.hessian.device, self.dtype)
        self.hessian *= self.tokens / (self.tokens + t)
        self.tokens += t
        self.hessian.addmm_(x.t(), x, alpha=2.0 / self.tokens)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """The column loop is thousands of tiny ops: on the CPU, thread hand-offs cost 20x their work."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@register
@dataclasses.dataclass
class GPTQ(Method):
    name = "gptq"
    integer_groups: ClassVar[bool] = False

    percdamp: float = option(0.01, "damping added to diag(H), as a fraction of its mean")
    blocksize: int = option(128, "columns per lazy batch update")
    act_order: bool = option(True, "quantize columns in order of decreasing diag(H)")
    static_groups: bool = option(False, "fix group scales from the original weights before GPTQ runs")
    hessian_dtype: str = option("float32", "accumulation and solve dtype of H: float32 or float64")

    def __post_init__(self):
        super().__post_init__()
        if self.hessian_dtype not in _HESSIAN_DTYPES:
            raise ValueError(f"hessian_dtype must be one of {list(_HESSIAN_DTYPES)}, got {self.hessian_dtype!r}")
        if not 0 <= self.percdamp < float("inf"):
            raise ValueError(f"percdamp must be a finite number >= 0, got {self.percdamp}")
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be positive, got {self.blocksize}")

    def new_state(self, name, linear):
        return HessianState(name, linear, _HESSIAN_DTYPES[self.hessian_dtype])

    def _inverse_cholesky(self, h: torch.Tensor, name: str) -> torch.Tensor:
        h = h.clone()
        h.diagonal().add_(self.percdamp * h.diagonal().mean())
        try:
            lower = torch.linalg.cholesky(h)
            # H^-1 = L^-T L^-1 (torch.cholesky_inverse is ~30x slower than this on some CPU builds)
            lower_inv = torch.linalg.solve_triangular(lower, torch.eye(len(h), dtype=h.dtype, device=h.device), upper=False)
            return torch.linalg.cholesky(lower_inv.t() @ lower_inv, upper=True)
        except torch.linalg.LinAlgError as e:
            raise ValueError(
                f"GPTQ: the Hessian of layer {name!r} is not positive definite even with percdamp={self.percdamp}; "
                "raise percdamp or use more calibration data"
            ) from e

    def prepared(self, state: HessianState, linear, name) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(w, perm, U) for the column loop: the weight in H's dtype with dead input channels (diag H = 0) zeroed,
        its columns in act order (perm; None without act_order), and U = chol(H^-1)^T in the same order."""
        if state.tokens == 0:
            raise ValueError(f"{type(self).__name__}: layer {name!r} saw no calibration data")
        w = linear.weight.detach().to(state.dtype).clone()
        h = state.hessian.clone()
        dead = h.diagonal() == 0
        h[dead, dead] = 1
        w[:, dead] = 0
        perm = torch.argsort(h.diagonal(), descending=True) if self.act_order else None
        if perm is not None:
            w, h = w[:, perm], h[perm][:, perm]
        return w, perm, self._inverse_cholesky(h, name)

    def quantize(self, state: HessianState, linear, name) -> QuantizedWeight:
        w, perm, u = self.prepared(state, linear, name)
        n, k = w.shape
        gs = self.layer_group_size(linear, name)
        grouped = gs != k

        channel = None
        if grouped and self.integer_groups:
            channel = channel_scale_for_groups(qparams(w, self.bits, self.sym)[0][:, None])
        if self.static_groups and grouped:
            static_scale, static_zero = grouped_qparams(in_input_order(w, perm), self.bits, gs, self.sym)
            if channel is not None:
                static_scale = integer_group_scales(static_scale, channel)

        codes = torch.empty(n, k, dtype=torch.int32, device=w.device)
        scale = torch.empty(n, k // gs, dtype=torch.float32, device=w.device)
        zero = torch.empty_like(scale)
        grid = {}
        if not grouped:
            grid["s"], grid["z"] = scale[:, 0], zero[:, 0] = qparams(w, self.bits, self.sym)

        def column(col, current, upcoming):
            if grouped and self.static_groups:
                g = (int(perm[col]) if perm is not None else col) // gs
                grid["s"], grid["z"] = static_scale[:, g], static_zero[:, g]
            elif grouped and col % gs == 0:
                s, z = qparams(upcoming(gs), self.bits, self.sym)
                if channel is not None:
                    s = integer_group_scales(s, channel)
                grid["s"], grid["z"] = scale[:, col // gs], zero[:, col // gs] = s, z
            q = quantize(current, grid["s"], grid["z"], self.bits)
            codes[:, col] = q
            return dequantize(q, grid["s"], grid["z"]).to(w.dtype)

        error_feedback(w, u, self.blocksize, column)
        if self.static_groups and grouped:
            scale, zero = static_scale.float(), static_zero.float()
        if perm is not None and (self.static_groups or not grouped):
            codes, perm = in_input_order(codes, perm), None
        return QuantizedWeight(codes, scale, zero, self.bits, gs, perm, channel_scale=channel)


def error_feedback(w: torch.Tensor, u: torch.Tensor, blocksize: int, column) -> None:
    """GPTQ's column loop over w [N, K] (in place), lazy batches of `blocksize` columns: for each column k,
    w_hat = column(k, w[:, k], upcoming) with upcoming(width) the current (error-updated) w[:, k : k + width];
    e = (w[:, k] - w_hat) / U_kk, w[:, k + 1:] -= e U_k,k+1: (within the batch at once, beyond it after the batch).
    upcoming applies the batch's pending updates to the columns past the batch it returns, so what it sees (and so
    the codes) does not depend on blocksize, also for a group that straddles two batches."""
    n, k = w.shape
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1, err1, u1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=w.dtype, device=w.device), u[i1:i2, i1:i2]

        def upcoming(width, i):
            beyond = min(i2 + width - (i2 - i1 - i), k)
            if beyond <= i2:
                return w1[:, i:i + width]
            return torch.cat([w1[:, i:], w[:, i2:beyond] - err1 @ u[i1:i2, i2:beyond]], dim=1)

        with _one_cpu_thread(w.device):
            for i in range(i2 - i1):
                w_hat = column(i1 + i, w1[:, i], lambda width, i=i: upcoming(width, i))
                e = (w1[:, i] - w_hat) / u1[i, i]
                w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
                err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

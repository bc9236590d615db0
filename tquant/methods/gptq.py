"""GPTQ (Frantar et al., 2023): column-by-column quantization with Hessian-based error feedback.

For a linear with weight W [N, K] and calibration inputs X [T, K]:
    H = 2/T * X^T X + percdamp * mean(diag H) * I
    U = chol(H^-1)^T (upper)                     # rows of the inverse Cholesky factor
    for each column k (in act order when act_order): q_k = Q(w_k); e = (w_k - q_k) / U_kk
        W[:, k+1:] -= e * U_k,k+1:               # applied lazily per `blocksize` columns
Which columns share a group (with act_order; without it both orders are the input order): group_order="input"
(default) groups consecutive input channels, so codes stay in input order (no perm); group_order="act" groups
consecutive columns of the act order and stores the codes in that order (perm), which keeps groups contiguous for the
kernel. A group's parameters (scale, zero) come from its columns' current (error-updated) weights when GPTQ reaches
the group's first column (default), or from the original weights up front with static_groups (llm-compressor's
actorder="static" is group_order="input", static_groups=True). On SmolLM2-135M the act-order grouping was what cost
(+8 % perplexity at W3 g64): it pools the columns of many attention heads / channels of unlike ranges into a group,
while the parameters' source mattered little except where GPTQ's updates push a group past its original range (last
blocks' down_proj: static ranges clip there). benchmarks/RESULTS.md, "GPTQ against llm-compressor", has the numbers.
Subclasses that set integer_groups (QQQ) round each group scale up to an integer multiple of a per-channel scale taken
from the original weights (quantizer.integer_group_scales), the grid the W4A8 GEMM reads.
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
    static_groups: bool = option(False, "each group's scale and zero from the original weights before GPTQ runs (else "
                                        "from the error-updated weights when GPTQ reaches the group's first column)")
    group_order: str = option("input", "with act_order and groups, which columns share a group: 'input' (consecutive input "
                                     "channels, codes kept in input order) or 'act' (consecutive in act order, stored with perm)")
    hessian_dtype: str = option("float32", "accumulation and solve dtype of H: float32 or float64")

    def __post_init__(self):
        super().__post_init__()
        if self.hessian_dtype not in _HESSIAN_DTYPES:
            raise ValueError(f"hessian_dtype must be one of {list(_HESSIAN_DTYPES)}, got {self.hessian_dtype!r}")
        if not 0 <= self.percdamp < float("inf"):
            raise ValueError(f"percdamp must be a finite number >= 0, got {self.percdamp}")
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be positive, got {self.blocksize}")
        if self.group_order not in ("input", "act"):
            raise ValueError(f"group_order must be 'input' or 'act', got {self.group_order!r}")

    def new_state(self, name, linear):
        return HessianState(name, linear, _HESSIAN_DTYPES[self.hessian_dtype])

    def _inverse_cholesky(self, h: torch.Tensor, name: str) -> torch.Tensor:
        """U = chol(H^-1) (upper) of H damped by percdamp * mean(diag H). h is the caller's own copy and is
        overwritten: each step runs in place (L into h, L^-1 into the identity it solves, U into L^-T L^-1), so
        besides h at most two K x K matrices are alive at once."""
        h.diagonal().add_(self.percdamp * h.diagonal().mean())
        try:
            lower = torch.linalg.cholesky(h, out=h)
            # H^-1 = L^-T L^-1 (torch.cholesky_inverse is ~30x slower than this on some CPU builds)
            eye = torch.eye(len(h), dtype=h.dtype, device=h.device)
            lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False, out=eye)
            hinv = lower_inv.t() @ lower_inv
            del lower_inv, eye
            return torch.linalg.cholesky(hinv, upper=True, out=hinv)
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
            w, h = w[:, perm], h.index_select(0, perm).index_select(1, perm)
        return w, perm, self._inverse_cholesky(h, name)

    def quantize(self, state: HessianState, linear, name) -> QuantizedWeight:
        w, perm, u = self.prepared(state, linear, name)
        n, k = w.shape
        gs = self.layer_group_size(linear, name)
        grouped = gs != k
        act_groups = grouped and perm is not None and self.group_order == "act"
        # group of each column in processing order, and each group's columns (positions in processing order)
        position = torch.arange(k, device=w.device)
        group_of = position // gs if perm is None or act_groups else perm.to(w.device) // gs
        members = position.view(-1, gs) if perm is None or act_groups else torch.argsort(perm.to(w.device)).view(-1, gs)

        channel = None
        if grouped and self.integer_groups:
            channel = channel_scale_for_groups(qparams(w, self.bits, self.sym)[0][:, None])
        if self.static_groups and grouped:
            static_scale, static_zero = grouped_qparams(w if act_groups else in_input_order(w, perm), self.bits, gs,
                                                        self.sym)
            if channel is not None:
                static_scale = integer_group_scales(static_scale, channel)

        codes = torch.empty(n, k, dtype=torch.int32, device=w.device)
        scale = torch.empty(n, k // gs, dtype=torch.float32, device=w.device)
        zero = torch.empty_like(scale)
        grid = {}
        if not grouped:
            grid["s"], grid["z"] = scale[:, 0], zero[:, 0] = qparams(w, self.bits, self.sym)
        started = torch.zeros(k // gs, dtype=torch.bool)

        def column(col, current, upcoming):
            if grouped:
                g = int(group_of[col])
                if not self.static_groups and not started[g]:  # its first column: all its columns are still ahead
                    started[g] = True
                    s, z = qparams(upcoming(members[g]), self.bits, self.sym)
                    if channel is not None:
                        s = integer_group_scales(s, channel)
                    scale[:, g], zero[:, g] = s, z
                grid["s"], grid["z"] = (static_scale[:, g], static_zero[:, g]) if self.static_groups else (scale[:, g],
                                                                                                           zero[:, g])
            q = quantize(current, grid["s"], grid["z"], self.bits)
            codes[:, col] = q
            return dequantize(q, grid["s"], grid["z"]).to(w.dtype)

        error_feedback(w, u, self.blocksize, column)
        if self.static_groups and grouped:
            scale, zero = static_scale.float(), static_zero.float()
        if perm is not None and not act_groups:
            codes, perm = in_input_order(codes, perm), None
        return QuantizedWeight(codes, scale, zero, self.bits, gs, perm, channel_scale=channel)


def error_feedback(w: torch.Tensor, u: torch.Tensor, blocksize: int, column) -> None:
    """GPTQ's column loop over w [N, K] (in place), lazy batches of `blocksize` columns: for each column k,
    w_hat = column(k, w[:, k], upcoming) with upcoming(width) the current (error-updated) w[:, k : k + width], or
    upcoming(positions) those columns (a LongTensor of positions >= k); e = (w[:, k] - w_hat) / U_kk,
    w[:, k + 1:] -= e U_k,k+1: (within the batch at once, beyond it after the batch). upcoming applies the batch's
    pending updates to the columns past the batch it returns, so what it sees (and so the codes) does not depend on
    blocksize, also for a group that straddles two batches."""
    n, k = w.shape
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1, err1, u1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=w.dtype, device=w.device), u[i1:i2, i1:i2]

        def upcoming(cols, i):
            if isinstance(cols, int):
                beyond = min(i2 + cols - (i2 - i1 - i), k)
                if beyond <= i2:
                    return w1[:, i:i + cols]
                return torch.cat([w1[:, i:], w[:, i2:beyond] - err1 @ u[i1:i2, i2:beyond]], dim=1)
            inside = cols < i2
            out = torch.empty(n, len(cols), dtype=w.dtype, device=w.device)
            out[:, inside] = w1[:, cols[inside] - i1]
            past = cols[~inside]
            out[:, ~inside] = w[:, past] - err1 @ u[i1:i2, past]
            return out

        with _one_cpu_thread(w.device):
            for i in range(i2 - i1):
                w_hat = column(i1 + i, w1[:, i], lambda width, i=i: upcoming(width, i))
                e = (w1[:, i] - w_hat) / u1[i, i]
                w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
                err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

"""SpQR (Dettmers et al., 2023): GPTQ over small bilevel groups, with Hessian-chosen fp16 outliers (tquant.formats.spqr).

Per linear (H, U = chol(H^-1)^T and the column loop as in GPTQ, act order by default, percdamp 1.0 as in SpQR):
    tau = outlier_relative_threshold * mean_k(var_n(W[:, k]) / U_kk^2)
    at the first column of each group of beta1 (group_size) columns, on the error-updated weights:
        unless simplified_outliers, weights whose leave-one-out gain (tquant.formats.spqr.outlier_gain) exceeds tau are
        replaced by their row's mean over the rest, then the bilevel grid is fitted (tquant.formats.spqr.bilevel_qparams)
    for each column k: q = Q(w_k); weights with ((w_k - deq q) / U_kk)^2 > tau become outliers (kept exactly,
        stored as w_k - deq q in fp16); e = (w_k - w_hat_k) / U_kk feeds back into the later columns
outlier_relative_threshold = inf turns outliers off (plain GPTQ on the bilevel grid). report() gives the exact
storage of the run in bits per parameter (SpQRWeight.storage_bits), by part, and the outlier fraction.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..formats.weights import SpQRWeight
from ..formats.quantizer import dequantize, quantize
from ..formats.spqr import bilevel_qparams, check_spqr_options, csr_of_mask, outlier_gain
from .base import option, register
from .gptq import GPTQ, error_feedback


@register
@dataclasses.dataclass
class SpQR(GPTQ):
    name = "spqr"

    bits: int = option(3, "bits of the dense weights: 2, 3 or 4")
    group_size: int = option(16, "beta1: input channels sharing a (quantized) scale and zero")
    sym: bool = option(False, "SpQR's grid is asymmetric (min-max with an integer zero); True is refused")
    percdamp: float = option(1.0, "damping added to diag(H), as a fraction of its mean (SpQR uses 1.0)")
    scale_bits: int = option(3, "bits of each group's scale code (with the zero, at most 8 bits a group)")
    stat_group: int = option(16, "beta2: consecutive output rows whose scales share one fp16 step and low")
    outlier_relative_threshold: float = option(0.2, "tau relative to the layer's mean var(W[:, k]) / U_kk^2; "
                                                    "inf = no outliers")
    simplified_outliers: bool = option(False, "skip the leave-one-out refit (outliers only by their own error)")

    def __post_init__(self):
        super().__post_init__()
        check_spqr_options(self.bits, self.scale_bits, self.stat_group)
        if self.sym:
            raise ValueError("SpQR's grid is asymmetric; sym=True is not supported")
        if self.static_groups:
            raise ValueError("SpQR fits each group on the error-updated weights; static_groups is not supported")
        if not self.outlier_relative_threshold > 0:
            raise ValueError(f"outlier_relative_threshold must be > 0 (inf: none), got {self.outlier_relative_threshold}")
        self._storage: dict[str, int] = {}
        self._params = self._outliers = 0

    def check_layer(self, linear, name) -> None:
        self.layer_group_size(linear, name)
        if linear.out_features % self.stat_group:
            raise ValueError(f"SpQR: layer {name!r} has out_features={linear.out_features}, not a multiple of "
                             f"stat_group={self.stat_group}")
        if linear.in_features > 2**16:
            raise ValueError(f"SpQR stores outlier columns in 16 bits: layer {name!r} has in_features="
                             f"{linear.in_features} > 65536")

    def quantize(self, state, linear, name) -> SpQRWeight:
        w, perm, u = self.prepared(state, linear, name)
        n, k = w.shape
        gs = self.layer_group_size(linear, name)
        d = u.diagonal()
        tau = self.outlier_relative_threshold * (w.var(dim=0) / d**2).mean().item()
        find = math.isfinite(tau)

        groups = k // gs
        codes = torch.empty(n, k, dtype=torch.int32, device=w.device)
        scale_codes, zero = (torch.empty(n, groups, dtype=torch.int32, device=w.device) for _ in range(2))
        step, low = (torch.empty(n // self.stat_group, groups, dtype=torch.float16, device=w.device) for _ in range(2))
        outlier = torch.zeros(n, k, dtype=torch.bool, device=w.device)
        residual = torch.zeros(n, k, dtype=w.dtype, device=w.device)
        grid = {}

        def column(col, current, upcoming):
            if col % gs == 0:
                group = upcoming(gs)
                if find and not self.simplified_outliers:
                    likely = outlier_gain(group, d[col:col + gs], self.bits) > tau
                    keep = (~likely).to(group.dtype)
                    mean = (group * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
                    group = torch.where(likely, mean, group)
                g = col // gs
                grid["s"], z, scale_codes[:, g], step[:, g], low[:, g] = bilevel_qparams(
                    group, self.bits, self.scale_bits, self.stat_group)
                grid["z"] = zero[:, g] = z
            q = quantize(current, grid["s"], grid["z"], self.bits)
            codes[:, col] = q
            w_hat = dequantize(q, grid["s"], grid["z"]).to(w.dtype)
            if find:
                outlier[:, col] = out = ((current - w_hat) / d[col]) ** 2 > tau
                residual[:, col] = torch.where(out, current - w_hat, 0).half().to(w.dtype)
                w_hat = w_hat + residual[:, col]
            return w_hat

        error_feedback(w, u, max(self.blocksize // gs, 1) * gs, column)  # groups never straddle a lazy batch
        row_ptr, cols, vals = csr_of_mask(residual, outlier, perm)
        qw = SpQRWeight(codes, scale_codes, zero, step, low, self.bits, gs, self.scale_bits, self.stat_group, row_ptr,
                        cols, vals, perm)
        for part, bits in qw.storage_bits().items():
            self._storage[part] = self._storage.get(part, 0) + bits
        self._params += n * k
        self._outliers += vals.numel()
        return qw

    def report(self) -> dict:
        if not self._params:
            return {}
        parts = {part: bits / self._params for part, bits in self._storage.items()}
        return {"avg_bits": sum(parts.values()), "bits_by_part": parts, "outlier_fraction": self._outliers / self._params}

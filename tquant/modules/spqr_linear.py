"""SpQRLinear: an nn.Linear replacement holding an SpQR weight (tquant.formats.weights.SpQRWeight; tquant.formats.spqr).

Buffers (tquant.kernels.spqr_matmul's layout):
    qweight  int32 [ceil(K / (32 // bits)), N]   dense codes, K-packed (tquant.formats.packing), storage order
    stats    uint8 [G, N]                       scale code | zero << scale_bits of each group
    meta     fp16 [2, G, N / stat_group]        second level (step, low): scale = code * step + low
    perm     int32 [K] or absent                (act-order storage): dense part reads x[..., perm]
    row_ptr  int32 [N + 1], cols int16 [nnz], vals fp16 [nnz]   outliers (CSR, input-order columns)
    bias     [N] or absent
forward: y = x @ (W_dense + S)^T + bias, the Triton kernels on CUDA (spqr_matmul), the torch reference on the CPU.
bits_per_parameter() counts every buffer but the bias over N * K.
"""
from __future__ import annotations

import torch

from ..formats.packing import pack_codes, values_per_word
from ..formats.weights import SpQRWeight
from .base import QuantizedLinear


class SpQRLinear(QuantizedLinear, spec_type="spqr_linear", weight_type=SpQRWeight):
    spec_fields = ("bits", "group_size", "scale_bits", "stat_group", "in_features", "out_features", "outliers",
                   "has_perm", "bias")

    def __init__(self, in_features, out_features, *, bits, group_size, scale_bits, stat_group, outliers, has_perm=False,
                 bias=False, dtype=torch.float16, device=None):
        if in_features % group_size or out_features % stat_group or scale_bits + bits > 8:
            raise ValueError(f"SpQRLinear needs group_size dividing in_features, stat_group dividing out_features and "
                             f"scale_bits + bits <= 8; got in={in_features}, out={out_features}, group_size="
                             f"{group_size}, stat_group={stat_group}, bits={bits}, scale_bits={scale_bits}")
        super().__init__(in_features, out_features, bias=bias, perm=has_perm, dtype=dtype, device=device)
        self.bits, self.group_size, self.scale_bits, self.stat_group = bits, group_size, scale_bits, stat_group
        groups = in_features // group_size
        words = -(-in_features // values_per_word(bits))
        for name, shape, dt in (("qweight", (words, out_features), torch.int32), ("stats", (groups, out_features),
                                torch.uint8), ("meta", (2, groups, out_features // stat_group), torch.float16),
                                ("row_ptr", (out_features + 1,), torch.int32), ("cols", (outliers,), torch.int16),
                                ("vals", (outliers,), torch.float16)):
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))

    @classmethod
    def from_quantized(cls, qw: SpQRWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> "SpQRLinear":
        n, k = qw.codes.shape
        mod = cls(k, n, bits=qw.bits, group_size=qw.group_size, scale_bits=qw.scale_bits, stat_group=qw.stat_group,
                  outliers=qw.vals.numel(), has_perm=qw.perm is not None, bias=bias is not None, dtype=dtype,
                  device=qw.codes.device)
        mod.qweight.copy_(pack_codes(qw.codes, qw.bits))
        mod.stats.copy_((qw.scale_codes | qw.zero << qw.scale_bits).t())
        mod.meta.copy_(torch.stack([qw.step.t(), qw.low.t()]))
        mod.row_ptr.copy_(qw.row_ptr)
        mod.cols.copy_(qw.cols.to(torch.int32).to(torch.int16))  # two's complement: read back as unsigned
        mod.vals.copy_(qw.vals)
        mod.copy_optional(perm=qw.perm, bias=bias)
        return mod

    def spec_value(self, key: str):
        return self.vals.numel() if key == "outliers" else super().spec_value(key)

    def validate_buffers(self, check) -> None:
        check("qweight", self.qweight, torch.int32)
        check("stats", self.stats, torch.uint8, hi=2 ** (self.scale_bits + self.bits) - 1)  # scale code | zero
        check("meta", self.meta, torch.float16)
        check("vals", self.vals, torch.float16)
        nnz, n = self.vals.numel(), self.out_features
        ptr = check("row_ptr", self.row_ptr, torch.int32).to(torch.int64)
        if ptr[0] != 0 or ptr[-1] != nnz:
            check.fail("row_ptr", f"must start at 0 and end at nnz={nnz}, got {int(ptr[0])} .. {int(ptr[-1])}")
        drop = (ptr[1:] < ptr[:-1]).nonzero()
        if drop.numel():
            i = int(drop[0])
            check.fail("row_ptr", f"not monotone: row {i} ends at {int(ptr[i + 1])} before it starts at {int(ptr[i])} "
                                  f"(of {n} rows)")
        cols = check("cols", self.cols, torch.int16).to(torch.int64) & 0xFFFF  # unsigned, as the kernels read them
        bad = (cols >= self.in_features).nonzero()
        if bad.numel():
            i = int(bad[0])
            check.fail("cols", f"column {int(cols[i])} at {i} is outside 0..{self.in_features - 1}")

    def bits_per_parameter(self) -> float:
        stored = sum(b.numel() * b.element_size() * 8 for name, b in self.named_buffers() if name != "bias")
        return stored / (self.in_features * self.out_features)

    def _matmul(self, x2: torch.Tensor, kernel: bool) -> torch.Tensor:
        from ..kernels.spqr_matmul import spqr_matmul, spqr_matmul_ref

        matmul = spqr_matmul if kernel else spqr_matmul_ref
        return matmul(x2, self.qweight, self.stats, self.meta, self.row_ptr, self.cols, self.vals, bits=self.bits,
                      group_size=self.group_size, scale_bits=self.scale_bits, stat_group=self.stat_group,
                      perm=self.perm, bias=self.bias_as(x2.dtype))

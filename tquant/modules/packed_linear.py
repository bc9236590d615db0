"""PackedLinear: an nn.Linear replacement holding a K-packed 2/3/4/8-bit weight (tquant.formats.packing).

Buffers (the layout every weight-only kernel reads):
    qweight int32 [ceil(K / (32 // bits)), N]     packed codes
    scales  [G, N], zeros [G, N]                  float, G = K // group_size, zeros integer-valued
    perm    int32 [K] (only with act-order storage): y = x[..., perm] @ W^T
    bias    [N] (optional)
    W[n, k] = (code(k, n) - zeros[k // group_size, n]) * scales[k // group_size, n]
forward: a Triton kernel on CUDA (or on CPU under TRITON_INTERPRET=1 with backend="triton"), else the
torch path: on CPU tensors tquant.kernels.cpu_matmul.packed_matmul (the exact fp32 weight dequantized in 5 passes, in
L2-sized K chunks at small M, and fp32 matmuls; torch's CPU int4 kernel only with cpu_matmul.USE_INT4, off: measured
slower), on other devices the reference (dequantize + matmul). Both compute in fp32.
cache_weights (opt-in, off by default) keeps a dequantized weight on the CPU path instead, a plain matmul per
forward: True / "float32" the fp32 weight (the float model's 4 bytes a weight on top of the packed ones, the
reference's values), "bfloat16" the weight rounded to bf16 and a bf16 matmul (2 bytes a weight, bf16 accuracy).
cpu_precision = "bfloat16" (opt-in; default "float32", the reference's fp32 maths) computes in bf16 without a kept
dequantized weight (cpu_matmul.bf16_packed_matmul: torch's int4 kernel at small M for 4-bit layers, whose code layout
it keeps, 0.5 byte a weight; the weight rounded to bf16 and a bf16 matmul at large M).
"""
from __future__ import annotations

import torch

from ..formats.weights import QuantizedWeight
from .base import QuantizedLinear
from .packed_weight import check_grid, load_packed, register_packed


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor (made under torch.inference_mode) counts no versions; it cannot change
        return 0


class PackedLinear(QuantizedLinear, spec_type="packed_linear", weight_type=QuantizedWeight):
    spec_fields = ("bits", "group_size", "in_features", "out_features", "bias", "has_perm")

    def __init__(self, in_features, out_features, *, bits, group_size, bias=False, has_perm=False,
                 dtype=torch.float16, device=None):
        super().__init__(in_features, out_features, bias=bias, perm=has_perm, dtype=dtype, device=device)
        register_packed(self, in_features, out_features, bits=bits, group_size=group_size, dtype=dtype, device=device)
        self.bits, self.group_size = bits, group_size
        self.cache_weights = False
        self.cpu_precision = "float32"
        self._cpu_cache = None  # (key, kind, tensor): the CPU path's derived weight (cpu_matmul), not saved

    @classmethod
    def stores(cls, qw: QuantizedWeight) -> bool:
        return qw.act_bits is None  # weight-only; ActQuantLinear takes the rest

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> "PackedLinear":
        n, k = qw.codes.shape
        mod = cls(k, n, bits=qw.bits, group_size=qw.group_size, bias=bias is not None,
                  has_perm=qw.perm is not None, dtype=dtype, device=qw.codes.device)
        load_packed(mod, qw)
        mod.copy_optional(perm=qw.perm, bias=bias)
        return mod

    def validate_buffers(self, check) -> None:
        check("qweight", self.qweight, torch.int32)  # every bit pattern is a code in [0, 2^bits)
        check("scales", self.scales, "model")
        check("zeros", self.zeros, "model")
        check_grid(check, "qweight", self.qweight, self.scales, self.zeros, self.bits, self.group_size)

    def _cpu_weight(self, kind: str, make):
        """The derived weight of `kind` ("int4": pack_int4's codes, "int4bf16": those and the bf16 scale_zeros,
        "dense" / "bf16": the fp32 / bf16 weight), made by make() once and kept until qweight, scales or zeros change
        (another tensor or an in-place write)."""
        key = tuple((t.data_ptr(), _version(t)) for t in (self.qweight, self.scales, self.zeros))
        cache = self._cpu_cache
        if cache is None or cache[0] != key or cache[1] != kind:
            self._cpu_cache = cache = (key, kind, make())
        return cache[2]

    def _cpu_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        from ..kernels import cpu_matmul as cpu
        from ..kernels.weight_only_matmul import check_inputs

        x = x2.to(self.scales.dtype)
        k, g = self.in_features, self.group_size
        g = check_inputs(x, self.qweight, self.scales, self.zeros, self.bits, g, k, self.perm, self.bias)
        kw = dict(perm=self.perm, bias=self.bias)
        if self.cache_weights in ("bfloat16", torch.bfloat16):
            w = self._cpu_weight("bf16", lambda: cpu.dequantize_fast(self.qweight, self.scales, self.zeros,
                                                                      self.bits, g, k).bfloat16())
            return cpu.bf16_matmul(x, w, **kw).to(x2.dtype)
        if self.cache_weights:
            w = self._cpu_weight("dense", lambda: cpu.dequantize_fast(self.qweight, self.scales, self.zeros,
                                                                       self.bits, g, k))
            return cpu.dense_matmul(x, w, **kw).to(x2.dtype)
        kernel_group = cpu.int4_group(self.bits, g, k, self.out_features)
        if self.cpu_precision in ("bfloat16", torch.bfloat16):
            int4 = None
            if kernel_group is not None and x.shape[0] <= cpu.SMALL_M:
                int4 = (kernel_group, *self._cpu_weight("int4bf16", lambda: (
                    cpu.pack_int4(self.qweight, k),
                    cpu.scale_zeros(self.scales, self.zeros, g, kernel_group).bfloat16())))
            return cpu.bf16_packed_matmul(x, self.qweight, self.scales, self.zeros, bits=self.bits, group_size=g, k=k,
                                          int4=int4, **kw).to(x2.dtype)
        if kernel_group is not None and cpu.USE_INT4:
            packed = self._cpu_weight("int4", lambda: cpu.pack_int4(self.qweight, k))
            return cpu.int4_matmul(x, packed, self.scales, self.zeros, group_size=g, kernel_group=kernel_group,
                                   **kw).to(x2.dtype)
        self._cpu_cache = None
        return cpu.packed_matmul(x, self.qweight, self.scales, self.zeros, bits=self.bits, group_size=g, k=k,
                                 **kw).to(x2.dtype)

    def _matmul(self, x2: torch.Tensor, kernel: bool) -> torch.Tensor:
        from ..kernels.weight_only_matmul import weight_only_matmul, weight_only_matmul_ref

        if not kernel and x2.device.type == "cpu" and self.qweight.device.type == "cpu":
            return self._cpu_matmul(x2)
        fn = weight_only_matmul if kernel else weight_only_matmul_ref
        y = fn(x2.to(self.scales.dtype), self.qweight, self.scales, self.zeros, bits=self.bits,
               group_size=self.group_size, in_features=self.in_features, perm=self.perm, bias=self.bias)
        return y.to(x2.dtype)

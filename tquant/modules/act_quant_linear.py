"""ActQuantLinear: an nn.Linear replacement that quantizes its input per token and runs an int8 GEMM.

    y = dequant( Q_a(x / smooth) . Q_w(W)^T ) + bias
    Q_a: per-token dynamic (or static per-tensor, act_scale) symmetric act_bits quantization (act_quant)
Formats (weight bits / activation bits) and buffers:
    W8A8: qweight int8 [N, K], w_scale fp32 [N]                                  -> w8a8_gemm.w8a8_matmul
    W4A8: qweight int32 [ceil(K / 8), N] (codes c), w_scale fp32 [N],
          group_scale int8 [K // group_size, N] when grouped (QQQ's integer grid)  -> w4a8_gemm.w4a8_matmul
          and group_zero int8 [K // group_size, N] with zero points (QoQ's progressive grid, per group or
          one group per channel): w8 = (c - zero) * group_scale; without it zero = 8
    W4A4: as W4A8, with 4-bit activation codes held one per int8                   -> w4a8_matmul
          (Hopper has no int4 MMA: unpacking packed nibbles in the GEMM measured 2.7x slower on the H100
          than reading int8-held codes, so the packed w4a8_matmul(act_bits=4) path is not used here)
    smooth fp32 [K] (run-time SmoothQuant divisor), act_scale fp32 [1] (static scale) and perm int32 [K] (QoQ's
    channel reordering: storage column k holds input channel perm[k], so x[..., perm] is quantized) only when used.
w4a8_quantize_weight makes W4A8 buffers (QQQ's grid, or QoQ's) from a float weight, for the kernels' tests and
benchmarks.
forward: Triton kernels on CUDA (or on CPU under TRITON_INTERPRET=1 with backend="triton"), else the torch
references, which give the same codes and the exact integer products.
"""
from __future__ import annotations

import torch

from ..formats.packing import pack_codes
from ..formats.quantizer import expand_groups
from ..formats.weights import QuantizedWeight
from ..kernels.runtime import DTYPES
from .base import QuantizedLinear

FORMATS = ((8, 8), (4, 8), (4, 4))  # (weight bits, activation bits)


def int8_gemm_weight(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The tensors the int8 tensor-core GEMMs read (w8a8_gemm, w4a8_gemm) from a method's weight qw:
        8 bits: (wq int8 [N, K] = codes - 128, w_scale fp32 [N], None, None)     symmetric, per-channel only
        4 bits: (qweight int32 [ceil(K / 8), N] = packed codes, w_scale fp32 [N],
                 group_scale int8 [G, N] = scale / channel_scale (or None: per-channel, symmetric),
                 group_zero int8 [G, N] = zero (or None: zero 8, QQQ's symmetric grid))
    with (code - zero) * group_scale an int8 value for every weight (checked here). Columns are in storage
    order: with a perm, the layer multiplies x[..., perm] (ActQuantLinear's perm buffer)."""
    n, k = qw.codes.shape
    if qw.bits not in (4, 8):
        raise ValueError(f"the int8 GEMMs take 4- or 8-bit weights, not {qw.bits}-bit")
    sym = bool(torch.all(qw.zero == 2 ** (qw.bits - 1)))
    if qw.bits == 8:
        if not sym or qw.group_size != k:
            raise ValueError("8-bit weights for the int8 GEMM must be symmetric (sym=True) and per-channel "
                             "(group_size=-1)")
        return (qw.codes - 128).to(torch.int8).contiguous(), qw.scale[:, 0].float().contiguous(), None, None
    qweight = pack_codes(qw.codes, 4)
    if qw.group_size == k and sym:
        return qweight, qw.scale[:, 0].float().contiguous(), None, None
    if qw.channel_scale is None:
        raise ValueError("4-bit grouped or zero-point weights for the W4A8 GEMM need integer group scales (QQQ's "
                         "grid: quantize with integer_groups; QoQ's: from_progressive)")
    channel = qw.channel_scale
    mult = torch.round(qw.scale / channel[:, None])
    if mult.min() < 1 or mult.max() > 127 or not torch.allclose(mult * channel[:, None], qw.scale,
                                                                 rtol=1e-5, atol=0):
        raise ValueError("group scales are not integer multiples of channel_scale")
    w8 = (qw.codes - expand_groups(qw.zero, qw.group_size)) * expand_groups(mult, qw.group_size)
    if w8.min() < -128 or w8.max() > 127:
        raise ValueError(f"(code - zero) * group scale reaches {int(w8.min())} .. {int(w8.max())}, outside int8: "
                         "the W4A8 GEMM's main loop would overflow (QoQ: quantize within the protective range)")
    return (qweight, channel.float().contiguous(), mult.t().to(torch.int8).contiguous(),
            None if sym else qw.zero.t().to(torch.int8).contiguous())


def w4a8_quantize_weight(w: torch.Tensor, *, group_size: int | None = None, zero_point: bool = False):
    """Float w [N, K] -> (qweight int32 [ceil(K / 8), N], w_scale fp32 [N], group_scale int8 [K // gs, N] or None,
    group_zero int8 [K // gs, N] or None), tquant.kernels.w4a8_gemm's operands, round-to-nearest by tquant's one
    quantizer: symmetric with per-group scales on QQQ's integer grid (QuantizedWeight.from_rtn, multiples 1..15, so
    |q * sg| <= 120), or with zero_point=True QoQ's progressive grid (QuantizedWeight.from_progressive; needs
    group_size)."""
    if group_size is not None and w.shape[1] % group_size:
        raise ValueError(f"group_size={group_size} must divide K={w.shape[1]}")
    if zero_point:
        if group_size is None:
            raise ValueError("zero_point=True (QoQ's grid) needs a group_size (K: one group per channel)")
        qw = QuantizedWeight.from_progressive(w, group_size)
    else:
        qw = QuantizedWeight.from_rtn(w, 4, group_size or w.shape[1], sym=True, integer_groups=True)
    qweight, w_scale, group_scale, group_zero = int8_gemm_weight(qw)
    if group_size is not None and group_scale is None:  # one group spanning K with every zero 8 (int8_gemm_weight
        group_scale = torch.ones(1, w.shape[0], dtype=torch.int8)  # calls that per-channel): multiples of 1
    return qweight, w_scale, group_scale, group_zero


class ActQuantLinear(QuantizedLinear, spec_type="act_quant_linear", weight_type=QuantizedWeight):
    spec_fields = ("bits", "act_bits", "group_size", "in_features", "out_features", "bias", "smooth", "static",
                   "zero", "perm")
    spec_defaults = {"zero": False, "perm": False}
    perm_field = "perm"
    buffer_flags = {"smooth": "smooth", "static": "act_scale", "zero": "group_zero"}

    def __init__(self, in_features, out_features, *, bits, act_bits, group_size, bias=False, smooth=False,
                 static=False, zero=False, perm=False, dtype=torch.float16, device=None):
        if (bits, act_bits) not in FORMATS:
            raise ValueError(f"W{bits}A{act_bits} has no int8 GEMM; supported: "
                             f"{', '.join(f'W{w}A{a}' for w, a in FORMATS)}")
        if in_features % group_size or (bits == 8 and group_size != in_features):
            raise ValueError(f"group_size={group_size} is not valid for W{bits} with in_features={in_features} "
                             "(8-bit: per-channel only; 4-bit: a divisor of in_features)")
        if zero and bits != 4:
            raise ValueError(f"zero points are for 4-bit weights (QoQ's W4A8), not W{bits}")
        super().__init__(in_features, out_features, bias=bias, perm=perm, dtype=dtype, device=device)
        self.bits, self.act_bits, self.group_size = bits, act_bits, group_size
        k, n = in_features, out_features
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8, device=device))
        else:
            self.register_buffer("qweight", torch.zeros(-(-k // 8), n, dtype=torch.int32, device=device))
        self.register_buffer("w_scale", torch.zeros(n, dtype=torch.float32, device=device))
        grouped = group_size != in_features or zero
        self.register_buffer("group_scale", torch.zeros(k // group_size, n, dtype=torch.int8, device=device)
                             if grouped else None)
        self.register_buffer("group_zero", torch.zeros(k // group_size, n, dtype=torch.int8, device=device)
                             if zero else None)
        self.register_buffer("smooth", torch.ones(k, dtype=torch.float32, device=device) if smooth else None)
        self.register_buffer("act_scale", torch.ones(1, dtype=torch.float32, device=device) if static else None)

    @classmethod
    def stores(cls, qw: QuantizedWeight) -> bool:
        return qw.act_bits is not None  # quantizes activations; PackedLinear takes weight-only

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> "ActQuantLinear":
        n, k = qw.codes.shape
        qweight, w_scale, group_scale, group_zero = int8_gemm_weight(qw)
        mod = cls(k, n, bits=qw.bits, act_bits=qw.act_bits, group_size=qw.group_size, bias=bias is not None,
                  smooth=qw.smooth is not None, static=qw.act_scale is not None, zero=group_zero is not None,
                  perm=qw.perm is not None, dtype=dtype, device=qw.codes.device)
        mod.qweight.copy_(qweight)
        mod.w_scale.copy_(w_scale)
        smooth = qw.smooth if qw.smooth is None or qw.perm is None else qw.smooth[qw.perm]  # on x[..., perm]
        mod.copy_optional(group_scale=group_scale, group_zero=group_zero, smooth=smooth, act_scale=qw.act_scale,
                          perm=qw.perm, bias=bias)
        return mod

    def validate_buffers(self, check) -> None:
        check("qweight", self.qweight, torch.int8 if self.bits == 8 else torch.int32)
        check("w_scale", self.w_scale, torch.float32)
        check("group_scale", self.group_scale, torch.int8, lo=1, hi=127)  # int8_gemm_weight's integer multiples
        check("group_zero", self.group_zero, torch.int8, lo=0, hi=2**self.bits - 1)
        check("smooth", self.smooth, torch.float32, positive=True)  # a divisor of x
        check("act_scale", self.act_scale, torch.float32, positive=True)

    def _matmul(self, x2: torch.Tensor, kernel: bool) -> torch.Tensor:
        from ..kernels import act_quant
        from ..kernels import w4a8_gemm
        from ..kernels import w8a8_gemm

        if self.perm is not None:
            x2 = x2[:, self.perm]
        quant = act_quant.quantize_activations if kernel else act_quant.quantize_activations_ref
        xq, x_scale = quant(x2, bits=self.act_bits, smooth=self.smooth, scale=self.act_scale, pack=False)
        out_dtype = x2.dtype if x2.dtype in DTYPES else torch.float32
        if self.bits == 8:
            gemm = w8a8_gemm.w8a8_matmul if kernel else w8a8_gemm.w8a8_matmul_ref
            return gemm(xq, x_scale, self.qweight, self.w_scale, bias=self.bias, out_dtype=out_dtype)
        gemm = w4a8_gemm.w4a8_matmul if kernel else w4a8_gemm.w4a8_matmul_ref
        return gemm(xq, x_scale, self.qweight, self.w_scale, group_scale=self.group_scale, group_zero=self.group_zero,
                    group_size=self.group_size if self.group_scale is not None else None, bias=self.bias,
                    out_dtype=out_dtype)

    def probe_exact(self) -> bool:
        return self.act_scale is None  # per-token dynamic grids only

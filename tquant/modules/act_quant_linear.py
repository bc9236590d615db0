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
from torch import nn

from ..formats.weights import QuantizedWeight
from ..kernels.runtime import DTYPES
from .backend import use_kernel

FORMATS = ((8, 8), (4, 8), (4, 4))  # (weight bits, activation bits)


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
    qweight, w_scale, group_scale, group_zero = qw.int8_gemm_weight()
    if group_size is not None and group_scale is None:  # one group spanning K with every zero 8 (int8_gemm_weight
        group_scale = torch.ones(1, w.shape[0], dtype=torch.int8)  # calls that per-channel): multiples of 1
    return qweight, w_scale, group_scale, group_zero


class ActQuantLinear(nn.Module):
    def __init__(self, in_features, out_features, *, bits, act_bits, group_size, bias=False, smooth=False,
                 static=False, zero=False, perm=False, dtype=torch.float16, device=None):
        super().__init__()
        if (bits, act_bits) not in FORMATS:
            raise ValueError(f"W{bits}A{act_bits} has no int8 GEMM; supported: "
                             f"{', '.join(f'W{w}A{a}' for w, a in FORMATS)}")
        if in_features % group_size or (bits == 8 and group_size != in_features):
            raise ValueError(f"group_size={group_size} is not valid for W{bits} with in_features={in_features} "
                             "(8-bit: per-channel only; 4-bit: a divisor of in_features)")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.act_bits, self.group_size = bits, act_bits, group_size
        self.backend = "auto"
        k, n = in_features, out_features
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8, device=device))
        else:
            self.register_buffer("qweight", torch.zeros(-(-k // 8), n, dtype=torch.int32, device=device))
        self.register_buffer("w_scale", torch.zeros(n, dtype=torch.float32, device=device))
        if zero and bits != 4:
            raise ValueError(f"zero points are for 4-bit weights (QoQ's W4A8), not W{bits}")
        grouped = group_size != in_features or zero
        self.register_buffer("group_scale", torch.zeros(k // group_size, n, dtype=torch.int8, device=device)
                             if grouped else None)
        self.register_buffer("group_zero", torch.zeros(k // group_size, n, dtype=torch.int8, device=device)
                             if zero else None)
        self.register_buffer("smooth", torch.ones(k, dtype=torch.float32, device=device) if smooth else None)
        self.register_buffer("act_scale", torch.ones(1, dtype=torch.float32, device=device) if static else None)
        self.register_buffer("perm", torch.arange(k, dtype=torch.int32, device=device) if perm else None)
        self.register_buffer("bias", torch.zeros(n, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> "ActQuantLinear":
        n, k = qw.codes.shape
        qweight, w_scale, group_scale, group_zero = qw.int8_gemm_weight()
        mod = cls(k, n, bits=qw.bits, act_bits=qw.act_bits, group_size=qw.group_size, bias=bias is not None,
                  smooth=qw.smooth is not None, static=qw.act_scale is not None, zero=group_zero is not None,
                  perm=qw.perm is not None, dtype=dtype, device=qw.codes.device)
        mod.qweight.copy_(qweight)
        mod.w_scale.copy_(w_scale)
        smooth = qw.smooth if qw.smooth is None or qw.perm is None else qw.smooth[qw.perm]  # on x[..., perm]
        for name, value in (("group_scale", group_scale), ("group_zero", group_zero), ("smooth", smooth),
                            ("act_scale", qw.act_scale), ("perm", qw.perm), ("bias", bias)):
            if value is not None:
                getattr(mod, name).copy_(value.detach().reshape(getattr(mod, name).shape))
        return mod

    def layer_spec(self) -> dict:
        """What tquant.load needs to rebuild this module (stored in the saved quantization_config)."""
        return {"type": "act_quant_linear", "bits": self.bits, "act_bits": self.act_bits,
                "group_size": self.group_size, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "smooth": self.smooth is not None, "static": self.act_scale is not None,
                "zero": self.group_zero is not None, "perm": self.perm is not None}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype) -> "ActQuantLinear":
        return cls(spec["in_features"], spec["out_features"], bits=spec["bits"], act_bits=spec["act_bits"],
                   group_size=spec["group_size"], bias=spec["bias"], smooth=spec["smooth"], static=spec["static"],
                   zero=spec.get("zero", False), perm=spec.get("perm", False), dtype=dtype, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import act_quant
        from ..kernels import w4a8_gemm
        from ..kernels import w8a8_gemm

        kernel = use_kernel(self, x)
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        quant = act_quant.quantize_activations if kernel else act_quant.quantize_activations_ref
        xq, x_scale = quant(x2, bits=self.act_bits, smooth=self.smooth, scale=self.act_scale, pack=False)
        out_dtype = x.dtype if x.dtype in DTYPES else torch.float32
        if self.bits == 8:
            gemm = w8a8_gemm.w8a8_matmul if kernel else w8a8_gemm.w8a8_matmul_ref
            y = gemm(xq, x_scale, self.qweight, self.w_scale, bias=self.bias, out_dtype=out_dtype)
        else:
            gemm = w4a8_gemm.w4a8_matmul if kernel else w4a8_gemm.w4a8_matmul_ref
            y = gemm(xq, x_scale, self.qweight, self.w_scale, group_scale=self.group_scale,
                     group_zero=self.group_zero, group_size=self.group_size if self.group_scale is not None else None,
                     bias=self.bias, out_dtype=out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, W{self.bits}A{self.act_bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, smooth={self.smooth is not None}, "
                f"static={self.act_scale is not None}, zero={self.group_zero is not None}, perm={self.perm is not None}")

"""FP8: float8 e4m3 weights per output channel, with e4m3 activations (W8A8) or without (weight-only, W8A16).

    weights      Wq[n, k] = E(W[n, k] / s_w[n]),   s_w[n] = max_k |W[n, k]| / 448       (round to nearest e4m3)
    activations  per token, dynamic (default): s_x[m] = max_k |x[m, k]| / 448 at run time, xq = E(x / s_x)
                 act_static=True: one s_x per layer, the largest |x| its input reached on the calibration set / 448
                 (inputs beyond it saturate at +-448 s_x)
                 weight_only=True: none, activations stay in the model's dtype
    y = (xq . Wq^T) s_x s_w + bias   (weight-only: y = (x . Wq^T) s_w + bias)
E is torch.float8_e4m3fn's cast (ties to even, +-448 at most, subnormal steps of 2^-9 s); the kernels and the
references are tquant.kernels.fp8_gemm, the module tquant.modules.FP8Linear. Data-free except with act_static (the
calibration passes then gather each input's largest |x|, with the layers before it already simulated). While the
driver runs, each quantized nn.Linear simulates its layer: its weight is Wq s_w and its input is fake-quantized
(E(x / s_x) s_x) unless weight-only.
"""
from __future__ import annotations

import dataclasses

import torch

from ..formats.weights import FP8Weight
from ..kernels.fp8_gemm import E4M3_MAX, fake_quantize_fp8, quantize_fp8_ref
from .base import LayerState, Method, option, register


class AbsMaxState(LayerState):
    """The largest |x| of the layer's input over the calibration set (float32 scalar)."""

    def __init__(self, name, linear):
        super().__init__(name, linear)
        self.absmax = torch.zeros((), dtype=torch.float32, device=linear.weight.device)

    def _accumulate(self, x):
        self.absmax = torch.maximum(self.absmax, x.detach().abs().max().float())


@register
@dataclasses.dataclass
class FP8(Method):
    name = "fp8"
    needs_calibration = False
    needs_layer_stats = False
    state_class = AbsMaxState

    bits: int = option(8, "weight bits: 8 only (float8 e4m3)")
    group_size: int = option(-1, "-1 only: one scale per output channel")
    act_static: bool = option(False, "one static activation scale per layer from calibration (max |x| / 448; needs "
                                     "calib=), else per-token dynamic")
    weight_only: bool = option(False, "FP8 weights only (W8A16): activations stay in the model's dtype")

    def __post_init__(self):
        if self.bits != 8:
            raise ValueError(f"fp8 stores 8-bit float (e4m3) weights: drop bits={self.bits} or give bits=8")
        if self.group_size not in (-1, None):
            raise ValueError(f"fp8 keeps one scale per output channel: drop group_size={self.group_size} or give -1")
        if not self.sym:
            raise ValueError("fp8 weights are symmetric (a sign bit, no zero point): drop sym=False / --asym")
        if self.act_static and self.weight_only:
            raise ValueError("act_static=True quantizes activations, weight_only=True does not: choose one")
        self.group_size = -1
        self.needs_calibration = self.needs_layer_stats = self.act_static
        self.static_scale: dict[str, torch.Tensor] = {}  # layer name -> s_x [1], filled by quantize

    def quantize(self, state, linear, name) -> FP8Weight:
        weight, scale = quantize_fp8_ref(linear.weight.detach())
        act_scale = None
        if self.act_static:
            if state.n_batches == 0:
                raise ValueError(f"layer {name!r}: act_static=True needs the calibration activations entering it, "
                                 "and none reached it")
            act_scale = (state.absmax / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
            self.static_scale[name] = act_scale
        return FP8Weight(weight, scale, act_bits=None if self.weight_only else 8, act_scale=act_scale)

    def input_transform(self, name):
        if self.weight_only:
            return None
        scale = self.static_scale.get(name)
        return lambda x: fake_quantize_fp8(x, scale=scale).to(x.dtype)

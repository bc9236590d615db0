"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights, then W8A8.

Per block, from calibration: the per-channel maxima of each input group's activations (tquant.calib.smoothing),
s = max|X|^alpha / max|W|^(1 - alpha), folded into the preceding norm / linear where one absorbs it exactly,
else applied at run time by the activation-quantization kernel. Weights: symmetric round-to-nearest,
8-bit per output channel (or 4-bit). Activations: per-token dynamic, or static per-tensor (act_static: the
largest |x / s| seen in calibration / 127).
"""
from __future__ import annotations

import dataclasses

from ..calib.smoothing import SmoothedGroup, find_absorber, input_absmax
from .base import register, option
from .weight_activation import WeightActivationMethod


@register
@dataclasses.dataclass
class SmoothQuant(WeightActivationMethod):
    name = "smoothquant"

    alpha: float = option(0.5, "migration strength: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)")
    act_static: bool = option(False, "static per-tensor activation scales from calibration (else per-token dynamic)")

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def prepare_block(self, block, linears, groups, inputs, prefix):
        amax = input_absmax(block, {g[0]: linears[g[0]] for g in groups}, inputs)
        for g in groups:
            group = [linears[n] for n in g]
            smoothed = SmoothedGroup(group, find_absorber(block, group, inputs), amax[g[0]], self.alpha)
            self.keep_smoothing(smoothed, g, prefix)
            if self.act_static:
                for n in g:
                    self.static_scale[prefix + n] = self.static_scale_of(amax[g[0]] / smoothed.s)

    def quantize(self, state, linear, name):
        return self.finish(self.rtn(linear.weight, linear, name), name)

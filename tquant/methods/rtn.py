"""Round-to-nearest: per-group min-max (or symmetric abs-max) uniform quantization, no calibration."""
from __future__ import annotations

import dataclasses

from ..qweight import QuantizedWeight
from ..quantizer import expand_groups, grouped_qparams, quantize
from .base import Method, register


@register
@dataclasses.dataclass
class RTN(Method):
    name = "rtn"
    needs_calibration = False

    def quantize(self, state, linear, name) -> QuantizedWeight:
        w = linear.weight.detach().float()
        gs = self.layer_group_size(linear, name)
        scale, zero = grouped_qparams(w, self.bits, gs, self.sym)
        codes = quantize(w, expand_groups(scale, gs), expand_groups(zero, gs), self.bits)
        return QuantizedWeight(codes, scale, zero, self.bits, gs)

"""Round-to-nearest: per-group min-max (or symmetric abs-max) uniform quantization, no calibration."""
from __future__ import annotations

import dataclasses

from ..formats.weights import QuantizedWeight
from .base import Method, register


@register
@dataclasses.dataclass
class RTN(Method):
    name = "rtn"
    needs_calibration = False

    def quantize(self, state, linear, name) -> QuantizedWeight:
        return QuantizedWeight.from_rtn(linear.weight, self.bits, self.layer_group_size(linear, name), self.sym)

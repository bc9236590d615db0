"""BCQ (binary-coding quantization, LUT-GEMM's format), data-free: W ~= sum_i alpha_i B_i per output row and group
(tquant.bcq). grid="bcq" searches alphas and signs (rounds 0 greedy, 1 refined greedy, >= 2 alternating);
grid="rtn" takes the round-to-nearest uniform grid and converts it exactly (alphas s 2^(i-1) plus an offset), so
the same kernel runs uniform weights (GPTQ's too: tquant.qweight.BCQWeight.from_uniform)."""
from __future__ import annotations

import dataclasses

from ..bcq import check_bcq_bits, search
from ..qweight import BCQWeight, QuantizedWeight
from .base import Method, option, register

GRIDS = ("bcq", "rtn")


@register
@dataclasses.dataclass
class BCQ(Method):
    name = "bcq"
    needs_calibration = False
    needs_layer_stats = False

    bits: int = option(4, "binary planes q: 1, 2, 3 or 4")
    rounds: int = option(30, "search rounds: 0 greedy, 1 refined greedy (least-squares alphas), >= 2 alternating")
    grid: str = option("bcq", "'bcq': BCQ's search; 'rtn': the min-max uniform grid, converted exactly")

    def __post_init__(self):
        check_bcq_bits(self.bits)
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}; got {self.grid!r}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0; got {self.rounds}")
        if self.grid == "rtn" and self.bits == 1:
            raise ValueError("grid='rtn' needs bits 2, 3 or 4")

    def check_layer(self, linear, name) -> None:
        group = self.layer_group_size(linear, name)
        if linear.in_features % 32 or group % 32:
            raise ValueError(f"BCQ packs 32 input channels a word: layer {name!r} has in_features="
                             f"{linear.in_features} and group_size {group}; both must be multiples of 32")

    def quantize(self, state, linear, name) -> BCQWeight:
        group = self.layer_group_size(linear, name)
        if self.grid == "rtn":
            return BCQWeight.from_uniform(QuantizedWeight.from_rtn(linear.weight, self.bits, group, sym=False))
        return BCQWeight(*search(linear.weight, self.bits, group, self.rounds))

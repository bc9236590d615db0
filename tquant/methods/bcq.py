"""BCQ (binary-coding quantization, LUT-GEMM's format): W ~= sum_i alpha_i B_i per output row and group (tquant.formats.bcq).
grid="bcq" (data-free) searches alphas and signs (rounds 0 greedy, 1 refined greedy, >= 2 alternating), with
offset=True an offset per group too;
grid="rtn" (data-free) and grid="gptq" (calibrated: GPTQ with its defaults, act order, asymmetric) take a uniform
grid and convert it exactly (alphas s 2^(i-1) plus an offset; tquant.formats.weights.BCQWeight.from_uniform), so BCQ's
kernel runs uniform weights too."""
from __future__ import annotations

import dataclasses

from ..formats.bcq import check_bcq_bits, search
from ..formats.weights import BCQWeight, QuantizedWeight
from .base import Method, option, register
from .gptq import GPTQ

GRIDS = ("bcq", "rtn", "gptq")


@register
@dataclasses.dataclass
class BCQ(Method):
    name = "bcq"

    bits: int = option(4, "binary planes q: 1, 2, 3 or 4")
    rounds: int = option(30, "search rounds: 0 greedy, 1 refined greedy (least-squares alphas), >= 2 alternating")
    grid: str = option("bcq", "'bcq': BCQ's search; 'rtn' / 'gptq': that uniform grid (asymmetric), converted exactly")
    offset: bool = option(False, "grid 'bcq': search an offset per group too (W ~= sum_i alpha_i B_i + z)")

    def __post_init__(self):
        check_bcq_bits(self.bits)
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}; got {self.grid!r}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0; got {self.rounds}")
        if self.grid != "bcq" and self.offset:
            raise ValueError(f"offset=True is for grid='bcq' (grid {self.grid!r} brings its own offset)")
        if self.grid != "bcq" and self.bits == 1:
            raise ValueError(f"grid={self.grid!r} needs bits 2, 3 or 4")

    @property
    def needs_calibration(self) -> bool:
        return self.grid == "gptq"

    @property
    def needs_layer_stats(self) -> bool:
        return self.grid == "gptq"

    def _gptq(self) -> GPTQ:
        return GPTQ(bits=self.bits, group_size=self.group_size, sym=False)

    def new_state(self, name, linear):
        return self._gptq().new_state(name, linear) if self.grid == "gptq" else super().new_state(name, linear)

    def check_layer(self, linear, name) -> None:
        group = self.layer_group_size(linear, name)
        if linear.in_features % 32 or group % 32:
            raise ValueError(f"BCQ packs 32 input channels a word: layer {name!r} has in_features="
                             f"{linear.in_features} and group_size {group}; both must be multiples of 32")

    def quantize(self, state, linear, name) -> BCQWeight:
        group = self.layer_group_size(linear, name)
        if self.grid == "gptq":
            return BCQWeight.from_uniform(self._gptq().quantize(state, linear, name))
        if self.grid == "rtn":
            return BCQWeight.from_uniform(QuantizedWeight.from_rtn(linear.weight, self.bits, group, sym=False))
        return BCQWeight(*search(linear.weight, self.bits, group, self.rounds, self.offset))

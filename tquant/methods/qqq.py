"""QQQ (Zhang et al., 2024): adaptive smoothing, then GPTQ on the smoothed weights; W4A8 with int8 GEMMs.

Per block, per input group (q/k/v, o_proj, gate/up, down_proj), in call order:
    for alpha in 0, 1/n, ..., (n-1)/n   (n = smooth_grid):
        smooth the group by s(alpha) (tquant.calib.smoothing: folded into the producer op, else at run time),
        simulate the group's quantized layers (RTN 4-bit weights, per-token activations) and measure
        the block output MSE against the float block on `search_samples` calibration sequences
    keep the alpha with the lowest error (qqq_alpha[layer] records it)
Then GPTQ quantizes the smoothed weights: symmetric 4-bit per channel, or per group with each group scale an
integer multiple (1..15) of a per-channel scale (QQQ's grid: int4 -> int8 in registers, int8 main loop).
With act_order and groups, static_groups keeps columns in input order, which the GEMM reads.
"""
from __future__ import annotations

import dataclasses


from .base import option, register
from .gptq import GPTQ
from .weight_activation import WeightActivationMethod


@register
@dataclasses.dataclass
class QQQ(WeightActivationMethod, GPTQ):
    name = "qqq"
    integer_groups = True
    needs_layer_stats = True

    bits: int = option(4, "weight bits: 4")
    group_size: int = option(128, "input channels per group scale (an integer multiple of the channel scale); "
                                  "-1 = per output channel")
    static_groups: bool = option(True, "group scales from the original weights (needed with act_order and groups)")
    smooth_grid: int = option(20, "alphas searched per input group: 0, 1/n, ..., (n-1)/n; 0 = no smoothing")
    search_samples: int = option(8, "calibration sequences the alpha search runs on")

    def __post_init__(self):
        if self.bits != 4:
            raise ValueError(f"qqq quantizes weights to 4 bits; got bits={self.bits}")
        super().__post_init__()
        if self.act_order and not self.static_groups and self.group_size not in (-1, 0, None):
            raise ValueError("qqq with act_order and groups needs static_groups=True: the W4A8 GEMM reads "
                             "input channels in order")
        if self.smooth_grid < 0 or self.search_samples < 1:
            raise ValueError("smooth_grid must be >= 0 and search_samples >= 1")
        self.qqq_alpha: dict[str, float] = {}

    def report(self):
        return {"alpha": dict(self.qqq_alpha)} if self.qqq_alpha else {}

    def quantize(self, state, linear, name):
        return self.finish(GPTQ.quantize(self, state, linear, name), name)

    def prepare_block(self, block, linears, groups, inputs, prefix):
        if self.smooth_grid:
            self.search_smoothing(block, linears, groups, inputs, prefix, self.smooth_grid, self.search_samples,
                                  self.qqq_alpha)

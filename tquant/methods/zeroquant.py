"""ZeroQuant (Yao et al., 2022): symmetric group-wise weights, per-token dynamic activations, and optional
layer-by-layer knowledge distillation (LKD).

Weights: symmetric round-to-nearest, 8-bit per output channel (ZeroQuant's row-wise groups at their finest)
or 4-bit per channel / per K-group (QQQ's integer grid); bits=8, mlp_bits=4 is the paper's W4/8 (4-bit MLP,
8-bit attention). Activations: per token, act_bits.
LKD, per block, before its weights are quantized (tquant.calib.block_tuning, in float32): the float block is the
teacher; the student is the same block simulating its quantized layers (RTN weights and per-token
activations, straight-through gradients), trained on the weights of the linears matching lkd_layers
(Adam, lkd_steps steps of lkd_batch sequences; the best of four checkpoints is kept); they are then
quantized. lkd_log[block] = (MSE before, MSE after).
"""
from __future__ import annotations

import dataclasses
import fnmatch

from ..calib.block_io import outputs
from ..calib.block_tuning import distill, float32_training
from .base import option, register
from .weight_activation import WeightActivationMethod, simulated

MLP_PATTERNS = ("*mlp*", "*fc1", "*fc2", "*ffn*", "*feed_forward*")


@register
@dataclasses.dataclass
class ZeroQuant(WeightActivationMethod):
    name = "zeroquant"

    mlp_bits: int = option(0, "bits of the MLP linears (names matching *mlp*, *fc1, *fc2, *ffn*); 4 with bits=8 "
                              "is ZeroQuant's W4/8; 0 = same as bits")
    lkd: bool = option(False, "layer-by-layer knowledge distillation of each block against its float self")
    lkd_lr: float = option(1e-4, "Adam learning rate of LKD")
    lkd_steps: int = option(100, "LKD optimizer steps per block")
    lkd_batch: int = option(4, "calibration sequences per LKD step")
    lkd_layers: str = option("*", "comma-separated fnmatch patterns of the linears LKD trains (full names)")

    def __post_init__(self):
        super().__post_init__()
        if self.lkd and (self.lkd_steps < 1 or self.lkd_batch < 1 or self.lkd_lr <= 0):
            raise ValueError("LKD needs lkd_steps >= 1, lkd_batch >= 1 and lkd_lr > 0")
        self.lkd_log: dict[str, tuple[float, float]] = {}

    @property
    def needs_calibration(self) -> bool:
        """Round-to-nearest alone is data-free; only LKD needs the calibration set."""
        return self.lkd

    def all_weight_bits(self):
        return {self.bits, self.mlp_bits or self.bits}

    def weight_bits(self, name):
        if self.mlp_bits and any(fnmatch.fnmatch(name, p) for p in MLP_PATTERNS):
            return self.mlp_bits
        return self.bits

    def report(self):
        return {"lkd_mse_before_after": {b: list(e) for b, e in self.lkd_log.items()}} if self.lkd_log else {}

    def quantize(self, state, linear, name):
        return self.finish(self.rtn(linear.weight, linear, name), name)

    def prepare_block(self, block, linears, groups, inputs, prefix):
        if not self.lkd:
            return
        patterns = self.lkd_layers.split(",")
        trained = {n: lin for n, lin in linears.items() if any(fnmatch.fnmatch(prefix + n, p) for p in patterns)}
        if not trained:
            return
        teacher = outputs(block, inputs)
        params = [lin.weight for lin in trained.values()]
        with float32_training(block, params), simulated(self, linears, prefix, ste=True):
            before, after = distill(block, [{"params": params, "lr": self.lkd_lr}], inputs, teacher,
                                    steps=self.lkd_steps, batch=self.lkd_batch)
        self.lkd_log[prefix.rstrip(".")] = (before, after)

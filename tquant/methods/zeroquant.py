"""ZeroQuant (Yao et al., 2022): symmetric group-wise weights, per-token dynamic activations, and optional
layer-by-layer knowledge distillation (LKD).

Weights: symmetric round-to-nearest, 8-bit per output channel (ZeroQuant's row-wise groups at their finest)
or 4-bit per channel / per K-group (QQQ's integer grid); bits=8, mlp_bits=4 is the paper's W4/8 (4-bit MLP,
8-bit attention). Activations: per token, act_bits.
LKD, per block, before its weights are quantized (in float32, whatever the model's dtype): the float block is
the teacher; the student is the same
block simulating its quantized layers (RTN weights and per-token activations, straight-through gradients).
With X the block's calibration inputs (outputs of the already quantized blocks before it),
    min_W  mean || student_W(X) - teacher(X) ||^2       (Adam, lkd_steps steps of lkd_batch sequences)
over the weights of the linears matching lkd_layers. The error on all calibration inputs is checked every
lkd_steps / 4 steps and the best weights so far are kept (the start included, so LKD never raises the
error it optimizes); they are then quantized. lkd_log[block] = (MSE before, MSE after).
"""
from __future__ import annotations

import dataclasses
import fnmatch

import torch

from ..block_io import fp32, hidden, output_mse, outputs, rows
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
        dtype = next(block.parameters()).dtype
        block.float()  # fp32 master weights: Adam's moments underflow in fp16
        inputs = [fp32(i) for i in inputs]
        params = [lin.weight for lin in trained.values()]
        grad_before = {p: p.requires_grad for p in block.parameters()}
        for p in block.parameters():
            p.requires_grad_(False)
        try:
            with torch.enable_grad(), simulated(self, linears, prefix, ste=True):
                for p in params:
                    p.requires_grad_(True)
                before = output_mse(block, inputs, teacher)
                best = (before, [p.detach().clone() for p in params])
                opt = torch.optim.Adam(params, lr=self.lkd_lr)
                g = torch.Generator().manual_seed(0)
                every = max(1, self.lkd_steps // 4)
                for step in range(1, self.lkd_steps + 1):
                    b = int(torch.randint(len(inputs), (1,), generator=g))
                    n = inputs[b][0][0].shape[0]
                    start = int(torch.randint(max(1, n - self.lkd_batch + 1), (1,), generator=g))
                    index = slice(start, start + self.lkd_batch)
                    args, kwargs = rows(*inputs[b], index)
                    loss = torch.nn.functional.mse_loss(hidden(block(*args, **kwargs)), teacher[b][index])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if step % every == 0 or step == self.lkd_steps:  # keep the best checkpoint (early stopping)
                        error = output_mse(block, inputs, teacher)
                        if error < best[0]:
                            best = (error, [p.detach().clone() for p in params])
                after = best[0]
                for p, saved in zip(params, best[1]):
                    p.data.copy_(saved)
        finally:
            for p, flag in grad_before.items():
                p.requires_grad_(flag)
            block.to(dtype)
        self.lkd_log[prefix.rstrip(".")] = (before, after)

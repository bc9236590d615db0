"""What the weight-activation methods (smoothquant, zeroquant, qqq) share: options, checks, simulation.

A weight-activation method hands the driver QuantizedWeights with act_bits set, which become
ActQuantLinear layers (int8 GEMMs: W8A8, W4A8 per-channel or per-group on QQQ's grid, W4A4):
    y = dequant( Q_a(x / smooth) . Q_w(W diag(smooth))^T )
    Q_w: symmetric, 8-bit per output channel or 4-bit per channel / per group
    Q_a: per token, dynamic (or static per tensor), act_bits
While the driver runs, each quantized nn.Linear simulates that layer: its weight is the de-quantized one
and input_transform(name) fake-quantizes its input per token (after any run-time smoothing hook), so later
stages and the next block see both errors.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from ..calib.block_io import output_mse, outputs, rows
from ..kernels.act_quant import fake_quantize_activations, qmax
from ..formats.weights import QuantizedWeight
from ..calib.smoothing import SmoothedGroup, find_absorber, input_absmax
from .base import Method, option

ACT_BITS = (8, 4)


@dataclasses.dataclass
class WeightActivationMethod(Method):
    needs_layer_stats = False  # round-to-nearest weights; subclasses with GPTQ set it back
    bits: int = option(8, "weight bits: 8 (per-channel) or 4 (per-channel or per-group)")
    group_size: int = option(-1, "input channels per scale for 4-bit weights; -1 = per output channel "
                                 "(8-bit weights are always per-channel)")
    act_bits: int = option(8, "activation bits, symmetric per token: 8, or 4 (W4A4, needs 4-bit weights)")

    def __post_init__(self):
        super().__post_init__()
        if self.act_bits not in ACT_BITS:
            raise ValueError(f"act_bits={self.act_bits} is not supported; use one of {ACT_BITS}")
        if not self.sym:
            raise ValueError(f"{self.name}: the int8 GEMMs need symmetric weights; drop sym=False")
        for bits in self.all_weight_bits():
            if bits not in (4, 8):
                raise ValueError(f"{self.name}: weights must be 4 or 8 bits for the int8 GEMMs, not {bits}")
            if self.act_bits == 4 and bits != 4:
                raise ValueError(f"{self.name}: 4-bit activations (W4A4) need 4-bit weights, not {bits}-bit")
        if 4 not in self.all_weight_bits() and self.group_size not in (-1, 0, None):
            raise ValueError(f"{self.name}: 8-bit weights are per-channel for the W8A8 GEMM; "
                             f"use group_size=-1 (got {self.group_size})")
        self.runtime_smooth: dict[str, torch.Tensor] = {}  # layer name -> divisor no op could absorb
        self.static_scale: dict[str, torch.Tensor] = {}  # layer name -> static activation scale [1]

    def all_weight_bits(self) -> set[int]:
        return {self.bits}

    def weight_bits(self, name: str) -> int:
        return self.bits

    def layer_group_size(self, linear: nn.Linear, name: str) -> int:
        if self.weight_bits(name) == 8:
            return linear.in_features
        return super().layer_group_size(linear, name)

    def rtn(self, weight: torch.Tensor, linear: nn.Linear, name: str) -> QuantizedWeight:
        """Round-to-nearest on this method's grid (symmetric; 4-bit groups on QQQ's integer grid)."""
        return QuantizedWeight.from_rtn(weight, self.weight_bits(name), self.layer_group_size(linear, name), True,
                                        integer_groups=True)

    def finish(self, qw: QuantizedWeight, name: str) -> QuantizedWeight:
        """Attach the activation format to a weight quantized on this method's grid (ActQuantLinear checks
        that it fits a GEMM when the driver builds the layer)."""
        qw.act_bits = self.act_bits
        qw.smooth = self.runtime_smooth.get(name)
        qw.act_scale = self.static_scale.get(name)
        return qw

    def keep_smoothing(self, smoothed: SmoothedGroup, names: list[str], prefix: str) -> None:
        """Remember the run-time divisor of a smoothed group's layers, where no op absorbed it."""
        if smoothed.runtime is not None:
            for n in names:
                self.runtime_smooth[prefix + n] = smoothed.runtime.float()

    def search_smoothing(self, block, linears, groups, inputs, prefix, grid: int, samples: int, record: dict,
                         only=None, tied: bool = False) -> None:
        """QQQ's adaptive smoothing: for each input group (those whose absorber, a smoothing.Absorber or None,
        passes `only`, if given), the alpha in None (no smoothing), 0, 1/grid, ..., (grid-1)/grid whose smoothing
        gives the lowest block output MSE with the group's layers simulated (this method's weight grid,
        fake-quantized inputs) on `samples` calibration sequences; the best is kept and record[layer] = alpha.
        tied: GQA's v_proj may absorb o_proj's scale, tied over the query heads of a KV head
        (smoothing.find_absorber)."""
        amax = input_absmax(block, {g[0]: linears[g[0]] for g in groups}, inputs)
        search, left = [], samples
        for args, kwargs in inputs:
            n = min(left, args[0].shape[0])
            search.append(rows(args, kwargs, slice(0, n)))
            left -= n
            if not left:
                break
        teacher = outputs(block, search)
        for g in groups:
            group = {n: linears[n] for n in g}
            absorber = find_absorber(block, list(group.values()), inputs, tied=tied)
            if only is not None and not only(absorber):
                continue

            def error():
                with simulated(self, group, prefix):
                    return output_mse(block, search, teacher)

            best = (error(), None)
            for i in range(grid):
                smoothed = SmoothedGroup(list(group.values()), absorber, amax[g[0]], i / grid)
                best = min(best, (error(), i / grid), key=lambda e: e[0])
                smoothed.undo()
            for n in g:
                record[prefix + n] = best[1]
            if best[1] is not None:
                self.keep_smoothing(SmoothedGroup(list(group.values()), absorber, amax[g[0]], best[1]), g, prefix)

    def input_transform(self, name: str):
        scale = self.static_scale.get(name)
        return lambda x: fake_quantize_activations(x, bits=self.act_bits, scale=scale).to(x.dtype)

    def static_scale_of(self, smoothed_absmax: torch.Tensor) -> torch.Tensor:
        """Static per-tensor scale [1] from the largest |x / smooth| seen in calibration."""
        return (smoothed_absmax.max().float() / qmax(self.act_bits)).clamp_min(torch.finfo(torch.float32).tiny) \
            .reshape(1)


@contextlib.contextmanager
def simulated(method: WeightActivationMethod, linears: dict[str, nn.Linear], prefix: str, ste: bool = False):
    """The linears as their quantized layers: weights replaced by their de-quantized RTN grid values and
    inputs fake-quantized per token. ste=True keeps the float weights trainable through both roundings
    (straight-through estimator, for LKD); otherwise the weights are swapped and restored on exit."""
    from torch.nn.utils import parametrize

    def fake_act(module, args):
        x = args[0]
        q = method.input_transform(prefix + module._tquant_name)(x)
        return (x + (q - x).detach() if ste else q,) + tuple(args[1:])

    class FakeWeight(nn.Module):
        def __init__(self, linear, name):
            super().__init__()
            self.linear, self.name = [linear], name  # a list: not a submodule

        def forward(self, w):
            q = method.rtn(w.detach(), self.linear[0], self.name).dequantize().to(w.dtype)
            return w + (q - w).detach()

    saved, hooks = {}, []
    try:
        for n, lin in linears.items():
            lin._tquant_name = n
            hooks.append(lin.register_forward_pre_hook(fake_act))
            if ste:
                parametrize.register_parametrization(lin, "weight", FakeWeight(lin, prefix + n), unsafe=True)
            else:
                saved[n] = lin.weight.data
                lin.weight.data = method.rtn(lin.weight, lin, prefix + n).dequantize().to(lin.weight.dtype)
        yield
    finally:
        for h in hooks:
            h.remove()
        for n, lin in linears.items():
            if ste and parametrize.is_parametrized(lin, "weight"):
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
            if n in saved:
                lin.weight.data = saved[n]
            del lin._tquant_name

"""QoQ (Lin et al., 2024, QServe): W4A8KV4 with progressive weight quantization.

Weights: 4-bit on the progressive grid (quantizer.progressive_quantize): per output channel to int8 within the
protective range [-119, 119], then uint4 per group (or per channel) with an integer scale and zero, so the W4A8
GEMM dequantizes (c - z) * s2 to int8 and keeps its main loop on int8 tensor cores. Activations: int8 per token.
KV cache: qoq_kv4 (4-bit per token and head), on by default (kv_bits=16: the cache stays in full precision).
Steps, each an option (the seed's config names in brackets), in the order they run:
    rotate [rotation]             input-module rotation: the residual stream turned by a randomized Hadamard
                                  matrix, the RMSNorm weights folded into the linears they feed (tquant.calib.rotation),
                                  so q/k/v_proj and gate/up_proj see inputs without outlier channels
    smooth_attention [smooth.yx]  SmoothAttention: λ = max|K|^alpha per key channel divided out of k_proj and
                                  into q_proj (qoq_kv4's calibration, before any weight is quantized)
    smooth_xw [smooth.xw]         output-module smoothing: the inputs of the layers whose smoothing divisor folds
                                  into a preceding linear (o_proj <- v_proj, under GQA with the scale tied over
                                  the query heads of a KV head; down_proj <- up_proj) smoothed with the alpha of a
                                  grid search on the block output error (QQQ's search)
    reorder [reorder]             activation-aware channel reordering: a layer's input channels sorted by their
                                  mean square on calibration data (diag H), largest first, so each group holds
                                  channels of like salience; the layer quantizes x[..., perm] (ActQuantLinear)
    calib_range [wgts.calib_range]  weight clipping: per output row and group, the ratio r of the second-level
                                  range (1, 1 - 0.5 / n, ..., 0.5 + 0.5 / n; n = clip_grid) minimizing
                                  (w - q_r) H_gg (w - q_r)^T, H_gg the group's block of the layer's input Gram
                                  matrix on calibration data (the output error of that group alone)
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..formats.weights import QuantizedWeight
from .base import option, register
from .gptq import HessianState
from .weight_activation import WeightActivationMethod


@register
@dataclasses.dataclass
class QoQ(WeightActivationMethod):
    name = "qoq"
    state_class = HessianState

    bits: int = option(4, "weight bits: 4")
    group_size: int = option(128, "input channels per second-level group; -1 = per output channel")
    kv_bits: int = option(4, "KV cache bits (qoq_kv4): 4 or 8; 16 = no KV cache quantization")
    rotate: bool = option(True, "rotate the residual stream by a randomized Hadamard matrix (Llama-style models)")
    prefill_with_quant: bool = option(False, "a prefill attends to its own keys / values as quantized (qoq_kv4's "
                                             "option: True makes one forward see the KV4 cache as decoding does)")
    smooth_attention: float = option(0.5, "SmoothAttention strength alpha on the keys (0 = off); needs kv_bits < 16")
    smooth_xw: bool = option(True, "smooth the output modules' inputs (alpha searched on the block output error)")
    gqa_o_proj: bool = option(True, "smooth_xw under GQA too: o_proj through v_proj, the scale tied over the query "
                                    "heads of each KV head (False: o_proj left out where v_proj is smaller)")
    smooth_grid: int = option(20, "alphas the output-module smoothing tries: 0, 1/n, ..., (n-1)/n")
    search_samples: int = option(8, "calibration sequences the smoothing search runs on")
    reorder: bool = option(True, "group input channels by activation salience (per-group grids only)")
    calib_range: bool = option(True, "search a clipping ratio per output row and group on the output error")
    clip_grid: int = option(20, "clipping ratios tried: 1, 1 - 0.5/n, ..., 0.5 + 0.5/n")

    def __post_init__(self):
        if self.bits != 4:
            raise ValueError(f"qoq quantizes weights to 4 bits (W4A8); got bits={self.bits}")
        if self.act_bits != 8:
            raise ValueError(f"qoq runs 8-bit activations (W4A8); got act_bits={self.act_bits}")
        if self.kv_bits not in (4, 8, 16):
            raise ValueError(f"qoq: kv_bits={self.kv_bits} is not supported; use 4, 8 or 16 (no KV quantization)")
        if self.smooth_attention and self.kv_bits == 16:
            raise ValueError("qoq: smooth_attention smooths the quantized KV cache; set smooth_attention=0 with "
                             "kv_bits=16")
        if self.smooth_grid < 1 or self.search_samples < 1 or self.clip_grid < 1:
            raise ValueError("smooth_grid, search_samples and clip_grid must be >= 1")
        super().__post_init__()
        self.qoq_alpha: dict[str, float | None] = {}
        self.clip_ratio: dict[str, float] = {}  # layer -> mean chosen ratio (report)

    @property
    def needs_calibration(self) -> bool:
        """Rotation and the progressive grid are data-free; every other step calibrates."""
        return bool(self.smooth_attention or self.smooth_xw or self.reorder or self.calib_range)

    @property
    def needs_layer_stats(self) -> bool:
        return self.calib_range or self.reorder

    def prepare_model(self, model):
        if self.rotate:
            from ..calib.rotation import rotate_residual

            rotate_residual(model)  # in the model's own dtype, checked block by block on float32 copies

    def kv_cache_method(self):
        """The KV-cache method applied (and calibrated) before the weights: qoq_kv4, or None for kv_bits=16."""
        if self.kv_bits == 16:
            return None
        from .qoq_kv import QoQKV4

        return QoQKV4(kv_bits=self.kv_bits, smooth_alpha=self.smooth_attention,
                      prefill_with_quant=self.prefill_with_quant)

    def report(self):
        return {"alpha": dict(self.qoq_alpha), "clip_ratio": dict(self.clip_ratio)}

    def rtn(self, weight: torch.Tensor, linear: nn.Linear, name: str) -> QuantizedWeight:
        """The progressive grid without clipping (what the smoothing search simulates)."""
        return QuantizedWeight.from_progressive(weight, self.layer_group_size(linear, name))

    def prepare_block(self, block, linears, groups, inputs, prefix):
        if self.smooth_xw:  # the output modules: those whose divisor a linear absorbs (QServe has no run-time one)
            def output_module(absorber):
                return absorber is not None and isinstance(absorber.module, nn.Linear)

            self.search_smoothing(block, linears, groups, inputs, prefix, self.smooth_grid, self.search_samples,
                                  self.qoq_alpha, only=output_module, tied=self.gqa_o_proj)

    def quantize(self, state, linear, name):
        w = linear.weight.detach().float()
        group = self.layer_group_size(linear, name)
        h = state.hessian.float() if self.needs_layer_stats else None
        perm = None
        if self.reorder and group != w.shape[1]:
            perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
            w, h = w[:, perm], h[perm][:, perm]
        clip = 1.0
        if self.calib_range:
            clip = clip_ratios(w, h, group, self.clip_grid)
            self.clip_ratio[name] = round(clip.mean().item(), 4)
        qw = QuantizedWeight.from_progressive(w, group, clip=clip)
        qw.perm = perm
        return self.finish(qw, name)


def clip_ratios(w: torch.Tensor, h: torch.Tensor, group: int, grid: int) -> torch.Tensor:
    """Per output row and group, the clipping ratio in 1, 1 - 0.5/grid, ..., 0.5 + 0.5/grid whose progressive grid
    gives the lowest (w - q) H_gg (w - q)^T (H_gg: the group's diagonal block of H [K, K]); [N, G]."""
    n, k = w.shape
    g = k // group
    blocks = torch.stack([h[i * group:(i + 1) * group, i * group:(i + 1) * group] for i in range(g)])  # [G, gs, gs]
    best_err = torch.full((n, g), float("inf"), device=w.device)
    best = torch.ones(n, g, device=w.device)
    for i in range(grid):
        r = 1 - 0.5 * i / grid
        delta = (w - QuantizedWeight.from_progressive(w, group, clip=r).dequantize()).reshape(n, g, group)
        err = torch.einsum("ngi,gij,ngj->ng", delta, blocks, delta)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best

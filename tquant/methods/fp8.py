"""FP8: float8 e4m3 weights per output channel, with e4m3 activations (W8A8) or without (weight-only, W8A16).

    weights      Wq[n, k] = E(W[n, k] / s_w[n]),   s_w[n] = max_k |W[n, k]| / 448       (round to nearest e4m3)
    activations  per token, dynamic (default): s_x[m] = max_k |x[m, k]| / 448 at run time, xq = E(x / s_x)
                 act_static=True: one s_x per layer, the largest |x| its input reached on the calibration set / 448
                 (inputs beyond it saturate at +-448 s_x)
                 weight_only=True: none, activations stay in the model's dtype
    y = (xq . Wq^T) s_x s_w + bias   (weight-only: y = (x . Wq^T) s_w + bias)
E is torch.float8_e4m3fn's cast (ties to even, +-448 at most, subnormal steps of 2^-9 s); the kernels and the
references are tquant.kernels.fp8_gemm, the module tquant.modules.FP8Linear. Data-free except with act_static (the
calibration passes then gather each input's largest |x|, with the layers before it already simulated), gptq or
smooth_alpha. While the driver runs, each quantized nn.Linear simulates its layer: its weight is Wq s_w and its input
is fake-quantized (E(x / s_x) s_x) unless weight-only.
Two calibrated options change the weights only, never the format (the same FP8Linear, kernels and checkpoint):
    gptq=True           GPTQ's error feedback (tquant.methods.gptq: H of the layer's calibration inputs, act order,
                        percdamp) on the e4m3 grid: s_w[n] as above from the original row, each column rounded to
                        E(w / s_w) s_w and its error spread over the columns not yet rounded
      + act_aware=True  (W8A8, per-token activations) GPTQ fitted to what the layer computes, Q(X) Wq^T with
                        X~ = Q(X) the per-token e4m3 input (fake_quantize_fp8), instead of to X Wq^T (GPTAQ's asymmetric
                        calibration, Li et al. 2025). With H~ = 2/T X~^T X~, D = 2/T (X - X~)^T X~ [K, K] (the state
                        accumulates both in float32), H~d = H~ + lambda I, lambda = percdamp mean(diag H~):
                            ||X W^T - X~ Wq^T||^2 + lambda ||W - Wq||^2
                              = tr((W' - Wq) H~d (W' - Wq)^T) + const,   W' = W + W D H~d^-1
                        (expand both sides: W' H~d = W (X^T X~ + lambda I) = W (H~d + D)), so GPTQ's column loop runs
                        unchanged on H~ with the target W' (s_w[n] from row n of W'): W' is the ridge regression of
                        X W^T on X~ pulled towards W, the damping GPTQ already applies. Accumulating D rather than
                        C = X~^T X keeps the small correction W D H~d^-1 out of float32's cancellation (C - H~).
                        W' gains only where X's rounding is predictable from X~: on SmolLM2-135M block 0's attention
                        (its input is one normed embedding per token id, rounded alike each time); elsewhere e4m3's
                        rounding is noise and W' fits the calibration tokens' share of it (~K / T of its energy).
    smooth_alpha=a      SmoothQuant's migration (tquant.calib.smoothing) before W8A8: per input group
                        s_j = max|X_j|^a / max|W_j|^(1 - a), W's columns times s, 1/s folded into the norm / linear
                        that produces X where one absorbs it exactly (find_absorber; v_proj for o_proj under GQA, s
                        tied over a KV head's query heads). FP8Linear has no run-time divisor, so a group with no
                        absorber stays unsmoothed (report()'s "unsmoothed" names them).
On SmolLM2-135M e4m3 is a relative grid (3 mantissa bits: ~2.6 % rms weight error per channel, where int8 per channel
is ~0.9 %), so scaling a channel (smoothing) moves little error; benchmarks/RESULTS.md (FP8 on the offline model)
has what each option measured.
"""
from __future__ import annotations

import dataclasses

import torch

from ..calib.smoothing import SmoothedGroup, find_absorber, input_absmax
from ..formats.weights import FP8Weight, in_input_order
from ..kernels.fp8_gemm import E4M3_MAX, FP8 as E4M3, fake_quantize_fp8, quantize_fp8_ref
from .base import LayerState, Method, option, register
from .gptq import GPTQ as _GPTQ, HessianState, error_feedback


class AbsMaxState(LayerState):
    """The largest |x| of the layer's input over the calibration set (float32 scalar), and with hessian=True also
    GPTQ's H of it (`self.hessian`, a gptq.HessianState). act_aware=True: `self.hessian` is H~ of the per-token
    e4m3 input X~ instead, and `self.cross` [K, K] float32 is D = 2/T (X - X~)^T X~ over the same T tokens."""

    def __init__(self, name, linear, hessian=False, act_aware=False):
        super().__init__(name, linear)
        self.absmax = torch.zeros((), dtype=torch.float32, device=linear.weight.device)
        self.hessian = HessianState(name, linear) if hessian else None
        self.cross = torch.zeros_like(self.hessian.hessian) if act_aware else None

    def _accumulate(self, x):
        self.absmax = torch.maximum(self.absmax, x.detach().abs().max().float())
        if self.cross is not None:
            xq = fake_quantize_fp8(x).to(x.dtype)  # what the layer's input_transform hands it
            seen = self.hessian.tokens
            self.hessian.add_batch(xq)
            self.cross *= seen / self.hessian.tokens
            xq = xq.to(self.cross.device, self.cross.dtype)
            self.cross.addmm_((x.to(xq) - xq).t(), xq, alpha=2.0 / self.hessian.tokens)
        elif self.hessian is not None:
            self.hessian.add_batch(x)


@register
@dataclasses.dataclass
class FP8(Method):
    name = "fp8"
    needs_calibration = False
    needs_layer_stats = False
    state_class = AbsMaxState

    bits: int = option(8, "weight bits: 8 only (float8 e4m3)")
    group_size: int = option(-1, "-1 only: one scale per output channel")
    act_static: bool = option(False, "one static activation scale per layer from calibration (max |x| / 448; needs "
                                     "calib=), else per-token dynamic")
    weight_only: bool = option(False, "FP8 weights only (W8A16): activations stay in the model's dtype")
    gptq: bool = option(False, "GPTQ's error feedback on the e4m3 grid (same per-channel scales; needs calib=)")
    percdamp: float = option(0.01, "with gptq=True: damping added to diag(H), as a fraction of its mean")
    act_aware: bool = option(False, "with gptq=True and per-token e4m3 activations: GPTQ minimises ||X W^T - Q(X) "
                                    "Wq^T||, the layer's real error with its quantized input Q(X), instead of ||X (W - "
                                    "Wq)^T|| (GPTAQ; a second K x K matrix per layer while calibrating)")
    smooth_alpha: float | None = option(None, "SmoothQuant's migration before W8A8, folded where an op absorbs it "
                                              "(s_j = max|X_j|^a / max|W_j|^(1-a); needs calib=); None: none")

    def __post_init__(self):
        if self.bits != 8:
            raise ValueError(f"fp8 stores 8-bit float (e4m3) weights: drop bits={self.bits} or give bits=8")
        if self.group_size not in (-1, None):
            raise ValueError(f"fp8 keeps one scale per output channel: drop group_size={self.group_size} or give -1")
        if not self.sym:
            raise ValueError("fp8 weights are symmetric (a sign bit, no zero point): drop sym=False / --asym")
        if self.act_static and self.weight_only:
            raise ValueError("act_static=True quantizes activations, weight_only=True does not: choose one")
        if not isinstance(self.gptq, bool):
            raise ValueError(f"gptq must be True or False, got {self.gptq!r}")
        if not 0 <= self.percdamp < float("inf"):
            raise ValueError(f"percdamp must be a finite number >= 0, got {self.percdamp}")
        if not isinstance(self.act_aware, bool):
            raise ValueError(f"act_aware must be True or False, got {self.act_aware!r}")
        if self.act_aware and (not self.gptq or self.weight_only or self.act_static):
            raise ValueError("act_aware=True fits GPTQ to the per-token e4m3 activations: it needs gptq=True, and "
                             "neither weight_only=True (no activations quantized) nor act_static=True (its scale is "
                             "known only after calibration)")
        if self.percdamp != 0.01 and not self.gptq:
            raise ValueError(f"percdamp={self.percdamp} damps GPTQ's Hessian: it needs gptq=True")
        if self.smooth_alpha is not None:
            if isinstance(self.smooth_alpha, bool) or not isinstance(self.smooth_alpha, (int, float)) \
                    or not 0 <= self.smooth_alpha <= 1:
                raise ValueError(f"smooth_alpha must be a number in [0, 1] or None, got {self.smooth_alpha!r}")
            if self.weight_only:
                raise ValueError("smooth_alpha migrates activation outliers into the weights for W8A8; "
                                 "weight_only=True quantizes no activations: drop one")
        self.group_size = -1
        self.needs_calibration = self.act_static or self.gptq or self.smooth_alpha is not None
        self.needs_layer_stats = self.act_static or self.gptq
        self.static_scale: dict[str, torch.Tensor] = {}  # layer name -> s_x [1], filled by quantize
        self.unsmoothed: list[str] = []  # input groups (first layer's name) no op could absorb smoothing for
        self.smoothed_groups = 0
        self.gptq_helper = _GPTQ(bits=8, group_size=-1, percdamp=self.percdamp)  # its H damping and column loop

    def new_state(self, name, linear):
        return AbsMaxState(name, linear, hessian=self.gptq, act_aware=self.act_aware)

    def prepare_block(self, block, linears, groups, inputs, prefix):
        if self.smooth_alpha is None:
            return
        amax = input_absmax(block, {g[0]: linears[g[0]] for g in groups}, inputs)
        for g in groups:
            group = [linears[n] for n in g]
            absorber = find_absorber(block, group, inputs, tied=True)
            if absorber is None:  # FP8Linear divides by nothing at run time
                self.unsmoothed.append(prefix + g[0])
                continue
            SmoothedGroup(group, absorber, amax[g[0]], float(self.smooth_alpha))
            self.smoothed_groups += 1

    def report(self):
        if self.smooth_alpha is None:
            return {}
        return {"smoothed_groups": self.smoothed_groups, "unsmoothed": self.unsmoothed}

    def gptq_target(self, state, linear, name) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(w, perm, U) for GPTQ's column loop (gptq.GPTQ.prepared): the weight [N, K] in act order (perm), U =
        chol(H~d^-1) (upper) in that order; act_aware=True: w is W' = W + W D H~d^-1 (H~d^-1 = U^T U)."""
        if state.hessian.tokens == 0:
            raise ValueError(f"layer {name!r}: gptq=True needs the calibration activations entering it, and none "
                             "reached it")
        w, perm, u = self.gptq_helper.prepared(state.hessian, linear, name)
        if self.act_aware:
            cross = state.cross.to(w) if perm is None else state.cross[perm][:, perm].to(w)
            w += (w @ cross) @ u.t() @ u
        return w, perm, u

    def gptq_weight(self, state, linear, name) -> tuple[torch.Tensor, torch.Tensor]:
        """(Wq float8_e4m3fn [N, K], s_w [N]): s_w as round to nearest takes it from the target's rows (the original
        ones; those of W' with act_aware), the codes by GPTQ's column loop (gptq.error_feedback) in act order, each column
        E(clamp(w / s_w, +-448))."""
        w, perm, u = self.gptq_target(state, linear, name)
        rows = w if self.act_aware else linear.weight.detach().float()
        scale = quantize_fp8_ref(rows)[1].to(w.device)
        codes = torch.empty_like(w)  # e4m3 values, in w's (H's) dtype

        def column(col, current, upcoming):
            q = (current / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).to(w.dtype)
            codes[:, col] = q
            return q * scale

        error_feedback(w, u, self.gptq_helper.blocksize, column)
        return in_input_order(codes, perm).to(E4M3), scale

    def quantize(self, state, linear, name) -> FP8Weight:
        if self.gptq:
            weight, scale = self.gptq_weight(state, linear, name)
        else:
            weight, scale = quantize_fp8_ref(linear.weight.detach())
        act_scale = None
        if self.act_static:
            if state.n_batches == 0:
                raise ValueError(f"layer {name!r}: act_static=True needs the calibration activations entering it, "
                                 "and none reached it")
            act_scale = (state.absmax / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
            self.static_scale[name] = act_scale
        return FP8Weight(weight, scale, act_bits=None if self.weight_only else 8, act_scale=act_scale)

    def input_transform(self, name):
        if self.weight_only:
            return None
        scale = self.static_scale.get(name)
        return lambda x: fake_quantize_fp8(x, scale=scale).to(x.dtype)

"""ABQ-LLM (Zeng et al., 2024): arbitrary-bit WpAq weights and activations, trained block by block as in OmniQuant
(Shao et al., 2024), for the bit-plane kernels (BitPlaneLinear).

Grid: weights asymmetric per output row and group, wbits in 2..8 (codes 0 .. maxq = 2^wbits - 1, integer zero);
activations (abits 2..8) per token, asymmetric (act_quant's zero_point grid); abits=16: weight-only.
Each block, before its linears are quantized, is trained against the float model (float32, Adam,
tquant.block_tuning.optimize, `epochs` passes over the calibration sequences, the best of five checks kept):
    LWC  per row and group of each linear: lo = sigmoid(g_lo) min(w, 0), hi = sigmoid(g_hi) max(w, 0) (g starts at
         4: 0.982 of the range), scale = (hi - lo) / maxq, zero = round(-lo / scale),
         w_q = (clamp(round(w / scale) + zero, 0, maxq) - zero) scale, both roundings straight-through
    LET  for each input group whose producer absorbs a per-channel scale exactly (smoothing.find_absorber: the norm
         before q/k/v and before gate/up, v_proj before o_proj (tied over GQA's query heads), up_proj before
         down_proj): s = exp(theta), the group's weight columns times s, the absorber's channels divided by s;
         theta starts at SmoothQuant's log(max|X|^alpha / max|W|^(1 - alpha))
    the inputs of every linear fake-quantized per token (straight-through)
ABQ-LLM's additions to OmniQuant (from its paper and code), each an option:
    dlc           its distribution-correction loss against two targets, t1 = the float model's block output on the
                  float model's own inputs (OmniQuant's target) and t2 = the float block on the quantized model's
                  inputs: sum over t of MSE(y, t) - log |mean_tokens cos(y, t)| (cosine over the hidden dim);
                  dlc=False: MSE(y, t1), OmniQuant's loss
    compensation  a trained rank-1 term W + l r^T (l = 0, r = 1 at the start, lr 1e-2) on down_proj of the first
                  3 and last 4 blocks, folded into the weight before it is quantized
    bit_balance   2-bit weights on 5 levels (0..4, scale = range / 4) instead of 4: stored in 3 bit planes
Not done: its attention-map KL term (it needs the block's attention probabilities, which SDPA does not return) and
LET between q and k (it changes nothing unless queries and keys are quantized; this library quantizes the KV cache
with its own methods).
After training, LET is folded in place (exact), the compensation into down_proj, and each linear quantized with its
trained clip factors -> BitPlaneWeight -> BitPlaneLinear. With lwc, let and compensation off (or epochs=0) it is
round-to-nearest on the same grid and needs no data.
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn
from torch.func import functional_call

from ..block_io import fp32, hidden, outputs
from ..driver import find_blocks
from ..block_tuning import float32_training, optimize, random_rows
from ..kernels.act_quant import quantize_activations_ref
from ..qweight import BitPlaneWeight
from ..quantizer import resolve_group_size
from ..smoothing import find_absorber, input_absmax, smoothing_scales
from .base import Method, option, register

LWC_INIT = 4.0  # sigmoid(4) = 0.982
COMPENSATION_LR = 1e-2


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def lwc_qparams(w: torch.Tensor, maxq: int, group_size: int, clip=None):
    """(scale, zero) [N, G] of w [N, K] per row and group: the range [min(w, 0), max(w, 0)] times sigmoid(clip)
    (clip = (g_lo, g_hi) [N, G] each, or None: the whole range), zero rounded straight-through."""
    n, k = w.shape
    wg = w.reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0)
    if clip is not None:
        lo, hi = lo * torch.sigmoid(clip[0]), hi * torch.sigmoid(clip[1])
    span = hi - lo
    scale = torch.where(span > 0, span, torch.ones_like(span)) / maxq
    return scale, round_ste(-lo / scale)


def lwc_quantize(w: torch.Tensor, maxq: int, group_size: int, clip=None) -> torch.Tensor:
    """De-quantized w [N, K] on its LWC grid (straight-through: differentiable in w and clip)."""
    n, k = w.shape
    scale, zero = (t[..., None] for t in lwc_qparams(w, maxq, group_size, clip))
    q = torch.clamp(round_ste(w.reshape(n, k // group_size, group_size) / scale) + zero, 0, maxq)
    return ((q - zero) * scale).reshape(n, k)


def fake_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x on its per-token asymmetric bits grid (act_quant.quantize_activations_ref's codes), in float32."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    xq, scale, zero = quantize_activations_ref(x2, bits=bits, zero_point=True)
    return (scale[:, None] * (xq.float() + 2 ** (bits - 1) - zero[:, None])).reshape(x.shape)


@dataclasses.dataclass
class LETGroup:
    """One smoothed input group while training: names of its linears, theta [m] (s = exp(theta)[index]), and the
    absorber's name in the block with its channel index (None: channel c is the absorber's c)."""
    names: list[str]
    theta: torch.Tensor
    absorber: str
    index: torch.Tensor | None

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s over the group's K input columns, the absorber's own m channel scales)."""
        own = torch.exp(self.theta)
        return (own if self.index is None else own[self.index]), own


@register
@dataclasses.dataclass
class ABQ(Method):
    name = "abq"
    aliases = ("abq-llm",)
    needs_layer_stats = False

    bits: int | None = option(None, "alias of wbits")
    group_size: int = option(-1, "input channels per weight scale and zero: -1 = per output channel, else a "
                                 "multiple of 32 dividing in_features")
    sym: bool = option(False, "must stay False: ABQ-LLM's weight grid is asymmetric")
    wbits: int = option(4, "weight bits, 2..8")
    abits: int = option(16, "activation bits, 2..8 per token asymmetric; 16 = weight-only (A16)")
    lwc: bool = option(True, "learnable weight clipping")
    let: bool = option(True, "learnable equivalent transformation (per-channel scales between producer and linears)")
    epochs: int = option(2, "passes over the calibration sequences per block (ABQ-LLM uses 20)")
    batch: int = option(1, "calibration sequences per optimizer step")
    lwc_lr: float = option(1e-2, "Adam learning rate of the clip factors")
    let_lr: float = option(5e-3, "Adam learning rate of LET's log-scales")
    alpha: float = option(0.5, "SmoothQuant alpha of LET's starting scales")
    dlc: bool = option(True, "ABQ-LLM's two-target MSE + cosine loss (False: OmniQuant's MSE to the float model)")
    compensation: bool = option(True, "rank-1 compensation of down_proj in the first 3 and last 4 blocks")
    bit_balance: bool = option(False, "2-bit weights on 5 levels (0..4), stored in 3 bit planes")

    def __post_init__(self):
        if self.bits is not None:
            if self.wbits != 4 and self.wbits != self.bits:
                raise ValueError(f"bits={self.bits} and wbits={self.wbits} disagree; give one of them")
            self.wbits = self.bits
        if self.wbits not in range(2, 9):
            raise ValueError(f"wbits={self.wbits} is not supported; use 2..8")
        if self.abits != 16 and self.abits not in range(2, 9):
            raise ValueError(f"abits={self.abits} is not supported; use 2..8 or 16 (weight-only)")
        if self.sym:
            raise ValueError("abq: ABQ-LLM's weight grid is asymmetric; drop sym=True")
        if self.bit_balance and self.wbits != 2:
            raise ValueError(f"bit_balance is ABQ-LLM's 2-bit grid (5 levels); wbits={self.wbits}")
        if self.epochs < 0 or self.batch < 1 or self.lwc_lr <= 0 or self.let_lr <= 0:
            raise ValueError("abq needs epochs >= 0, batch >= 1 and positive learning rates")
        self.bits = self.wbits
        self.maxq = 4 if self.bit_balance else 2**self.wbits - 1
        self.stored_bits = 3 if self.bit_balance else self.wbits
        self._clip: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fp_hidden: list[torch.Tensor] | None = None  # the float model's inputs of the next block
        self._blocks: int | None = None
        self.log: dict[str, dict] = {}

    @property
    def needs_calibration(self) -> bool:
        return self.epochs > 0 and (self.lwc or self.let or self.compensation)

    def check_layer(self, linear: nn.Linear, name: str) -> None:
        gs = resolve_group_size(self.group_size, linear.in_features, name)
        if gs != linear.in_features and gs % 32:
            raise ValueError(f"layer {name!r}: group_size={gs} must be a multiple of 32 for the bit-plane kernels "
                             "(or -1: per channel)")

    def report(self) -> dict:
        return {"training": self.log} if self.log else {}

    def prepare_model(self, model: nn.Module) -> None:
        self._blocks = len(find_blocks(model)[1])

    def input_transform(self, name: str):
        if self.abits == 16:
            return None
        return lambda x: fake_activations(x, self.abits).to(x.dtype)

    def quantize(self, state, linear: nn.Linear, name: str) -> BitPlaneWeight:
        w = linear.weight.detach().float()
        gs = self.layer_group_size(linear, name)
        with torch.no_grad():
            scale, zero = lwc_qparams(w, self.maxq, gs, self._clip.pop(name, None))
            n, k = w.shape
            codes = torch.clamp(torch.round(w.reshape(n, k // gs, gs) / scale[..., None]) + zero[..., None], 0,
                                self.maxq).to(torch.int32).reshape(n, k)
        return BitPlaneWeight(codes, scale, zero, self.stored_bits, gs,
                              act_bits=None if self.abits == 16 else self.abits)

    # ---- block training ----

    def prepare_block(self, block, linears, groups, inputs, prefix):
        start = time.time()
        index = int(prefix.rstrip(".").rsplit(".", 1)[-1])
        if self.compensation and self._blocks is None:
            raise ValueError("abq's compensation (first 3 and last 4 blocks) needs the model's block count: quantize "
                             "through tquant.quantize, or pass compensation=False")
        fp_in = self._fp_hidden or [args[0] for args, _ in inputs]
        t1 = outputs(block, [((h,) + tuple(args[1:]), kwargs) for h, (args, kwargs) in zip(fp_in, inputs)])
        self._fp_hidden = [t.to(fp_in[0].dtype) for t in t1]
        t2 = outputs(block, inputs) if self.dlc else None
        names = {id(m): n for n, m in block.named_modules()}
        let = self.let_groups(block, linears, groups, inputs, names) if self.let else []
        clip = {n: (torch.full(self.clip_shape(lin, prefix + n), LWC_INIT, device=lin.weight.device),
                    torch.full(self.clip_shape(lin, prefix + n), LWC_INIT, device=lin.weight.device))
                for n, lin in linears.items()} if self.lwc else {}
        comp = {}
        if self.compensation and (index < 3 or index >= self._blocks - 4):
            comp = {n: (torch.zeros(lin.out_features, 1, device=lin.weight.device),
                        torch.ones(1, lin.in_features, device=lin.weight.device))
                    for n, lin in linears.items() if n.endswith("down_proj")}
        params = [g.theta for g in let] + [t for c in clip.values() for t in c] + [t for c in comp.values() for t in c]
        if not params:
            return
        groups_lr = [g for g in ({"params": [g.theta for g in let], "lr": self.let_lr},
                                 {"params": [t for c in clip.values() for t in c], "lr": self.lwc_lr},
                                 {"params": [t for c in comp.values() for t in c], "lr": COMPENSATION_LR}) if g["params"]]
        inputs32 = [fp32(i) for i in inputs]
        hooks = [] if self.abits == 16 else [
            lin.register_forward_pre_hook(lambda m, a: (a[0] + (fake_activations(a[0], self.abits) - a[0]).detach(),)
                                          + tuple(a[1:])) for lin in linears.values()]

        def run(effective, args, kwargs):
            return hidden(functional_call(block, effective, args, kwargs))

        def step_loss(g):
            b, rows_, (args, kwargs) = random_rows(inputs32, self.batch, g)
            return self.loss(run(self.effective(block, linears, let, clip, comp), args, kwargs), t1[b][rows_],
                             None if t2 is None else t2[b][rows_])

        def error():
            effective = self.effective(block, linears, let, clip, comp)
            return sum(self.loss(run(effective, args, kwargs), t1[b], None if t2 is None else t2[b]).item()
                       for b, (args, kwargs) in enumerate(inputs32)) / len(inputs32)

        steps = max(1, self.epochs * sum(a[0].shape[0] for a, _ in inputs) // self.batch)
        try:
            with float32_training(block, params):
                before, after = optimize(groups_lr, step_loss, error, steps=steps)
                with torch.no_grad():
                    self.fold(block, linears, let, comp)
        finally:
            for h in hooks:
                h.remove()
        for n, c in clip.items():
            self._clip[prefix + n] = tuple(t.detach() for t in c)
        self.log[prefix.rstrip(".")] = {"loss_before": before, "loss_after": after, "steps": steps,
                                        "seconds": round(time.time() - start, 1)}

    def clip_shape(self, linear: nn.Linear, name: str) -> tuple[int, int]:
        return linear.out_features, linear.in_features // self.layer_group_size(linear, name)

    def loss(self, y, t1, t2):
        if t2 is None:
            return torch.nn.functional.mse_loss(y, t1)
        total = 0
        for t in (t1, t2):
            cos = torch.nn.functional.cosine_similarity(y, t, dim=-1).mean().abs()
            total = total + torch.nn.functional.mse_loss(y, t) - torch.log(cos)
        return total

    def let_groups(self, block, linears, groups, inputs, names) -> list[LETGroup]:
        """A LETGroup for every input group with an exact absorber, theta at SmoothQuant's scales."""
        amax = input_absmax(block, {g[0]: linears[g[0]] for g in groups}, inputs)
        out = []
        for g in groups:
            absorber = find_absorber(block, [linears[n] for n in g], inputs, tied=True)
            if absorber is None:
                continue
            index = None if absorber.index is None else absorber.index.to(amax[g[0]].device)
            s = smoothing_scales(amax[g[0]], [linears[n].weight for n in g], self.alpha, index)
            own = s if index is None else s.new_zeros(int(index.max()) + 1).scatter_(0, index, s)
            out.append(LETGroup(list(g), torch.log(own).float(), names[id(absorber.module)], index))
        return out

    def effective(self, block, linears, let, clip, comp) -> dict[str, torch.Tensor]:
        """{parameter name: its value in the quantized, transformed block} (differentiable in the trained tensors):
        LET's column and absorber scales, the compensation, then each linear's weight on its LWC grid."""
        col, row, eff = {}, {}, {}
        for g in let:
            s, own = g.scales()
            for n in g.names:
                col[n] = s
            if g.absorber in linears:
                row[g.absorber] = own
            else:
                module = block.get_submodule(g.absorber)
                for attr in ("weight", "bias"):
                    t = getattr(module, attr, None)
                    if isinstance(t, torch.Tensor):
                        eff[f"{g.absorber}.{attr}"] = t / own.view(-1, *[1] * (t.dim() - 1))
        for n, lin in linears.items():
            w = lin.weight
            if n in col:
                w = w * col[n][None, :]
            if n in row:
                w = w / row[n][:, None]
                if lin.bias is not None:
                    eff[f"{n}.bias"] = lin.bias / row[n]
            if n in comp:
                w = w + comp[n][0] @ comp[n][1]
            eff[f"{n}.weight"] = lwc_quantize(w, self.maxq, self.layer_group_size(lin, n), clip.get(n))
        return eff

    def fold(self, block, linears, let, comp) -> None:
        """LET and the compensation into the float weights, in place (the same transform effective() applies
        before quantizing)."""
        for g in let:
            s, own = g.scales()
            for n in g.names:
                linears[n].weight.mul_(s[None, :])
            module = block.get_submodule(g.absorber)
            for attr in ("weight", "bias"):
                t = getattr(module, attr, None)
                if isinstance(t, torch.Tensor):
                    t.div_(own.view(-1, *[1] * (t.dim() - 1)))
        for n, (left, right) in comp.items():
            linears[n].weight.add_(left @ right)

"""ABQ-LLM (Zeng et al., 2024): arbitrary-bit WpAq weights and activations, trained block by block as in OmniQuant
(Shao et al., 2024), for the bit-plane kernels (BitPlaneLinear).

Grid: weights asymmetric per output row and group, wbits in 2..8 (codes 0 .. maxq = 2^wbits - 1, integer zero);
activations (abits 2..8) per token, asymmetric (act_quant's zero_point grid); abits=16: weight-only.
qkv_bits 2..8 (OmniQuant's and ABQ-LLM's weight-activation settings quantize the inputs of QK^T and PV too; the
softmax output stays 16-bit): the outputs of q_proj, k_proj and v_proj on the same grid per token and head (groups of
head_dim output channels; bias included), straight-through in training, BitPlaneLinear's out_bits in the quantized
model. Queries and keys are taken before RoPE, at the projections' outputs: a simulation of quantized attention
inputs as OmniQuant evaluates them; no kernel reads these codes. Needs Llama / Mistral / Qwen2-style attention
(self_attn.q_proj / k_proj / v_proj, self_attn.head_dim, no q_norm / k_norm); qkv_bits=16: off.
Each block, before its linears are quantized, is trained against the float model (float32, Adam,
tquant.calib.block_tuning.optimize, `epochs` passes over the calibration sequences, the best of five checks kept):
    LWC  per row and group of each linear: lo = sigmoid(g_lo) min(w, 0), hi = sigmoid(g_hi) max(w, 0) (g starts at
         4: 0.982 of the range), scale = (hi - lo) / maxq, zero = round(-lo / scale),
         w_q = (clamp(round(w / scale) + zero, 0, maxq) - zero) scale, both roundings straight-through
    LET  for each input group whose producer absorbs a per-channel scale exactly (smoothing.find_absorber: the norm
         before q/k/v and before gate/up, v_proj before o_proj (tied over GQA's query heads), up_proj before
         down_proj): s = exp(theta), the group's weight columns times s, the absorber's channels divided by s;
         theta starts at SmoothQuant's log(max|X|^alpha / max|W|^(1 - alpha));
         with qkv_bits also between q and k (OmniQuant's qkt_smooth_scale): q_proj's rows and bias / s, k_proj's * s,
         which leaves QK^T unchanged; s is tied over the channel pairs (i, i + head_dim / 2) RoPE's rotate_half rotates
         together and over the query heads of each KV head (theta [kv_heads, head_dim / 2], starting at 0), so it
         stays exact through RoPE and GQA; it composes with the input-column scales of the norm's LET
    the inputs of every linear fake-quantized per token (straight-through)
ABQ-LLM's additions to OmniQuant (from its paper and code), each an option:
    dlc           its distribution-correction loss against two targets, t1 = the float model's block output on the
                  float model's own inputs (OmniQuant's target) and t2 = the float block on the quantized model's
                  inputs: sum over t of MSE(y, t) - log |mean_tokens cos(y, t)| (cosine over the hidden dim);
                  dlc=False: MSE(y, t1), OmniQuant's loss
    compensation  a trained rank-1 term W + l r^T (l = 0, r = 1 at the start, lr 1e-2) on down_proj of the first
                  3 and last 4 blocks, folded into the weight before it is quantized
    bit_balance   2-bit weights on 5 levels (0..4, scale = range / 4) instead of 4: stored in 3 bit planes
    attn_kl       its attention-map term: + attn_kl * mean over query rows of KL(P_fp || P_q), P the block's attention
                  probabilities (HF's eager attention while the block trains: SDPA returns none), P_fp from the float
                  block (its own weights, no fake quantization) on the float model's inputs; off by default (0)
After training, LET is folded in place (exact), the compensation into down_proj, and each linear quantized with its
trained clip factors -> BitPlaneWeight -> BitPlaneLinear. With lwc, let and compensation off (or epochs=0) it is
round-to-nearest on the same grid and needs no data.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from ..calib.block_io import fp32, hidden, outputs
from ..models import find_blocks
from ..calib.block_tuning import float32_training, optimize, random_rows
from ..modules.bitplane_linear import fake_activations
from ..formats.weights import BitPlaneWeight
from ..formats.quantizer import resolve_group_size
from ..calib.smoothing import find_absorber, input_absmax, smoothing_scales
from .base import Method, option, register

LWC_INIT = 4.0  # sigmoid(4) = 0.982
COMPENSATION_LR = 1e-2
Q, K, V = (f"self_attn.{p}_proj" for p in "qkv")


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


def channels_divided(module: nn.Module, d: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"weight": weight / d, "bias": bias / d} of module's tensors, d over their first dim (a linear's rows)."""
    return {attr: t / d.view(-1, *[1] * (t.dim() - 1)) for attr in ("weight", "bias")
            if isinstance(t := getattr(module, attr, None), torch.Tensor)}


class AttentionHeads(NamedTuple):
    head_dim: int
    kv_heads: int
    groups: int  # query heads per KV head


def attention_heads(block: nn.Module) -> AttentionHeads:
    """The head layout of a Llama / Mistral / Qwen2-style block (self_attn.q_proj / k_proj / v_proj linears,
    self_attn.head_dim); ValueError naming what is missing otherwise."""
    attn = getattr(block, "self_attn", None)
    q, k, v = (getattr(attn, f"{p}_proj", None) for p in "qkv")
    head_dim = getattr(attn, "head_dim", None)
    if not all(isinstance(m, nn.Linear) for m in (q, k, v)) or not isinstance(head_dim, int):
        raise ValueError(f"abq's qkv_bits needs Llama-style attention (self_attn.q_proj / k_proj / v_proj linears and "
                         f"self_attn.head_dim); {type(block).__name__} has not")
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        raise ValueError(f"abq's qkv_bits: {type(attn).__name__} normalizes queries and keys after q_proj / k_proj "
                         "(q_norm / k_norm), so the projections' outputs are not the attention inputs")
    heads, kv = q.out_features // head_dim, k.out_features // head_dim
    if head_dim % 2 or q.out_features % head_dim or k.out_features % head_dim or v.out_features != k.out_features \
            or heads % kv:
        raise ValueError(f"abq's qkv_bits: q / k / v_proj outputs {q.out_features} / {k.out_features} / "
                         f"{v.out_features} are not whole heads of head_dim={head_dim} (even), query heads a "
                         "multiple of KV heads")
    return AttentionHeads(head_dim, kv, heads // kv)


def attention_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over query rows of KL(p || q) = sum_j p_j (log p_j - log q_j) of attention probabilities [..., T, T]
    (p the float block's target, q the quantized block's)."""
    p, q = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    return (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(dim=-1).mean()


@contextlib.contextmanager
def eager_attention(block: nn.Module, on: bool):
    """With on, the block's attention runs Hugging Face's eager implementation, which returns its probabilities as
    self_attn's second output (SDPA returns None); the config's own choice is restored afterwards."""
    if not on:
        yield
        return
    config = block.self_attn.config
    saved = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = saved


@dataclasses.dataclass
class LETGroup:
    """One smoothed input group while training: names of its linears, theta [m] (s = exp(theta)[index]), and the
    absorber's name in the block with its channel index (None: channel c is the absorber's c)."""
    names: list[str]
    theta: torch.Tensor
    absorber: str
    index: torch.Tensor | None

    def columns(self) -> dict[str, torch.Tensor]:
        """{linear: s [K], the factor of its input columns}."""
        own = torch.exp(self.theta)
        return dict.fromkeys(self.names, own if self.index is None else own[self.index])

    def divisors(self) -> dict[str, torch.Tensor]:
        """{absorber: its own m channel scales, the divisor of its output channels}."""
        return {self.absorber: torch.exp(self.theta)}


@dataclasses.dataclass
class QKGroup:
    """q/k LET while training: theta [kv_heads, head_dim / 2]; s = exp(theta) on channels i and i + head_dim / 2 of
    KV head j (the pair RoPE's rotate_half rotates by one angle) and of every query head reading KV head j (GQA).
    q_proj's rows and bias / s, k_proj's * s: each q . k, before and after RoPE, is unchanged."""
    theta: torch.Tensor
    groups: int

    def columns(self) -> dict[str, torch.Tensor]:
        return {}

    def divisors(self) -> dict[str, torch.Tensor]:
        """{q_proj: s over its output channels, k_proj: 1 / s over its}."""
        s = torch.exp(self.theta).repeat(1, 2)
        return {Q: s.repeat_interleave(self.groups, dim=0).flatten(), K: 1 / s.flatten()}


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
    attn_kl: float = option(0.0, "weight of ABQ-LLM's attention-map term: KL(fp block's attention probabilities || "
                                 "the quantized block's), added to the loss; 0 = off")
    qkv_bits: int = option(16, "queries, keys and values (q / k / v_proj outputs) per token and head, asymmetric, "
                               "2..8 (with let: q/k LET too); 16 = not quantized")

    def __post_init__(self):
        if self.bits is not None:
            if self.wbits != 4 and self.wbits != self.bits:
                raise ValueError(f"bits={self.bits} and wbits={self.wbits} disagree; give one of them")
            self.wbits = self.bits
        if self.wbits not in range(2, 9):
            raise ValueError(f"wbits={self.wbits} is not supported; use 2..8")
        if self.abits != 16 and self.abits not in range(2, 9):
            raise ValueError(f"abits={self.abits} is not supported; use 2..8 or 16 (weight-only)")
        if self.qkv_bits != 16 and self.qkv_bits not in range(2, 9):
            raise ValueError(f"qkv_bits={self.qkv_bits} is not supported; use 2..8 or 16 (not quantized)")
        if self.sym:
            raise ValueError("abq: ABQ-LLM's weight grid is asymmetric; drop sym=True")
        if self.attn_kl < 0:
            raise ValueError(f"attn_kl={self.attn_kl} must be >= 0 (the weight of the attention-map KL term)")
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
        self._heads: AttentionHeads | None = None
        self._teacher = False  # True while the float block runs for attention-map targets: no fake quantization
        self.log: dict[str, dict] = {}

    @property
    def needs_calibration(self) -> bool:
        return self.epochs > 0 and (self.lwc or self.let or self.compensation)

    def check_layer(self, linear: nn.Linear, name: str) -> None:
        gs = resolve_group_size(self.group_size, linear.in_features, name)
        if gs != linear.in_features and gs % 32:
            raise ValueError(f"layer {name!r}: group_size={gs} must be a multiple of 32 for the bit-plane kernels "
                             "(or -1: per channel)")
        if self.qkv_bits != 16 and self._heads is None:
            raise ValueError("abq's qkv_bits needs the model's attention heads: quantize through tquant.quantize")

    def report(self) -> dict:
        return {"training": self.log} if self.log else {}

    def prepare_model(self, model: nn.Module) -> None:
        blocks = find_blocks(model)[1]
        self._blocks = len(blocks)
        if self.qkv_bits != 16:
            self._heads = attention_heads(blocks[0])
        if self.attn_kl and not hasattr(getattr(blocks[0], "self_attn", None), "config"):
            raise ValueError(f"abq's attn_kl needs a Hugging Face self_attn module in each block (it reads the "
                             f"attention probabilities); {type(blocks[0]).__name__} has none: pass attn_kl=0")

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
        heads = self.qkv_bits != 16 and name.endswith((Q, K, V))
        return BitPlaneWeight(codes, scale, zero, self.stored_bits, gs,
                              act_bits=None if self.abits == 16 else self.abits,
                              out_bits=self.qkv_bits if heads else None,
                              out_group=self._heads.head_dim if heads else None)

    def quantized_output(self, module, args, y: torch.Tensor) -> torch.Tensor | None:
        """Forward hook: y on its per-token, per-head qkv_bits grid (straight-through); None (y kept) for the
        float teacher."""
        if self._teacher:
            return None
        return y + (fake_activations(y, self.qkv_bits, self._heads.head_dim).to(y.dtype) - y).detach()

    def quantized_input(self, module, args) -> tuple | None:
        """Forward pre-hook: the linear's input on its per-token abits grid (straight-through); None for the teacher."""
        if self._teacher:
            return None
        return (args[0] + (fake_activations(args[0], self.abits) - args[0]).detach(),) + tuple(args[1:])

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
        if self.qkv_bits != 16:  # kept on the float linears until the driver swaps in BitPlaneLinear's out_bits
            for n in (Q, K, V):
                if n in linears:
                    linears[n].register_forward_hook(self.quantized_output)
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
        hooks = [] if self.abits == 16 else [lin.register_forward_pre_hook(self.quantized_input)
                                             for lin in linears.values()]
        maps = []  # attention probabilities of the last block runs (attn_kl), filled by the self_attn hook
        if self.attn_kl:
            hooks.append(block.self_attn.register_forward_hook(lambda m, a, out: maps.append(out[1])))
        fp_in32 = [h.float() for h in fp_in] if self.attn_kl else None  # the attention teacher's inputs

        def objective(effective, b, rows_, args, kwargs):
            y = hidden(functional_call(block, effective, args, kwargs))
            loss = self.loss(y, t1[b][rows_], None if t2 is None else t2[b][rows_])
            if self.attn_kl:
                with torch.no_grad(), self.teacher():
                    block(fp_in32[b][rows_], *args[1:], **kwargs)
                target, student = maps.pop(), maps.pop()  # the teacher ran last
                loss = loss + self.attn_kl * attention_kl(target, student)
            return loss

        def step_loss(g):
            b, rows_, (args, kwargs) = random_rows(inputs32, self.batch, g)
            return objective(self.effective(block, linears, let, clip, comp), b, rows_, args, kwargs)

        def error():
            effective = self.effective(block, linears, let, clip, comp)
            return sum(objective(effective, b, slice(None), args, kwargs).item()
                       for b, (args, kwargs) in enumerate(inputs32)) / len(inputs32)

        steps = max(1, self.epochs * sum(a[0].shape[0] for a, _ in inputs) // self.batch)
        try:
            with float32_training(block, params), eager_attention(block, self.attn_kl > 0):
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

    @contextlib.contextmanager
    def teacher(self):
        """The float block: the fake-quantization hooks pass their tensors through."""
        self._teacher = True
        try:
            yield
        finally:
            self._teacher = False

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

    def let_groups(self, block, linears, groups, inputs, names) -> list[LETGroup | QKGroup]:
        """A LETGroup for every input group with an exact absorber, theta at SmoothQuant's scales; with qkv_bits
        a QKGroup too, theta 0 (OmniQuant's start)."""
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
        if self.qkv_bits != 16 and Q in linears and K in linears:
            h = self._heads
            out.append(QKGroup(torch.zeros(h.kv_heads, h.head_dim // 2, device=linears[Q].weight.device), h.groups))
        return out

    def effective(self, block, linears, let, clip, comp) -> dict[str, torch.Tensor]:
        """{parameter name: its value in the quantized, transformed block} (differentiable in the trained tensors):
        LET's output-channel divisors (absorbers; q_proj / k_proj rows for q/k LET) and input-column scales, the
        compensation, then each linear's weight on its LWC grid: W <- LWC(diag(1 / d) W diag(s) + l r^T)."""
        col, row, eff = {}, {}, {}
        for g in let:
            col.update(g.columns())
            row.update(g.divisors())
        for name, d in row.items():
            eff.update({f"{name}.{a}": t for a, t in channels_divided(block.get_submodule(name), d).items()})
        for n, lin in linears.items():
            w = eff.get(f"{n}.weight", lin.weight)
            if n in col:
                w = w * col[n][None, :]
            if n in comp:
                w = w + comp[n][0] @ comp[n][1]
            eff[f"{n}.weight"] = lwc_quantize(w, self.maxq, self.layer_group_size(lin, n), clip.get(n))
        return eff

    def fold(self, block, linears, let, comp) -> None:
        """LET and the compensation into the float weights, in place (the same transform effective() applies
        before quantizing)."""
        for g in let:
            for n, s in g.columns().items():
                linears[n].weight.mul_(s[None, :])
            for name, d in g.divisors().items():
                module = block.get_submodule(name)
                for attr, t in channels_divided(module, d).items():
                    getattr(module, attr).copy_(t)
        for n, (left, right) in comp.items():
            linears[n].weight.add_(left @ right)

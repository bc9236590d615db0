"""AWQ (Lin et al., 2024): activation-aware weight quantization, weight-only, on the uniform packed grid.

Per block, before any of its weights is quantized (prepare_block, on the block's float weights and its calibration
inputs, as AutoAWQ runs it), for each input group (the linears reading one tensor: q/k/v, gate/up, down_proj, o_proj)
whose input an op of the block can take a per-channel division of exactly (smoothing.find_absorber: the norm before
q/k/v and gate/up, up_proj before down_proj, v_proj before o_proj; under grouped-query attention v_proj has fewer
channels than o_proj's input and o_proj is left unscaled, as AutoAWQ does):
    x_mean_j = mean_t |x_tj|                                   the group's input, over every calibration token
    w_mean_j = mean over the group's rows and groups of |W_nj| / max_{j' in j's group} |W_nj'|
    s(alpha) = x_mean^alpha / (w_mean^(1 - alpha) + 1e-4)     (duo_scaling, AutoAWQ's default; else x_mean^alpha,
                                                                llm-awq's), clamped to >= 1e-4, divided by
                                                                sqrt(max s * min s)
    for alpha in 0, 1/n_grid, ..., (n_grid - 1)/n_grid, and s = 1 (no scaling, i.e. round-to-nearest): an output
    error with each of the group's weights replaced by Q(W diag(s)) diag(s)^-1 (Q: this method's grid without
    clipping); the least error wins, so the result never does worse than round-to-nearest on that objective.
    search_loss="linear" (default): the MSE of the group's own linears' outputs over every calibration token,
        sum_l ||X D_l^T||^2 / (T sum_l N_l) = sum_l tr(D_l H D_l^T) / sum_l N_l,   D_l = W_l - Q(W_l s) / s [N_l, K],
        H = X^T X / T [K, K] (float32, gathered once in the statistics pass): no forward per candidate, so the search
        costs n_grid + 1 products [N_l, K] x [K, K] instead of n_grid + 1 passes of a module over T tokens.
    search_loss="module" (AutoAWQ's, llm-compressor's): the MSE of the output of the smallest module holding the group
        (self_attn for q/k/v, the MLP for gate/up), from forwards of that module on the search sequences
        (search_samples: the first N; all by default), which sees the attention / gating the group feeds.
    A lone linear (down_proj) is its own smallest module: both objectives are its output MSE, computed from H.
    fold: W diag(s) into the group's linears, diag(s)^-1 into the absorber (smoothing.SmoothedGroup): the float block
    computes the same function
Then per linear (quantize): weight clipping, per output row and group, the clip value m = (1 - i / clip_grid) max|w_g|
for i < max_shrink * clip_grid (i = 0: no clipping) minimizing (w_g - q_g) H_gg (w_g - q_g)^T, q_g the grid value of
clamp(w_g, -m, m) and H_gg the group's block of the mean x x^T of the layer's input: AutoAWQ's ||X_g w_g - X_g q_g||^2
on the float block's inputs divided by s (AutoAWQ samples 512 tokens; here every calibration token: diag(s)^-1 H
diag(s)^-1 of the same H, gathered in the same pass as x_mean, so the driver runs no statistics passes of its own).
With clip_range="minmax" (the default; asymmetric grids) that choice is refined: the group's max, then its min, each
scanned over (1 - i / clip_grid) of itself on the same error, the clamp becoming [lo, hi]: an asymmetric grid spans
[min(w_g, 0), max(w_g, 0)], so AutoAWQ's +-m moves only the end beyond m and cannot trim the other one
(benchmarks/RESULTS.md, "AWQ on the offline model (issue 29)", has what it changed and why AWQ still trails GPTQ at
3 bits).
Layers matching clip_skip are not clipped (AutoAWQ skips q and k: their errors meet in the q k^T product, which a
per-layer output error does not see). Finally
round-to-nearest of the clamped weight on the project's grid (tquant.formats.quantizer, symmetric or min-max with an
integer zero; per group or per channel), a QuantizedWeight as rtn and gptq make, so PackedLinear stores it and every
W4A16 kernel serves it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math

import torch
from torch import nn

from ..calib.block_io import hidden, hooked, rows
from ..calib.smoothing import Absorber, SmoothedGroup, find_absorber
from ..formats.quantizer import qparams
from ..formats.weights import QuantizedWeight
from .base import LayerState, Method, option, register
from .gptq import HessianState

log = logging.getLogger("tquant")

W_EPS = 1e-4  # AutoAWQ's: added to w_mean^(1 - alpha), and the least scale before normalizing
GROUP_EPS = 1e-6  # AutoAWQ's: added to a group's max |w| when normalizing the weights for w_mean


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """w_mean [K] (float32): of the group's weights [N_i, K] stacked, |W| divided by its quantization group's max |W|
    (+ GROUP_EPS), averaged over the rows and the groups a channel falls in."""
    w = torch.cat([t.detach().float() for t in weights]).abs()
    n, k = w.shape
    w = w.reshape(n, k // group_size, group_size)
    return (w / (w.amax(dim=-1, keepdim=True) + GROUP_EPS)).reshape(n, k).mean(dim=0)


def awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """s [K] = x_mean^alpha / (w_mean^(1 - alpha) + 1e-4) (w_mean None: x_mean^alpha), >= 1e-4, divided by
    sqrt(max s * min s); a non-finite factor becomes 1."""
    s = x_mean.float().pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.float().pow(1 - alpha) + W_EPS)
    s = s.clamp(min=W_EPS)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def _grid_values(wg: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """The de-quantized round-to-nearest values of float32 wg [..., group] on the project's grid, each group (last
    dim) its own range: quantizer.dequantize(quantizer.quantize(...)) of quantizer.qparams(wg), the same float ops
    in the same order, in place on one buffer (no int32 codes, no expanded scales)."""
    scale, zero = qparams(wg, bits, sym)
    scale, zero = scale[..., None], zero[..., None]
    return (wg / scale).round_().add_(zero).clamp_(0, 2**bits - 1).sub_(zero).mul_(scale)


def fake_quantized(weight: torch.Tensor, s: torch.Tensor | None, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Q(W diag(s)) diag(s)^-1 in W's dtype (s None: Q(W)), Q round-to-nearest on the project's grid: the values of
    QuantizedWeight.from_rtn(...).dequantize() (divided by s)."""
    w = weight.detach().float()
    if s is not None:
        s = s.float().to(w.device)
        w = w * s
    n, k = w.shape
    q = _grid_values(w.reshape(n, k // group_size, group_size), bits, sym).reshape(n, k)
    return (q if s is None else q.div_(s)).to(weight.dtype)


def output_errors(weights: list[torch.Tensor], h: torch.Tensor, scales: list[torch.Tensor | None], bits: int,
                  group_size: int, sym: bool) -> list[float]:
    """For each candidate s in `scales` (None: no scaling), the MSE of the outputs of linears with weights [N_l, K]
    reading inputs X [T, K] whose Gram matrix is h = X^T X / T [K, K]: sum_l tr(D_l h D_l^T) / sum_l N_l with
    D_l = W_l - fake_quantized(W_l, s) in float32, i.e. sum_l ||X D_l^T||^2 / (T sum_l N_l), without X."""
    h = h.float()
    n = sum(w.shape[0] for w in weights)
    errors = []
    for s in scales:
        total = 0.0
        for w in weights:
            d = w.detach().float() - fake_quantized(w, s, bits, group_size, sym).float()
            total += (d @ h).mul_(d).sum().item()
        errors.append(total / n)
    return errors


def _group_blocks(h: torch.Tensor, group_size: int, g: int) -> torch.Tensor:
    """The diagonal blocks H_gg [G, gs, gs] (float32) of h [K, K]."""
    return torch.stack([h[i * group_size:(i + 1) * group_size, i * group_size:(i + 1) * group_size]
                        for i in range(g)]).float()


def _clip_errors(wg: torch.Tensor, blocks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int,
                 sym: bool) -> torch.Tensor:
    """(w_g - q_g) H_gg (w_g - q_g)^T [N, G] of wg [N, G, gs], q_g the grid value of clamp(w_g, lo, hi) ([N, G])."""
    clamped = torch.maximum(torch.minimum(wg, hi[..., None]), lo[..., None])
    delta = _grid_values(clamped, bits, sym).sub_(wg).transpose(0, 1)  # [G, N, gs]
    return (torch.bmm(delta, blocks) * delta).sum(-1).t()


def clip_values(w: torch.Tensor, h: torch.Tensor, group_size: int, bits: int, sym: bool, grid: int,
                max_shrink: float) -> torch.Tensor:
    """AWQ's weight clipping search: per output row and group of w [N, K], the clip value m [N, G] among
    (1 - i / grid) max|w_g|, i = 0, 1, ... < max_shrink * grid, whose grid value q_g of clamp(w_g, -m, m) gives
    the least (w_g - q_g) H_gg (w_g - q_g)^T (H [K, K]: the input Gram matrix; ties keep the larger m)."""
    n, k = w.shape
    g = k // group_size
    wg = w.detach().float().reshape(n, g, group_size)
    blocks = _group_blocks(h, group_size, g)
    top = wg.abs().amax(dim=-1)  # [N, G]
    best, best_err = top.clone(), torch.full_like(top, float("inf"))
    for i in range(max(1, math.ceil(max_shrink * grid - 1e-9))):  # i < max_shrink * grid
        m = top * (1 - i / grid)
        err = _clip_errors(wg, blocks, -m, m, bits, sym)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, m, best)
    return best


def clip_bounds(w: torch.Tensor, h: torch.Tensor, group_size: int, bits: int, sym: bool, grid: int,
                max_shrink: float, clip_range: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) [N, G]: each row and group of w [N, K] is clamped to [lo, hi] before rounding.
    clip_range="absmax" (AutoAWQ's, llm-awq's): [-m, m], m = clip_values(...).
    clip_range="minmax" (asymmetric grids): from that choice, a scan of hi among (1 - i / grid) max(w_g) with lo
    fixed, then of lo among (1 - i / grid) min(w_g) with hi fixed (i < max_shrink * grid), each value kept only
    where its error is lower than the current one: per row and group never a larger error than absmax's. An
    asymmetric grid spans [min(w_g, 0), max(w_g, 0)], so a clamp to +-m moves only the end beyond m; shrinking the
    two ends separately also trims the other one (at W3 g64 on the offline model's block 0, o_proj's output error
    fell from 2.4e-3 to 1.4e-3 of its output power). On a symmetric grid both give absmax's answer."""
    m = clip_values(w, h, group_size, bits, sym, grid, max_shrink)
    lo, hi = -m, m
    if clip_range == "absmax" or sym:
        return lo, hi
    n, k = w.shape
    g = k // group_size
    wg = w.detach().float().reshape(n, g, group_size)
    blocks = _group_blocks(h, group_size, g)
    best_err = _clip_errors(wg, blocks, lo, hi, bits, sym)
    steps = max(1, math.ceil(max_shrink * grid - 1e-9))
    for end, top in (("hi", wg.amax(dim=-1)), ("lo", wg.amin(dim=-1))):
        for i in range(steps):
            v = top * (1 - i / grid)
            err = _clip_errors(wg, blocks, lo, v, bits, sym) if end == "hi" else \
                _clip_errors(wg, blocks, v, hi, bits, sym)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            if end == "hi":
                hi = torch.where(better, v, hi)
            else:
                lo = torch.where(better, v, lo)
    return lo, hi


def _inspected(block: nn.Module, names: list[str]) -> nn.Module:
    """The module whose output AWQ's scale search compares: a lone linear itself, else the smallest module of the
    block holding every linear of the group (self_attn for q/k/v, the MLP for gate/up; the block itself at worst)."""
    if len(names) == 1:
        return block.get_submodule(names[0])
    common = []
    for parts in zip(*(n.split(".") for n in names)):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    return block.get_submodule(".".join(common)) if common else block


@register
@dataclasses.dataclass
class AWQ(Method):
    name = "awq"

    n_grid: int = option(20, "scale exponents alpha the search tries: 0, 1/n, ..., (n-1)/n (plus no scaling)")
    duo_scaling: bool = option(True, "s = x_mean^alpha / w_mean^(1 - alpha) (AutoAWQ); False: s = x_mean^alpha "
                                     "(llm-awq)")
    search_loss: str = option("linear", "the scale search's error: 'linear' (the group's linear outputs, from their "
                                        "inputs' Gram matrix over every calibration token) or 'module' (the output "
                                        "of the module holding the group, from its forwards; AutoAWQ's)")
    search_samples: int = option(0, "search_loss='module' only: calibration sequences its forwards run on, the first "
                                    "ones (0: all)")
    clip: bool = option(True, "search a clip value per output row and group on the layer's output error")
    clip_grid: int = option(20, "clip steps: the group max times 1, 1 - 1/n, ... (n = clip_grid)")
    max_shrink: float = option(0.5, "the clip search goes down to (1 - max_shrink) times the group max, exclusive")
    clip_range: str = option("minmax", "what the clip search shrinks: 'absmax' (AutoAWQ's: [-m, m], m below max|w| "
                                       "of the group) or 'minmax' (from absmax's choice, the group's max and min "
                                       "each shrunk on its own; asymmetric grids, sym=True is absmax)")
    clip_skip: str = option("*q_proj,*k_proj,*query,*key,*qkv_proj,*Wqkv,*c_attn",
                            "comma-separated name patterns of layers never clipped (AutoAWQ's: q and k)")

    def __post_init__(self):
        super().__post_init__()
        for key in ("n_grid", "clip_grid"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if self.clip_range not in ("absmax", "minmax"):
            raise ValueError(f"clip_range must be 'absmax' or 'minmax', got {self.clip_range!r}")
        if self.search_loss not in ("linear", "module"):
            raise ValueError(f"search_loss must be 'linear' or 'module', got {self.search_loss!r}")
        if isinstance(self.search_samples, bool) or not isinstance(self.search_samples, int) or \
                self.search_samples < 0:
            raise ValueError(f"search_samples must be an integer >= 0 (0: all), got {self.search_samples!r}")
        if self.search_samples and self.search_loss != "module":
            raise ValueError(f"search_samples={self.search_samples} limits search_loss='module''s forwards; the "
                             "'linear' search uses every calibration token at no extra cost: drop search_samples or "
                             "pass search_loss='module'")
        if not isinstance(self.max_shrink, (int, float)) or isinstance(self.max_shrink, bool) or \
                not 0 < self.max_shrink < 1:
            raise ValueError(f"max_shrink must be a number in (0, 1), got {self.max_shrink!r}")
        for key in ("duo_scaling", "clip"):
            if getattr(self, key) not in (True, False):
                raise ValueError(f"{key} must be True or False, got {getattr(self, key)!r}")
        if not isinstance(self.clip_skip, str):
            raise ValueError(  # noqa: TRY004 - an option refused, as the others
                f"clip_skip must be a string of comma-separated name patterns, got {self.clip_skip!r}")
        self.alpha: dict[str, float | None] = {}  # layer -> searched alpha (None: no scaling won)
        self.unscaled: list[str] = []  # layers whose input no op of the block absorbs exactly
        self.clip_ratio: dict[str, float] = {}  # layer -> mean kept share of the groups' grid spans
        self._absorbers: dict[tuple[str, ...], tuple[str, torch.Tensor | None] | None] = {}  # see _absorber
        self._gram: dict[str, torch.Tensor] = {}  # layer -> mean x x^T of its (scaled) input, until quantized

    needs_layer_stats = False  # prepare_block gathers the clip search's statistics itself (one pass a block)

    def new_state(self, name, linear):
        """A plain state for the blocks' linears (prepare_block has their statistics); the lm_head (lm_head=True),
        which no prepare_block sees, gathers its X^T X in a HessianState when clipping."""
        return HessianState(name, linear) if self.clip and name not in self._gram else LayerState(name, linear)

    def report(self) -> dict:
        return {"alpha": dict(self.alpha), "unscaled": list(self.unscaled), "clip_ratio": dict(self.clip_ratio)}

    def _search_inputs(self, inputs):
        if not self.search_samples:
            return list(inputs)
        out, left = [], self.search_samples
        for args, kwargs in inputs:
            n = min(left, args[0].shape[0])
            out.append(rows(args, kwargs, slice(0, n)))
            left -= n
            if not left:
                break
        return out

    @torch.no_grad()
    def prepare_block(self, block, linears, groups, inputs, prefix):
        heads = {g[0]: linears[g[0]] for g in groups if g[0] in linears}  # each input group's first linear
        plan = []  # (names, absorber, inspected module)
        for g in groups:
            if g[0] not in heads:  # an experts module (refused before this, see experts_refusal)
                continue
            absorber = self._absorber(block, [linears[n] for n in g], g, inputs)
            if absorber is None:
                self.unscaled += [prefix + n for n in g]
                continue
            plan.append((g, absorber, _inspected(block, g)))
        if not plan and not self.clip:
            return
        # every calibration sequence: each group's sum |x| and tokens (x_mean) and X^T X (for the linear-output
        # search and the clip search); the search sequences: the calls of the modules searched by forwards (one pass
        # when the search takes them all)
        forwards = [(g, m) for g, _, m in plan if self.search_loss == "module" and len(g) > 1]
        modules = list({id(m): m for _, m in forwards}.values())
        grams = set(heads) if self.clip else {g[0] for g, _, _ in plan} - {g[0] for g, _ in forwards}
        whole = not self.search_samples or self.search_samples >= sum(args[0].shape[0] for args, _ in inputs)
        stats, calls = self._pass(block, inputs, heads, grams, modules if whole else [])
        if not whole and modules:
            calls = self._pass(block, self._search_inputs(inputs), {}, set(), modules)[1]
        scales = {}
        for g, absorber, module in plan:
            group = [linears[n] for n in g]
            gs = self.layer_group_size(group[0], prefix + g[0])
            x_sum, tokens, gram = stats[g[0]]
            w_mean = weight_mean([lin.weight for lin in group], gs) if self.duo_scaling else None
            alphas = [None] + [i / self.n_grid for i in range(self.n_grid)]
            candidates = [None] + [awq_scales(x_sum / max(tokens, 1), w_mean, a) for a in alphas[1:]]
            if id(module) in calls:
                errors = self._module_errors(module, calls[id(module)], group, candidates, gs)
            else:
                errors = output_errors([lin.weight for lin in group], gram / max(tokens, 1), candidates, self.bits,
                                       gs, self.sym)
            best = min(range(len(errors)), key=errors.__getitem__)  # the first least: no scaling wins a tie
            alpha, s = alphas[best], candidates[best]
            for n in g:
                self.alpha[prefix + n] = alpha
            if s is not None:
                SmoothedGroup(group, absorber, scales=s)
                scales[g[0]] = s
        if self.clip:  # each group's input is now x / s: its Gram matrix diag(1/s) X^T X diag(1/s)
            for g in groups:
                if g[0] in heads:
                    _, tokens, gram = stats[g[0]]
                    gram = gram / max(tokens, 1)
                    if g[0] in scales:
                        s = scales[g[0]].to(gram.device)
                        gram = gram / s[:, None] / s[None, :]
                    for n in g:
                        self._gram[prefix + n] = gram

    def _pass(self, block, run, heads: dict[str, nn.Linear], grams: set[str], modules: list[nn.Module]):
        """Run the block on `run` ([(args, kwargs)]): ({head: [sum_t |x_t| fp32, tokens, X^T X fp32 (heads in
        grams) or None]} of each head linear's input, {id(module): [(args, kwargs)] of each call})."""
        stats = {n: [0, 0, None] for n in heads}
        calls = {id(m): [] for m in modules}

        def record_x(name):
            def hook(module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                st = stats[name]
                st[0] = st[0] + x.abs().sum(dim=0)
                st[1] += x.shape[0]
                if name in grams:
                    st[2] = x.t() @ x if st[2] is None else st[2].addmm_(x.t(), x)
            return hook

        def record_call(key):
            def hook(module, args, kwargs):
                calls[key].append((args, kwargs))
            return hook

        hooks = [lin.register_forward_pre_hook(record_x(n)) for n, lin in heads.items()]
        hooks += [m.register_forward_pre_hook(record_call(id(m)), with_kwargs=True) for m in modules]
        with hooked(hooks):
            for args, kwargs in run:
                block(*args, **kwargs)
        return stats, calls

    def _absorber(self, block, group, names, inputs) -> Absorber | None:
        """find_absorber's answer for this group, tested on the first block where a group of these names appears
        and reused (by the absorber's name in the block) in the later blocks, which repeat the first one's modules:
        the test runs the block once per candidate module (0.73 s of the 12.6 s prepare_block takes with
        search_loss='linear' on a block of the offline model)."""
        key = tuple(names)
        if key not in self._absorbers:
            found = find_absorber(block, group, inputs)
            where = None if found is None else next(n for n, m in block.named_modules() if m is found.module)
            self._absorbers[key] = None if found is None else (where, found.index)
        if self._absorbers[key] is None:
            return None
        where, index = self._absorbers[key]
        return Absorber(block.get_submodule(where), index)

    def _module_errors(self, module, calls, group, candidates, gs) -> list[float]:
        """For each candidate s (None: no scaling) the output MSE of `module` on `calls` with the group's weights
        fake-quantized with s, against its float output."""
        teacher = [hidden(module(*a, **k)).float() for a, k in calls]
        total = sum(t.numel() for t in teacher)

        def error(s):
            saved = [lin.weight.data for lin in group]
            try:
                for lin in group:
                    lin.weight.data = fake_quantized(lin.weight, s, self.bits, gs, self.sym)
                return sum(torch.nn.functional.mse_loss(hidden(module(*a, **k)).float(), t, reduction="sum").item()
                           for (a, k), t in zip(calls, teacher)) / total
            finally:
                for lin, w in zip(group, saved):
                    lin.weight.data = w

        return [error(s) for s in candidates]

    def _clipped(self, name: str) -> bool:
        return self.clip and not any(fnmatch.fnmatch(name, p.strip()) for p in self.clip_skip.split(",") if p.strip())

    def quantize(self, state, linear, name) -> QuantizedWeight:
        w = linear.weight.detach().float()
        gs = self.layer_group_size(linear, name)
        gram = self._gram.pop(name, None)
        if self._clipped(name):
            if gram is None:
                if not getattr(state, "tokens", 0):
                    raise ValueError(f"awq: layer {name!r} saw no calibration data")
                gram = state.hessian
            lo, hi = clip_bounds(w, gram, gs, self.bits, self.sym, self.clip_grid, self.max_shrink, self.clip_range)
            wg = w.reshape(w.shape[0], -1, gs)
            # the clamped range's width over the group's own (on the grid's span, which holds 0)
            span = wg.amax(dim=-1).clamp(min=0) - wg.amin(dim=-1).clamp(max=0)
            kept = hi.clamp(min=0).minimum(wg.amax(dim=-1).clamp(min=0)) - \
                lo.clamp(max=0).maximum(wg.amin(dim=-1).clamp(max=0))
            self.clip_ratio[name] = round((kept / span.clamp_min(torch.finfo(torch.float32).tiny)).mean().item(), 4)
            w = torch.maximum(torch.minimum(w, hi.repeat_interleave(gs, dim=1)), lo.repeat_interleave(gs, dim=1))
        return QuantizedWeight.from_rtn(w, self.bits, gs, self.sym)

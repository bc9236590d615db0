"""SmoothQuant's migration of activation outliers into the weights (Xiao et al., 2023), used by the
weight-activation methods (smoothquant, qqq).

For the linears reading one input X [T, K] (an input group: q/k/v, gate/up, o_proj, down_proj):
    s_j = max_t |X_tj|^alpha / max_{linears, n} |W_nj|^(1 - alpha)
    X W^T = (X diag(s)^-1) (W diag(s))^T          every W of the group gets its columns times s
The division by s is folded into the op that produced X where one can absorb it exactly: a norm's weight
and bias (input_layernorm before q/k/v), or the output rows of a linear whose output reaches X through
channel-wise homogeneous ops (v_proj before o_proj without GQA, up_proj before down_proj, fc1 before a ReLU).
Under GQA (tied=True, QServe's o_proj smoothing) v_proj's channel (g, d) feeds o_proj's input channels (h, d) of
the rep query heads h of KV head g: s is tied over them (max |X| and max |W| over the tied channels) and v_proj
takes it once (Absorber.index maps an input channel to the absorber's).
Which module absorbs is tested, not assumed from names: on a float32 copy of the block, its channels are
divided by random factors r, the group's columns multiplied by r, and the block's output must stay the same
to float32 rounding (a SiLU gate would pass a loose test where its inputs are large, since SiLU is nearly
homogeneous there). Where no module passes, the division happens at run time in the activation-quantization
kernel (the layer's `smooth` buffer).
"""
from __future__ import annotations

import contextlib
import copy
from typing import NamedTuple

import torch
from torch import nn

from .block_io import fp32, hidden, hooked, rows

ABSORB_TOL = 1e-4  # relative change of the float32 block output that counts as exact (absorbers give ~1e-6)


@torch.no_grad()
def input_absmax(block: nn.Module, heads: dict[str, nn.Linear], inputs) -> dict[str, torch.Tensor]:
    """{name: max_t |x_tj| [K] in fp32} of the input of each linear in `heads`, over every calibration batch."""
    amax = {}

    def record(name):
        def hook(module, args):
            m = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
            amax[name] = m if name not in amax else torch.maximum(amax[name], m)
        return hook

    with hooked([lin.register_forward_pre_hook(record(n)) for n, lin in heads.items()]):
        for args, kwargs in inputs:
            block(*args, **kwargs)
    return amax


class Absorber(NamedTuple):
    """The module taking diag(s)^-1 for a group's K input channels: input channel c is its output channel c
    (index None) or index[c] (int64 [K]: GQA's v_proj, several input channels to one of its channels)."""
    module: nn.Module
    index: torch.Tensor | None = None


def _tie(v: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """v [K] with each channel replaced by the max over the channels sharing its index (unchanged for None)."""
    if index is None:
        return v
    tied = v.new_zeros(int(index.max()) + 1).scatter_reduce(0, index, v, "amax", include_self=False)
    return tied[index]


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float,
                     index: torch.Tensor | None = None) -> torch.Tensor:
    """s [K] = max|X_j|^alpha / max|W_j|^(1 - alpha) over the group's weights [N_i, K] (fp32, >= 1e-5); with
    index, both maxima are taken over the channels sharing an index, so s is equal across them."""
    w_max = _tie(torch.cat([w.detach().abs().float() for w in weights]).amax(dim=0), index).clamp_min(1e-5)
    s = _tie(act_max.float(), index).clamp_min(1e-5).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp_min(1e-5)


def _channel_tensors(module: nn.Module, k: int) -> list[torch.Tensor]:
    """The tensors of `module` whose dim 0 indexes k output channels: a linear's weight rows and bias, or a
    norm-like module's 1-D weight and bias. Empty when the module has no such channels."""
    if isinstance(module, nn.Linear):
        return [t for t in (module.weight, module.bias) if t is not None] if module.out_features == k else []
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() == k:
        bias = getattr(module, "bias", None)
        return [weight] + ([bias] if isinstance(bias, torch.Tensor) and bias.shape == weight.shape else [])
    return []


def _scale_channels(tensors, factor: torch.Tensor) -> None:
    for t in tensors:
        t.data.mul_(factor.to(t.dtype).view(-1, *[1] * (t.dim() - 1)))


def _snapshot(tensors):
    """A function that puts the tensors' current values back."""
    saved = [(t, t.data.clone()) for t in tensors]
    return lambda: [t.data.copy_(v) for t, v in saved]


@contextlib.contextmanager
def _restored(tensors):
    restore = _snapshot(tensors)
    try:
        yield
    finally:
        restore()


def _gqa_index(k: int, m: int, head_dim: int | None) -> torch.Tensor | None:
    """For K = rep * m input channels of rep * (m / head_dim) heads reading m / head_dim KV heads: the KV channel
    of each input channel, (c // (head_dim rep)) head_dim + c % head_dim (HF's repeat_kv order); else None."""
    if not head_dim or m >= k or k % m or m % head_dim:
        return None
    c = torch.arange(k)
    return (c // (head_dim * (k // m))) * head_dim + c % head_dim


@torch.no_grad()
def find_absorber(block: nn.Module, group: list[nn.Linear], inputs, tied: bool = False) -> Absorber | None:
    """The module of `block` that can take diag(s)^-1 for the input of `group` exactly (the one changing the
    output least, below ABSORB_TOL), or None; tested on the first calibration sequence of `inputs`. tied: also
    try modules with fewer channels, one per KV-head channel (GQA's v_proj for o_proj), s tied as above."""
    names = {id(m): n for n, m in block.named_modules()}
    probe = copy.deepcopy(block).float()
    group_names = {names[id(lin)] for lin in group}
    columns = [probe.get_submodule(n).weight for n in group_names]
    k = group[0].in_features
    args, kwargs = fp32(rows(*inputs[0], slice(0, 1)))
    reference = hidden(probe(*args, **kwargs))
    g = torch.Generator().manual_seed(0)
    r = torch.empty(k).uniform_(0.5, 2.0, generator=g).to(columns[0].device)
    head_dim = next((m.head_dim for m in block.modules() if isinstance(getattr(m, "head_dim", None), int)), None)
    best, best_err = None, ABSORB_TOL
    for name, module in probe.named_modules():
        if name in group_names:
            continue
        index, tensors = None, _channel_tensors(module, k)
        if not tensors and tied and isinstance(module, nn.Linear):
            index = _gqa_index(k, module.out_features, head_dim)
            tensors = _channel_tensors(module, module.out_features) if index is not None else []
        if not tensors:
            continue
        factor = r if index is None else r[:module.out_features]
        with _restored(tensors + columns):
            _scale_channels(tensors, 1 / factor)
            for w in columns:
                w.data.mul_(factor if index is None else factor[index.to(factor.device)])
            out = hidden(probe(*args, **kwargs))
        err = ((out - reference).norm() / reference.norm().clamp_min(1e-30)).item()
        if err < best_err:
            best, best_err = Absorber(block.get_submodule(name), index), err
    return best


class SmoothedGroup:
    """Applies s = smoothing_scales(act_max, group's weights, alpha) to one input group: columns of each
    linear times s, and 1/s either into `absorber` (find_absorber's) or as a run-time divisor (a forward
    pre-hook x -> x / s on each linear, which ActQuantLinear's kernel replaces). undo() restores the weights
    and removes the hooks (used while searching alpha). scales=: s [K] given (AWQ's searched scales; equal across
    channels sharing an absorber index), act_max and alpha unused."""

    def __init__(self, group: list[nn.Linear], absorber: Absorber | None, act_max: torch.Tensor | None = None,
                 alpha: float | None = None, *, scales: torch.Tensor | None = None):
        index = None if absorber is None else absorber.index
        if scales is None:
            s = smoothing_scales(act_max, [lin.weight for lin in group], alpha,
                                 None if index is None else index.to(act_max.device))
        else:
            s = scales.detach().float().to(group[0].weight.device)
        self.s = s
        self.absorber = absorber
        absorbed = []
        if absorber is not None:
            m = group[0].in_features if index is None else int(index.max()) + 1
            absorbed = _channel_tensors(absorber.module, m)
            own = s if index is None else s.new_zeros(m).scatter_(0, index.to(s.device), s)  # equal where tied
        self._restore = _snapshot(absorbed + [lin.weight for lin in group])
        if absorbed:
            _scale_channels(absorbed, 1 / own)
        for lin in group:
            lin.weight.data.mul_(s.to(lin.weight.dtype))
        self._hooks = [] if absorber is not None else [
            lin.register_forward_pre_hook(lambda m, a: (a[0] / s.to(a[0].dtype),) + tuple(a[1:])) for lin in group]

    @property
    def runtime(self) -> torch.Tensor | None:
        """The divisor the quantized layers must apply at run time, or None when it was absorbed."""
        return self.s if self.absorber is None else None

    def undo(self) -> None:
        self._restore()
        for h in self._hooks:
            h.remove()

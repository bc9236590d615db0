"""SmoothAttention (QServe, Lin et al., 2024): a key's outlier channels moved into the query before the keys are
quantized per token (qoq_kv4).

Per decoder layer, with K [B, Hkv, T, D] the keys as the model caches them (after RoPE) on the calibration set:
    λ [Hkv, D]  = max_{b,t} |K_bhtj|^alpha               (max |K| clamped to >= 1e-5 first)
    λ_j = λ_{j+D/2} = the larger of the two              HF's rotate_half turns channel j with j + D/2: a scale
                                                         equal on both commutes with every rotation
    k_proj rows of KV head h, channel j (weight, bias)   / λ_hj
    q_proj rows of every query head reading h (GQA: query head h_q reads h_q // (Hq / Hkv))   * λ_hj
so every q·k is unchanged in exact arithmetic while the cached key channels' ranges become max|K_j|^(1 - alpha).
λ is rounded to 4 significant digits (float64) before folding: the recorded value is exactly the one folded.

Capture: the calibration forward runs the base model with a transformers Cache of KeyRange layers, which store
nothing and hand each call's K, V straight back (a single prefill attends to exactly its own tokens). The
maximum is taken of what attention gives the cache, so it is post-RoPE for any model caching through the Cache
API, with no hooks and no per-model RoPE code. The attention modules are the modules holding a q_proj and a
k_proj, in model order: the i-th one owns cache layer i.

Check: the fold is exact only if attention reads q_proj / k_proj through rotations of (j, j + D/2) pairs and
nothing channel-wise in between. Before any weight changes, every attention module is run as a float32 copy on
its inputs from the start of the first calibration sequence, with and without random tied λ in [0.5, 2] folded
in; an output change above smoothing.ABSORB_TOL (q / k norms after the projections as Qwen3's q_norm / k_norm,
partial or interleaved RoPE) is refused.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.cache_utils import Cache

from .block_io import PrefillProbe, fp32, hidden, hooked
from ..models import cache_kwarg, head_dim
from .smoothing import ABSORB_TOL

CHECK_TOKENS = 64  # tokens of the first calibration sequence the fold check runs on


class KeyRange(PrefillProbe):
    """Keeps only absmax: max over batches and tokens of |K|, fp32 [Hkv, D]."""

    def __init__(self):
        super().__init__()
        self.absmax: torch.Tensor | None = None

    def observe(self, keys, values, args, kwargs) -> None:
        m = keys.detach().abs().amax(dim=(0, 2)).float()
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules holding a q_proj and a k_proj, in model order (one per decoder layer)."""
    found = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")]
    if not found:
        raise ValueError(f"SmoothAttention folds into separate q_proj / k_proj linears; {type(model).__name__} "
                         "has none")
    return found


def projections(attn: nn.Module, index: int) -> tuple[nn.Linear, nn.Linear]:
    """(q_proj, k_proj) of attention module `index`; ValueError unless both are float nn.Linear."""
    q, k = attn.q_proj, attn.k_proj
    if not (isinstance(q, nn.Linear) and isinstance(k, nn.Linear)):
        raise ValueError(f"layer {index}'s q_proj / k_proj are {type(q).__name__} / {type(k).__name__}, not float "
                         "nn.Linear: apply qoq_kv4 before the weight method")
    return q, k


def tie_rotary_pairs(lam: torch.Tensor) -> torch.Tensor:
    """λ [..., D] with channels j and j + D/2 both set to the larger of the two."""
    half = lam.shape[-1] // 2
    m = torch.maximum(lam[..., :half], lam[..., half:])
    return torch.cat([m, m], dim=-1)


def fold(q_proj: nn.Linear, k_proj: nn.Linear, lam: torch.Tensor) -> None:
    """k_proj's output rows / λ [Hkv, D], q_proj's * λ of each query head's KV head; weights and biases."""
    rep = q_proj.out_features // k_proj.out_features
    for lin, factor in ((k_proj, 1 / lam), (q_proj, lam.repeat_interleave(rep, dim=0))):
        f = factor.reshape(-1).to(lin.weight.device)
        lin.weight.data.copy_(lin.weight * f[:, None])
        if lin.bias is not None:
            lin.bias.data.copy_(lin.bias * f)


@torch.no_grad()
def check_fold(model, attns: list[nn.Module], ids: torch.Tensor) -> None:
    """ValueError unless folding random tied λ into each attention module leaves its float32 output unchanged
    (on its inputs from ids [1, t])."""
    inputs = {}

    def keep(i):
        return lambda module, args, kwargs: inputs.setdefault(i, (args, kwargs))

    with hooked([a.register_forward_pre_hook(keep(i), with_kwargs=True) for i, a in enumerate(attns)]):
        model.base_model(input_ids=ids, use_cache=False)
    g = torch.Generator().manual_seed(0)
    d = head_dim(model.config)
    for i, attn in enumerate(attns):
        probe = copy.deepcopy(attn).float().eval()
        q, k = projections(probe, i)
        args, kwargs = fp32(inputs[i])
        reference = hidden(probe(*args, **kwargs))
        fold(q, k, tie_rotary_pairs(torch.empty(k.out_features // d, d).uniform_(0.5, 2.0, generator=g)))
        err = ((hidden(probe(*args, **kwargs)) - reference).norm() / reference.norm().clamp_min(1e-30)).item()
        if err > ABSORB_TOL:
            raise ValueError(
                f"SmoothAttention cannot be folded into {type(model).__name__}: scaling layer {i}'s key channels by "
                f"1/λ and its query channels by λ (tied over RoPE pairs j, j + head_dim/2) changes its attention "
                f"output by {err:.1e} (relative); its attention does not commute with that (q / k norms after the "
                f"projections, e.g. Qwen3's q_norm / k_norm, or a partial / interleaved RoPE)")


@torch.no_grad()
def key_absmax(model, ids: torch.Tensor, batch_size: int, n_layers: int) -> list[torch.Tensor]:
    """max |K| [Hkv, D] (fp32) per decoder layer of the post-RoPE keys the model caches on ids [n, t]."""
    layers = [KeyRange() for _ in range(n_layers)]
    cache = Cache(layers=layers)
    device = next(model.parameters()).device
    for start in range(0, ids.shape[0], batch_size):
        model.base_model(input_ids=ids[start : start + batch_size].to(device), use_cache=True,
                         **{cache_kwarg(model.base_model): cache})
    for i, layer in enumerate(layers):
        if layer.absmax is None or not torch.isfinite(layer.absmax).all():
            raise ValueError(f"decoder layer {i} cached no finite keys on the calibration set")
    return [layer.absmax for layer in layers]


def smoothing_factors(absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """λ [Hkv, D] = max|K|^alpha, tied over RoPE pairs, rounded to 4 significant digits (float64)."""
    lam = tie_rotary_pairs(absmax.clamp_min(1e-5).pow(alpha))
    return torch.tensor([[float(f"{v:.4g}") for v in row] for row in lam.tolist()], dtype=torch.float64,
                        device=absmax.device)


@torch.no_grad()
def smooth_attention(model, ids: torch.Tensor, alpha: float, batch_size: int = 8) -> list[torch.Tensor]:
    """Fold SmoothAttention into every decoder layer of `model` (in place) from calibration ids [n, t], on the
    model's device; returns λ [Hkv, D] (float64) per layer."""
    attns = attention_modules(model)
    pairs = [projections(a, i) for i, a in enumerate(attns)]
    check_fold(model, attns, ids[:1, :CHECK_TOKENS].to(next(model.parameters()).device))
    lams = [smoothing_factors(m, alpha) for m in key_absmax(model, ids, batch_size, len(attns))]
    for (q, k), lam in zip(pairs, lams):
        fold(q, k, lam)
    return lams

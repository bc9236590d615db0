"""KVQuant (Hooper et al., 2024): a calibrated 2/3/4-bit KV cache. Keys quantized before RoPE, per channel with
ranges calibrated offline (so each new token is quantized at once); values per token with ranges computed online;
per-layer non-uniform codebooks (NUQ) from sensitivity-weighted k-means; dense-and-sparse outliers in fp16; the
first `sink` tokens in full precision. Format: tquant.kv.kvquant_format; cache layer: tquant.kv.kvquant_cache.

Calibration (calibrate), on the model's device, over the calibration ids in batches:
    one forward (and, for Fisher weights, one backward of the LM loss) through a recording cache that sees what
    the model caches: post-RoPE keys (un-rotated to pre-RoPE with each call's cos / sin, as the cache layer
    does), values, and the gradients g of the loss w.r.t. both; the first `sink` tokens of each sequence are
    left out (they stay exact)
    key ranges per KV head and channel: lo, hi = the (outliers / 2) and (1 - outliers / 2) quantiles over the
    calibration tokens (min and max with outliers=0); entries outside are outliers
    codebooks per layer, one for K and one for V: k-means (tquant.formats.nuq) of the normalized dense entries weighted
    by g^2 (Fisher information; fisher=False: unweighted), or the uniform grid (nuq=False)
Memory: the calibration keys and their weights are kept (float32, on the model's device) until the key ranges
are known; values stream into histograms.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from ..kv import kvquant_format as fmt
from ..calib.block_io import PrefillProbe
from ..kv.kvquant_cache import KVQuantLayer, call_cos_sin
from ..formats.nuq import WeightedHistogram
from .base import option, register
from ..models import cache_kwarg, head_dim
from .kv_base import KVCacheMethod

CALIBRATED = ("key_offset", "key_scale", "key_codebook", "value_codebook")


@register
@dataclasses.dataclass
class KVQuant(KVCacheMethod):
    name = "kvquant"
    needs_calibration = True

    kv_bits: int = option(4, "bits per cached key / value element: 2, 3 or 4")
    outliers: float = option(0.01, "fraction of entries kept sparse in fp16 (keys: calibrated per-channel "
                                   "quantiles; values: the top fraction of each token); 0 = dense only")
    sink: int = option(1, "first tokens of each sequence kept in full precision (the attention sink)")
    pre_rope: bool = option(True, "quantize keys before RoPE (re-applied on read); False: keys as cached")
    nuq: bool = option(True, "non-uniform per-layer codebooks from k-means; False: a uniform grid")
    fisher: bool = option(True, "weight the k-means by Fisher information (squared LM-loss gradients of the "
                                "keys / values); False: plain k-means")
    prefill_with_quant: bool = option(False, "a prefill attends to its own keys / values as quantized (True) or "
                                             "exact (False); later tokens see the quantized store either way")
    key_offset: list | None = option(None, "calibrated: per layer [KV heads][head_dim] centers of the key ranges")
    key_scale: list | None = option(None, "calibrated: per layer [KV heads][head_dim] half-widths of the key ranges")
    key_codebook: list | None = option(None, "calibrated: per layer the 2^kv_bits key centroids in [-1, 1]")
    value_codebook: list | None = option(None, "calibrated: per layer the 2^kv_bits value centroids in [-1, 1]")
    rope_inv_freq: list | None = option(None, "calibrated (pre_rope): the model's RoPE inverse frequencies")
    rope_scaling: float = option(1.0, "calibrated (pre_rope): the model's RoPE attention scaling")

    def __post_init__(self):
        fmt.check_bits(self.kv_bits)
        if isinstance(self.outliers, bool) or not isinstance(self.outliers, (int, float)) \
                or not 0 <= self.outliers < 0.5:
            raise ValueError(f"kvquant: outliers={self.outliers!r} must be a fraction in [0, 0.5)")
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"kvquant: sink={self.sink!r} must be a number of tokens >= 0")
        given = [getattr(self, f) is not None for f in CALIBRATED]
        if any(given) and not all(given):
            raise ValueError(f"kvquant: the calibrated fields {CALIBRATED} come together; got only some of them")
        if self.calibrated() and any(len(c) != 2**self.kv_bits for cb in (self.key_codebook, self.value_codebook)
                                     for c in cb):
            raise ValueError(f"kvquant: the calibrated codebooks do not have 2^{self.kv_bits} entries")
        if self.calibrated() and self.pre_rope and self.rope_inv_freq is None:
            raise ValueError("kvquant: a calibrated pre_rope spec needs rope_inv_freq")

    def validate(self, config) -> None:
        if not self.calibrated():
            return
        layers, heads, d = (config.num_hidden_layers, getattr(config, "num_key_value_heads", None)
                            or config.num_attention_heads, head_dim(config))
        shapes = {"key_offset": (layers, heads, d), "key_scale": (layers, heads, d),
                  "key_codebook": (layers, 2**self.kv_bits), "value_codebook": (layers, 2**self.kv_bits)}
        if self.pre_rope:
            shapes["rope_inv_freq"] = (d // 2,)
        for field, shape in shapes.items():
            try:
                t = torch.tensor(getattr(self, field), dtype=torch.float32)
            except (TypeError, ValueError) as e:
                raise ValueError(f"kvquant: {field} is not a table of numbers ({e})") from None
            if tuple(t.shape) != shape:
                raise ValueError(f"kvquant: {field} has shape {tuple(t.shape)}, the model needs {shape}")
            if not torch.isfinite(t).all():
                raise ValueError(f"kvquant: {field} holds non-finite values")
            if field == "key_scale" and (t <= 0).any():
                raise ValueError("kvquant: key_scale (a divisor) holds values <= 0")
        if not (isinstance(self.rope_scaling, (int, float)) and math.isfinite(self.rope_scaling)):
            raise ValueError(f"kvquant: rope_scaling={self.rope_scaling!r} is not a finite number")

    def calibrated(self) -> bool:
        return self.key_codebook is not None

    def check_model(self, config) -> None:
        if not all(getattr(config, a, None) for a in ("num_hidden_layers", "num_attention_heads", "hidden_size")):
            raise ValueError(f"kvquant: {type(config).__name__} has no KV cache shape (num_hidden_layers, "
                             f"num_attention_heads, hidden_size)")
        if self.pre_rope and getattr(config, "rope_parameters", None) is None \
                and getattr(config, "rope_theta", None) is None:
            raise ValueError(f"kvquant: pre_rope=True needs a model with rotary position embeddings and "
                             f"{type(config).__name__} has none; pass pre_rope=False to quantize the keys as cached")
        if self.calibrated():
            shape = (config.num_hidden_layers, getattr(config, "num_key_value_heads", None)
                     or config.num_attention_heads, head_dim(config))
            got = (len(self.key_offset), len(self.key_offset[0]), len(self.key_offset[0][0]))
            if got != shape:
                raise ValueError(f"kvquant was calibrated for {got} (layers, KV heads, head_dim); this model has "
                                 f"{shape}")

    def make_layer(self, layer_idx: int, kernel: bool | None):
        if not self.calibrated():
            raise ValueError("kvquant is not calibrated: run tquant.quantize(model, 'kvquant', calib=...) first")
        params = fmt.LayerParams(*(torch.tensor(getattr(self, f)[layer_idx], dtype=torch.float32)
                                   for f in CALIBRATED))
        rope = (torch.tensor(self.rope_inv_freq, dtype=torch.float32), self.rope_scaling) if self.pre_rope else None
        return KVQuantLayer(params, self.kv_bits, self.sink, self.outliers, self.prefill_with_quant, rope, kernel)

    def calibrate(self, model, ids, batch_size: int = 8) -> None:
        if ids.shape[1] <= self.sink:
            raise ValueError(f"kvquant: calibration sequences of {ids.shape[1]} tokens leave none beyond the "
                             f"sink of {self.sink}")
        if self.pre_rope:
            self.rope_inv_freq, self.rope_scaling = _model_rope(model)
        rope = (torch.tensor(self.rope_inv_freq), self.rope_scaling) if self.pre_rope else None
        n_layers, grads = model.config.num_hidden_layers, self.nuq and self.fisher
        keys, key_w = [[] for _ in range(n_layers)], [[] for _ in range(n_layers)]
        value_hist = [WeightedHistogram() for _ in range(n_layers)]
        device = model.get_input_embeddings().weight.device
        was_training = model.training
        model.eval()
        try:
            for batch in ids.to(device).split(batch_size):
                for i, (k, v, gk, gv, args, kwargs) in enumerate(_record(model, batch, grads)):
                    if rope is not None:
                        cos, sin = call_cos_sin(args, kwargs, rope, k.dtype, 0, k.shape[-2], k.device)
                        k, gk = fmt.unrotate(k, cos, sin), None if gk is None else fmt.unrotate(gk, cos, sin)
                    k, v = k[..., self.sink:, :].float(), v[..., self.sink:, :].float()
                    keys[i].append(k.permute(1, 3, 0, 2).flatten(2))  # [H, D, tokens]
                    if grads:
                        gk, gv = gk[..., self.sink:, :].float() ** 2, gv[..., self.sink:, :].float() ** 2
                        key_w[i].append(gk.permute(1, 3, 0, 2).flatten(2))
                    vn, _, _, mask = fmt.normalize_values(v, fmt.value_outliers(self.outliers, v.shape[-1]))
                    value_hist[i].add(vn[~mask], gv[~mask] if grads else None)
        finally:
            model.train(was_training)
        fields = {f: [] for f in CALIBRATED}
        for i in range(n_layers):
            offset, scale, key_hist = self._key_ranges(torch.cat(keys[i], -1),
                                                       torch.cat(key_w[i], -1) if grads else None)
            keys[i] = key_w[i] = None
            codebooks = [h.codebook(2**self.kv_bits) if self.nuq else fmt.uniform_codebook(self.kv_bits)
                         for h in (key_hist, value_hist[i])]
            for f, x in zip(CALIBRATED, (offset, scale, *codebooks)):
                fields[f].append(x.tolist())
        for f, x in fields.items():
            setattr(self, f, x)

    def _key_ranges(self, x: torch.Tensor, w: torch.Tensor | None):
        """Per-channel offset, scale [H, D] of calibration keys x [H, D, N] and the histogram of their normalized
        dense entries (weights w [H, D, N] or None)."""
        n = x.shape[-1]
        m = int(self.outliers / 2 * n)
        lo, hi = x.kthvalue(1 + m, dim=-1).values, x.kthvalue(n - m, dim=-1).values
        offset, scale = (hi + lo) / 2, torch.where(hi > lo, (hi - lo) / 2, torch.ones_like(hi))
        kn = (x - offset[..., None]) / scale[..., None]
        dense = kn.abs() <= 1
        hist = WeightedHistogram()
        if self.nuq:
            hist.add(kn[dense], None if w is None else w[dense])
        return offset, scale, hist


class _Recorder(PrefillProbe):
    """Keeps what one forward hands it (K, V and the update's args, kwargs)."""

    def observe(self, keys, values, args, kwargs) -> None:
        self.keys, self.values, self.args, self.kwargs = keys, values, args, kwargs


def _record(model, batch: torch.Tensor, grads: bool):
    """Per decoder layer: (K, V as cached, dLoss/dK, dLoss/dV or None, the update's args, kwargs) of one forward
    of `batch` (the LM loss's gradients when grads)."""
    layers = [_Recorder() for _ in range(model.config.num_hidden_layers)]
    with torch.set_grad_enabled(grads):
        embeds = model.get_input_embeddings()(batch).detach().requires_grad_(grads)
        logits = model(inputs_embeds=embeds, use_cache=True, **{cache_kwarg(model): Cache(layers=layers)}).logits
        missing = [i for i, layer in enumerate(layers) if layer.keys is None]
        if missing:
            raise ValueError(f"kvquant: decoder layers {missing} never updated the KV cache during calibration")
        tensors = [t for layer in layers for t in (layer.keys, layer.values)]
        g = [None] * len(tensors)
        if grads:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
            g = torch.autograd.grad(loss, tensors)
    return [(layer.keys.detach(), layer.values.detach(), g[2 * i], g[2 * i + 1], layer.args, layer.kwargs)
            for i, layer in enumerate(layers)]


def _model_rope(model) -> tuple[list, float]:
    """The inverse frequencies and attention scaling of the model's rotary embedding."""
    rotary = next((m for m in model.modules() if hasattr(m, "inv_freq") and hasattr(m, "attention_scaling")), None)
    if rotary is None:
        raise ValueError(f"kvquant: pre_rope=True needs a rotary embedding and {type(model).__name__} has none; "
                         f"pass pre_rope=False to quantize the keys as cached")
    rope_type = getattr(rotary, "rope_type", "default")
    if "dynamic" in rope_type or rope_type == "longrope":
        raise ValueError(f"kvquant: RoPE type {rope_type!r} changes its frequencies with the sequence length; "
                         f"pass pre_rope=False")
    return rotary.inv_freq.float().tolist(), float(rotary.attention_scaling)

"""fp8_kv: an FP8 (e4m3) KV cache, the format vLLM serves (kv_cache_dtype="fp8"): keys and values stored as
float8_e4m3fn with one fp32 scale per (layer, KV head) for keys and one for values (tquant.kv.fp8_format; cache layer
tquant.kv.fp8_cache.FP8Layer, static form tquant.kv.fp8_static_cache, decode kernel tquant.kv.attention's
fp8_decode_attention). Every token is stored in fp8: no full-precision window, no sink.

Scales:
    scale="calibrated" (default)  s = max |x| / 448 per layer and KV head over the calibration set, x the keys (after
                                  RoPE, as the model caches them) or the values: the largest calibration value lands on
                                  e4m3's largest, 448 (vLLM's calibrated k_scale / v_scale, per head here); a head whose
                                  maximum is 0 gets 1.0. Later values past the calibrated range saturate at +-448 s.
    scale="none"                  s = 1.0 for every head (vLLM's uncalibrated fp8 cache): |x| past 448 saturates, and
                                  |x| below 2^-6 is subnormal (absolute error up to 2^-10).
The scales are recorded in the spec (k_scales, v_scales [layer][KV head]) and saved with the model.
"""
from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import Cache

from ..calib.block_io import PrefillProbe
from ..kv.fp8_format import absmax_scale
from ..models import cache_kwarg
from .base import option, register
from .kv_base import KVCacheMethod

SCALES = ("calibrated", "none")


class KVAbsmax(PrefillProbe):
    """Keeps max |K| and max |V| over batches, tokens and channels: fp32 [Hkv] each."""

    def __init__(self):
        super().__init__()
        self.k_absmax = self.v_absmax = None

    def observe(self, keys, values, args, kwargs) -> None:
        k, v = (x.detach().abs().amax(dim=(0, 2, 3)).float() for x in (keys, values))
        self.k_absmax = k if self.k_absmax is None else torch.maximum(self.k_absmax, k)
        self.v_absmax = v if self.v_absmax is None else torch.maximum(self.v_absmax, v)


def kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


@register
@dataclasses.dataclass
class FP8KV(KVCacheMethod):
    name = "fp8_kv"

    scale: str = option("calibrated", "'calibrated': per layer and KV head max |K| (max |V|) / 448 over the "
                                      "calibration set; 'none': 1.0 (vLLM's uncalibrated fp8 cache, no data)")
    prefill_with_quant: bool = option(False, "a prefill attends to its own keys / values as quantized (True) or "
                                             "exact (False); later tokens see the fp8 store either way")
    k_scales: list | None = option(None, "calibrated: key scales [layer][KV head] (written by calibration)")
    v_scales: list | None = option(None, "calibrated: value scales [layer][KV head] (written by calibration)")

    def __post_init__(self):
        if self.scale not in SCALES:
            raise ValueError(f"fp8_kv: scale={self.scale!r} is not supported; choose one of {SCALES}")
        if not isinstance(self.prefill_with_quant, bool):
            raise ValueError(f"fp8_kv: prefill_with_quant must be True or False; got {self.prefill_with_quant!r}")
        if (self.k_scales is None) != (self.v_scales is None):
            raise ValueError("fp8_kv: the calibrated k_scales and v_scales come together; got only one of them")
        if self.scale == "none" and self.k_scales is not None:
            raise ValueError("fp8_kv: scale='none' uses 1.0 for every head and takes no k_scales / v_scales; pass "
                             "scale='calibrated' to keep them")

    @property
    def needs_calibration(self) -> bool:
        return self.scale == "calibrated"

    def check_model(self, config) -> None:
        if not all(getattr(config, a, None) for a in ("num_hidden_layers", "num_attention_heads")):
            raise ValueError(f"fp8_kv: {type(config).__name__} has no KV cache shape (num_hidden_layers, "
                             "num_attention_heads)")

    def validate(self, config) -> None:
        """Calibrated scales: [layers][KV heads] of numbers finite and positive in fp32 (the dtype they divide in)."""
        if self.k_scales is None:
            return
        shape = (config.num_hidden_layers, kv_heads(config))
        for field in ("k_scales", "v_scales"):
            try:
                t = torch.tensor(getattr(self, field), dtype=torch.float32)
            except (TypeError, ValueError) as e:
                raise ValueError(f"fp8_kv: {field} is not a table of numbers ({e})") from None
            if tuple(t.shape) != shape:
                raise ValueError(f"fp8_kv: {field} has shape {tuple(t.shape)}, the model needs {shape} (layers, KV "
                                 "heads)")
            if not (torch.isfinite(t).all() and (t > 0).all()):
                raise ValueError(f"fp8_kv: {field} holds values that are not finite and positive (scales divide)")

    @torch.no_grad()
    def calibrate(self, model, ids, batch_size: int = 8) -> None:
        """k_scales, v_scales = absmax_scale(max |K|, max |V|) per layer and KV head over ids [n, t] (one prefill a
        batch through a cache of KVAbsmax probes, on the model's device)."""
        layers = [KVAbsmax() for _ in range(model.config.num_hidden_layers)]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            for batch in ids.split(batch_size):
                model.base_model(input_ids=batch.to(device), use_cache=True,
                                 **{cache_kwarg(model.base_model): Cache(layers=layers)})
        finally:
            model.train(was_training)
        for i, layer in enumerate(layers):
            if layer.k_absmax is None:
                raise ValueError(f"fp8_kv: decoder layer {i} never updated the KV cache during calibration")
            if not (torch.isfinite(layer.k_absmax).all() and torch.isfinite(layer.v_absmax).all()):
                raise ValueError(f"fp8_kv: decoder layer {i} cached keys or values that are not finite on the "
                                 "calibration set")
        self.k_scales, self.v_scales = ([absmax_scale(getattr(layer, f)).tolist() for layer in layers]
                                        for f in ("k_absmax", "v_absmax"))

    def make_layer(self, layer_idx: int, kernel: bool | None):
        from ..kv.fp8_cache import FP8Layer

        k, v = self.layer_scales(layer_idx)
        return FP8Layer(k, v, self.prefill_with_quant, kernel)

    def layer_scales(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(key, value) scales fp32 [Hkv] of decoder layer layer_idx; None (1.0 on every head) for scale='none'."""
        if self.scale == "none":
            return None, None
        if self.k_scales is None:
            raise ValueError("fp8_kv is not calibrated: run tquant.quantize(model, 'fp8_kv', calib=...) first, or "
                             "pass scale='none'")
        return tuple(torch.tensor(s[layer_idx], dtype=torch.float32) for s in (self.k_scales, self.v_scales))

"""The quantized KV cache of a model: its spec in quantization_config["kv_cache"], the cache built from it,
and generate() using it.

    tquant.quantize(model, "kivi", kv_bits=2)       # writes the spec, hooks generate
    model.generate(ids, ...)                         # a fresh tquant.kv_cache(model) per call
    model(ids, past_key_values=tquant.kv_cache(model), use_cache=True)   # the same cache, by hand
The hook is an attribute of the model object (not of its class): it passes past_key_values=kv_cache(model)
unless the call gives its own; tquant.load hooks a reloaded model the same way. The model's attention
implementation becomes "tquant_kv" (tquant.kv.cache): on CUDA a decode step runs the decode-attention
kernel on the packed cache, everything else runs SDPA.
"""
from __future__ import annotations

import functools

from ..config import tquant_config, write_kv_config
from ..methods import get_method
from ..methods.kv_base import KVCacheMethod
from .cache import ATTENTION, QuantizedKVCache


def attach(model, method: KVCacheMethod):
    """Record method's spec in the model's quantization_config (keeping a weight method's entries) and hook
    generate; returns the model."""
    method.check_model(model.config)
    write_kv_config(model, method.spec())
    hook_generate(model)
    return model


def kv_cache(model) -> QuantizedKVCache:
    """A new, empty quantized cache for one generate / forward sequence of `model`."""
    spec = (tquant_config(model.config) or {}).get("kv_cache")
    if spec is None:
        raise ValueError("this model has no quantized KV cache: run tquant.quantize(model, 'kivi', kv_bits=...)")
    kernel = None if model.config._attn_implementation == ATTENTION else False
    method = get_method(spec["method"]).from_spec(spec)
    return QuantizedKVCache(layers=[method.make_layer(i, kernel) for i in range(model.config.num_hidden_layers)])


def hook_generate(model) -> None:
    """generate() gets a fresh quantized cache per call, and attention the "tquant_kv" function (the decode
    kernel on CUDA, SDPA elsewhere)."""
    model.set_attn_implementation(ATTENTION)
    if getattr(model.generate, "_tquant_kv", False):
        return
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        given = kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None  # newer name
        if not given and kwargs.get("use_cache", True):
            kwargs["past_key_values"] = kv_cache(model)
        return original(*args, **kwargs)

    generate._tquant_kv = True
    model.generate = generate

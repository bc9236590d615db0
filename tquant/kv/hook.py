"""The quantized KV cache of a model: its spec in quantization_config["kv_cache"], the cache built from it,
and generate() using it.

    tquant.quantize(model, "kivi", kv_bits=2)       # writes the spec, hooks generate
    model.generate(ids, ...)                         # a fresh tquant.kv_cache(model) per call
    model(ids, cache=tquant.kv_cache(model), use_cache=True)   # the same cache, by hand (past_key_values= before
                                                               # transformers renamed it)
The hook is an attribute of the model object (not of its class): it passes cache=kv_cache(model) (past_key_values= on older transformers)
unless the call gives its own; tquant.load hooks a reloaded model the same way. The model's attention
implementation becomes "tquant_kv" (tquant.kv.cache): on CUDA a decode step runs the decode-attention
kernel on the packed cache, everything else runs SDPA.
"""
from __future__ import annotations

import copy
import dataclasses
import functools

from ..config import tquant_config, write_kv_config
from ..models import cache_kwarg
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


def check_kv_spec(config, spec) -> None:
    """A saved quantization_config["kv_cache"] (tquant.load): a registered KV-cache method, no unknown keys, options
    its constructor takes, fitting the model (check_model) and calibrated tables of the right shapes with finite
    values (validate); else ValueError naming quantization_config.kv_cache and the problem."""
    def fail(problem):
        raise ValueError(f"quantization_config.kv_cache: {problem}: the checkpoint was edited or damaged; quantize "
                         "and save it again")
    if not isinstance(spec, dict) or not isinstance(spec.get("method"), str):
        fail("expected an object with a method name")
    try:
        cls = get_method(spec["method"])
    except ValueError as e:
        fail(str(e))
    if not (isinstance(cls, type) and issubclass(cls, KVCacheMethod)):
        fail(f"{spec['method']!r} is not a KV-cache method")
    unknown = sorted(set(spec) - {"method"} - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        fail(f"unknown keys {unknown} for {spec['method']}")
    bare = copy.copy(config)  # check_model on the model as before the spec was recorded (qoq_kv4 refuses twice)
    bare.quantization_config = None
    try:
        method = cls.from_spec(spec)
        method.check_model(bare)
        method.validate(bare)
    except (ValueError, TypeError) as e:
        fail(str(e))


def kv_cache(model) -> QuantizedKVCache:
    """A new, empty quantized cache for one generate / forward sequence of `model`."""
    spec = (tquant_config(model.config) or {}).get("kv_cache")
    if spec is None:
        raise ValueError("this model has no quantized KV cache: run tquant.quantize(model, 'kivi', kv_bits=...)")
    # the decode kernels have no attention-logit soft-capping (Gemma-2): such models attend in torch
    softcap = getattr(model.config, "attn_logit_softcapping", None)
    kernel = None if model.config._attn_implementation == ATTENTION and not softcap else False
    method = get_method(spec["method"]).from_spec(spec)
    return QuantizedKVCache(layers=[method.make_layer(i, kernel) for i in range(model.config.num_hidden_layers)])


def _hand_positions(module, args, kwargs) -> None:
    cache = kwargs.get("past_key_values")
    if isinstance(cache, QuantizedKVCache):
        cache.layers[module.layer_idx].attention_positions = kwargs.get("position_ids")


def hook_positions(model) -> None:
    """Each module with a layer_idx (the attention modules) hands the position_ids it is called with to the cache
    layer it updates: transformers 5.17 calls cache.update without them, and KVQuant un-rotates a left-padded row's
    keys at its own positions (tquant.kv.kvquant_cache)."""
    for m in model.modules():
        if isinstance(getattr(m, "layer_idx", None), int) and not getattr(m, "_tquant_positions", False):
            m.register_forward_pre_hook(_hand_positions, with_kwargs=True)
            m._tquant_positions = True


def hook_generate(model) -> None:
    """generate() gets a fresh quantized cache per call, attention the "tquant_kv" function (the decode kernel on
    CUDA, SDPA elsewhere) and the cache layers the attention calls' positions (hook_positions)."""
    model.set_attn_implementation(ATTENTION)
    hook_positions(model)
    if getattr(model.generate, "_tquant_kv", False):
        return
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        given = kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None
        if not given and kwargs.get("use_cache", True):
            kwargs[cache_kwarg(model)] = kv_cache(model)
        return original(*args, **kwargs)

    generate._tquant_kv = True
    model.generate = generate

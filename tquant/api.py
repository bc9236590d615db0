"""tquant.quantize: one call from a Hugging Face model to a quantized one."""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Iterable

from torch import nn

from .calib.data import calibration_data, check_calibration_size
from .config import tquant_config, write_weight_config
from .driver import BlockStore, quantize_blocks
from .kv.hook import attach
from .methods import KVCacheMethod, Method, get_method
from .modules import QuantizedLinear


def quantize(
    model: nn.Module,
    method: str,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    sym: bool | None = None,
    calib=None,
    tokenizer=None,
    n_samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    device=None,
    true_sequential: bool = True,
    batch_size: int = 8,
    skip: Iterable[str] = (),
    lm_head: bool = False,
    embeddings: bool = False,
    progress: bool = True,
    moe_calibration: str = "routed",
    moe_min_tokens: int | None = None,
    store: BlockStore | None = None,
    **method_options,
) -> nn.Module:
    """Quantize every nn.Linear in the decoder blocks of `model` in place and return it.

    method: a registered name (tquant.methods()); bits: 2, 3, 4 or 8; group_size: input channels per
    scale (-1 = per output channel); bits and group_size default to the method's own (tquant.methods():
    4 and 128 for rtn / gptq / qqq, 8 and per-channel for smoothquant / zeroquant; a default group of 128 left
    unset becomes the largest of 128 / 64 / 32 dividing every quantized layer's in_features, said on the "tquant"
    logger); sym: symmetric grid (default:
    the method's, True for most, False for spqr); calib: token ids [n, seqlen] or 1-D, a list of
    strings (with tokenizer=), or a named source "auto" | "pydoc" | "wikitext2" | "c4" | "pile" (with
    tokenizer=; "auto" is wikitext2 when the hub is reachable, else the offline pydoc corpus);
    skip: fnmatch patterns of layer names to leave in full precision. The lm_head and the input
    embedding stay in full precision unless lm_head=True (quantized by the method from its inputs) or
    embeddings=True (round-to-nearest per row group); untying a tied pair keeps the other one float.
    Extra keyword arguments are method options. A KV-cache method ("kivi", "kvquant", "qoq_kv4", "fp8_kv") quantizes no
    weights: it sets up the model's quantized KV cache (tquant.kv.hook), which generate() then uses (calibrated on
    calib= where the method needs data); apply it before or after a weight method to combine the two.
    Mixture-of-experts models (Mixtral, Qwen3-MoE: experts as fused 3-D weights): rtn and gptq quantize every expert
    (tquant.modules.PackedExperts), each from the calibration tokens its router sends it (moe_calibration="routed")
    or from all tokens ("all", as llm-compressor's calibrate_all_experts); under "routed" an expert with fewer than
    moe_min_tokens routed tokens (None: 2 x its widest input width) is calibrated on all tokens, logged per layer.
    Routers stay in float; skip=["*.experts"] leaves the experts in float.
    store: where the blocks' weights come from and go (tquant.driver.BlockStore; None: the model in memory);
    tquant.quantize_to_disk passes one that streams them from and to safetensors shards.
    """
    chosen = make_method(method, bits=bits, group_size=group_size, sym=sym, **method_options)
    _check_not_quantized(model, chosen)
    if isinstance(chosen, KVCacheMethod):
        chosen.check_model(model.config)
    elif not any(isinstance(x, nn.Linear) for x in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize")
    ids = None
    if chosen.needs_calibration:
        if calib is None:
            raise ValueError(f"method {method!r} needs calibration data: pass calib= (token ids, texts or 'pydoc')")
        ids = calibration_data(calib, tokenizer, n_samples=n_samples, seqlen=seqlen, seed=seed)
        check_calibration_size(ids.numel(), method, _width(model))
    if isinstance(chosen, KVCacheMethod):
        return _quantize_kv_cache(model, chosen, ids, batch_size)
    patterns = list(skip)
    fit = group_size is None and "group_size" not in method_options  # the method's default: fitted to the model
    return _quantize_weights(model, chosen, ids, device=device, true_sequential=true_sequential, batch_size=batch_size,
                             skip=lambda name: any(fnmatch.fnmatch(name, p) for p in patterns), lm_head=lm_head,
                             embeddings=embeddings, progress=progress, fit_group_size=fit,
                             moe_calibration=moe_calibration, moe_min_tokens=moe_min_tokens, store=store)


def make_method(method: str, *, bits: int | None = None, group_size: int | None = None, sym: bool | None = None,
                **method_options) -> Method | KVCacheMethod:
    """The method object tquant.quantize runs, its options checked (ValueError: an unknown method or option, bits
    or another option the method refuses) without a model: the CLI calls it before loading one."""
    cls = get_method(method)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(method_options) - known
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for method {method!r}; it takes {sorted(known)}")
    if issubclass(cls, KVCacheMethod):
        if bits is not None:
            raise ValueError(f"{method!r} quantizes the KV cache, not weights: give kv_bits= instead of bits=")
        if group_size is not None and "group_size" not in known:
            raise ValueError(f"{method!r} takes no group_size (it sets its own groups); its options: {sorted(known)}")
        if sym is not None:
            raise ValueError(f"{method!r} quantizes the KV cache and sets its own grid: it takes no sym= / --asym")
        return cls(**({} if group_size is None else {"group_size": group_size}), **method_options)
    core = {k: v for k, v in dict(bits=bits, group_size=group_size, sym=sym).items() if v is not None}
    return cls(**core, **method_options)


def _check_not_quantized(model: nn.Module, method) -> None:
    """A weight method on a model whose weights tquant already quantized is refused, naming the method that did it.
    A KV-cache method changes no weight (qoq_kv4's SmoothAttention checks itself), so applying one again replaces the
    cache spec."""
    qc = tquant_config(getattr(model, "config", None)) or {}
    if isinstance(method, KVCacheMethod):
        return
    if qc.get("layers") or any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError(f"this model is already quantized with {qc.get('method') or 'tquant'}; quantize the float "
                         "model instead")


def _width(model: nn.Module) -> int | None:
    """The model's hidden size (its input embedding's width), or None where it has none."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    return getattr(emb, "embedding_dim", None)


def _quantize_kv_cache(model: nn.Module, method: KVCacheMethod, ids, batch_size: int) -> nn.Module:
    """The KV-cache flow: calibrate where the method needs data, record the spec, hook generate()."""
    if method.needs_calibration:
        method.calibrate(model, ids, batch_size=batch_size)
    return attach(model, method)


def _quantize_weights(model: nn.Module, method: Method, ids, *, batch_size: int, **driver_options) -> nn.Module:
    """The weight flow: the method's whole-model transform (qoq's rotation), its own KV cache where it has one
    (qoq), then the driver block by block inside the method's around_blocks, and the quantization_config that
    tquant.load reads."""
    method.prepare_model(model)
    kv_method = method.kv_cache_method()
    if kv_method is not None:
        _quantize_kv_cache(model, kv_method, ids, batch_size)
    with method.around_blocks(model, ids):  # QuIP#'s end-to-end fine-tuning: float targets before, tuning after
        layers = quantize_blocks(model, method, ids, batch_size=batch_size, **driver_options)
    write_weight_config(model, method, layers)
    return model

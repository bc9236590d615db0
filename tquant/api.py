"""tquant.quantize: one call from a Hugging Face model to a quantized one."""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Iterable

from torch import nn

from .calib.data import calibration_data
from .config import make_quantization_config
from .driver import quantize_blocks
from .kv.hook import attach, tquant_config
from .methods import KVCacheMethod, get_method


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
    **method_options,
) -> nn.Module:
    """Quantize every nn.Linear in the decoder blocks of `model` in place and return it.

    method: a registered name (tquant.methods()); bits: 2, 3, 4 or 8; group_size: input channels per
    scale (-1 = per output channel); bits and group_size default to the method's own (tquant.methods():
    4 and 128 for rtn / gptq / qqq, 8 and per-channel for smoothquant / zeroquant); sym: symmetric grid (default:
    the method's, True for most, False for spqr); calib: token ids [n, seqlen] or 1-D, a list of
    strings (with tokenizer=), or a named source "auto" | "pydoc" | "wikitext2" | "c4" | "pile" (with
    tokenizer=; "auto" is wikitext2 when the hub is reachable, else the offline pydoc corpus);
    skip: fnmatch patterns of layer names to leave in full precision. The lm_head and the input
    embedding stay in full precision unless lm_head=True (quantized by the method from its inputs) or
    embeddings=True (round-to-nearest per row group); untying a tied pair keeps the other one float.
    Extra keyword arguments are method options. A KV-cache method ("kivi", "kvquant", "qoq_kv4") quantizes no
    weights: it sets up the model's quantized KV cache (tquant.kv.hook), which generate() then uses (calibrated on
    calib= where the method needs data); apply it before or after a weight method to combine the two.
    """
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
        kv_method = cls(**({} if group_size is None else {"group_size": group_size}), **method_options)
        kv_method.check_model(model.config)
        if kv_method.needs_calibration:
            if calib is None:
                raise ValueError(f"method {method!r} needs calibration data: pass calib= (token ids, texts or 'pydoc')")
            ids = calibration_data(calib, tokenizer, n_samples=n_samples, seqlen=seqlen, seed=seed)
            kv_method.calibrate(model, ids, batch_size=batch_size)
        return attach(model, kv_method)
    core = {k: v for k, v in dict(bits=bits, group_size=group_size, sym=sym).items() if v is not None}
    m = cls(**core, **method_options)
    if not any(isinstance(x, nn.Linear) for x in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize")
    ids = None
    if m.needs_calibration:
        if calib is None:
            raise ValueError(f"method {method!r} needs calibration data: pass calib= (token ids, texts or 'pydoc')")
        ids = calibration_data(calib, tokenizer, n_samples=n_samples, seqlen=seqlen, seed=seed)
    m.prepare_model(model)  # a whole-model transform folded into the weights first (qoq's rotation)
    kv_method = m.kv_cache_method()  # a weight method's own KV cache (qoq): calibrated and folded in next
    if kv_method is not None:
        kv_method.check_model(model.config)
        if kv_method.needs_calibration:
            kv_method.calibrate(model, ids, batch_size=batch_size)
        attach(model, kv_method)
    patterns = list(skip)
    layers = quantize_blocks(
        model, m, ids, device=device, true_sequential=true_sequential, batch_size=batch_size,
        skip=lambda name: any(fnmatch.fnmatch(name, p) for p in patterns), lm_head=lm_head,
        embeddings=embeddings, progress=progress,
    )
    kv = (tquant_config(model) or {}).get("kv_cache")  # a KV-cache method applied before stays
    model.config.quantization_config = make_quantization_config(m, layers) | ({"kv_cache": kv} if kv else {})
    return model

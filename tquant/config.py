"""The HF-style `quantization_config` tquant writes into model.config and config.json.

    {"quant_method": "tquant", "format": "tquant-packed-v1", "method": "gptq",
     "bits": 4, "group_size": 64, "sym": true, "options": {...method options...},
     "layers": {"model.layers.0.self_attn.q_proj": {module spec from PackedLinear.layer_spec()}, ...},
     "report": {...what the method measured, e.g. LKD errors or QQQ's alphas; only when there is any...}}
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .methods.base import Method

QUANT_METHOD = "tquant"
FORMAT = "tquant-packed-v1"


def write_weight_config(model, method: "Method", layers: dict[str, dict]) -> dict:
    """Record a weight method's run in model.config.quantization_config (a KV-cache spec recorded before stays);
    returns it."""
    fields = dataclasses.asdict(method)
    core = {k: fields.pop(k) for k in ("bits", "group_size", "sym")}
    qc = {"quant_method": QUANT_METHOD, "format": FORMAT, "method": method.name, **core, "options": fields,
          "layers": layers}
    report = method.report()
    kv = (tquant_config(model.config) or {}).get("kv_cache")
    model.config.quantization_config = qc | ({"report": report} if report else {}) | ({"kv_cache": kv} if kv else {})
    return model.config.quantization_config


def write_imported_config(model, layers: dict[str, dict], bits: int | None, source: str) -> dict:
    """Record a checkpoint imported from another library's format (tquant.interop): no tquant method made it."""
    model.config.quantization_config = {"quant_method": QUANT_METHOD, "format": FORMAT, "method": None, "bits": bits,
                                        "group_size": None, "sym": None, "options": {"imported_from": source},
                                        "layers": layers}
    return model.config.quantization_config


def write_kv_config(model, spec: dict) -> dict:
    """Record a KV-cache method's spec in model.config.quantization_config (a weight method's entries stay)."""
    qc = tquant_config(model.config) or {"quant_method": QUANT_METHOD, "format": FORMAT, "method": None, "layers": {}}
    model.config.quantization_config = {**qc, "kv_cache": spec}
    return model.config.quantization_config


def tquant_config(config) -> dict | None:
    """config.quantization_config as a dict when tquant wrote it, else None (no config, or another library's)."""
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    return qc if qc and qc.get("quant_method") == QUANT_METHOD else None


def read_quantization_config(config) -> dict:
    """tquant's quantization_config of a config, checked: raises when there is none or its format is not this
    version's."""
    qc = tquant_config(config)
    if qc is None:
        raise ValueError("this model has no tquant quantization_config (was it saved with tquant.save?)")
    if qc.get("format") != FORMAT:
        raise ValueError(f"unsupported tquant format {qc.get('format')!r}; this version reads {FORMAT!r} (quantize and "
                         "save the model again with this version, or install the tquant that wrote it)")
    return qc

"""The HF-style `quantization_config` tquant writes into model.config and config.json.

    {"quant_method": "tquant", "format": "tquant-packed-v1", "method": "gptq",
     "bits": 4, "group_size": 64, "sym": true, "options": {...method options...},
     "layers": {"model.layers.0.self_attn.q_proj": {module spec from PackedLinear.layer_spec()}, ...},
     "report": {...what the method measured, e.g. LKD errors or QQQ's alphas; only when there is any...}}
"""
from __future__ import annotations

import dataclasses

from .methods.base import Method

QUANT_METHOD = "tquant"
FORMAT = "tquant-packed-v1"


def make_quantization_config(method: Method, layers: dict[str, dict]) -> dict:
    fields = dataclasses.asdict(method)
    core = {k: fields.pop(k) for k in ("bits", "group_size", "sym")}
    qc = {"quant_method": QUANT_METHOD, "format": FORMAT, "method": method.name, **core, "options": fields,
          "layers": layers}
    report = method.report()
    return qc | ({"report": report} if report else {})


def read_quantization_config(config) -> dict:
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    if not qc or qc.get("quant_method") != QUANT_METHOD:
        raise ValueError("this model has no tquant quantization_config (was it saved with tquant.save?)")
    if qc.get("format") != FORMAT:
        raise ValueError(f"unsupported tquant format {qc.get('format')!r}; this version reads {FORMAT!r} (quantize and "
                         "save the model again with this version, or install the tquant that wrote it)")
    return qc

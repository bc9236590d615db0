"""tquant.load's dispatch for checkpoints other libraries wrote: config.json's quantization_config.quant_method
"compressed-tensors", "gptq" or "awq" -> that format's importer (tquant.interop.compressed_tensors / gptq / awq),
which builds tquant's modules from the packed tensors without dequantizing them.

Older checkpoints keep their quantization config beside config.json instead of in it (config.json has no
quantization_config): AutoGPTQ's quantize_config.json ({"bits", "group_size", "desc_act", "sym", ...}; GPTQModel's
also names "quant_method" and "checkpoint_format") and AutoAWQ's quant_config.json ({"zero_point", "q_group_size",
"w_bit", "version"}); vLLM reads the same files (GPTQConfig / AWQConfig.get_config_filenames). legacy_config makes
the quantization_config from them.
"""
from __future__ import annotations

import importlib
import json
import os

IMPORTERS = {"compressed-tensors": "compressed_tensors", "gptq": "gptq", "awq": "awq"}
LEGACY_FILES = {"quantize_config.json": "gptq", "quant_config.json": "awq"}  # file -> its quant_method by default


def legacy_config(path: str) -> dict | None:
    """The quantization_config of checkpoint folder `path` from AutoGPTQ's quantize_config.json or AutoAWQ's
    quant_config.json (the first found, in that order): the file's keys, with quant_method "gptq" / "awq" unless it
    names its own; None when the folder holds neither. ValueError naming the file when it is not a JSON object."""
    for name, method in LEGACY_FILES.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        try:
            with open(full) as f:
                data = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{full} is not valid JSON ({e}): is the checkpoint damaged?") from None
        if not isinstance(data, dict):
            raise ValueError(f"{full}: expected a JSON object of quantization settings, got {type(data).__name__}")
        return {"quant_method": method, **data}
    return None


def load_foreign(path: str, config: dict, device=None):
    """The model of checkpoint folder `path` whose config.json (`config`) names another library's quant_method."""
    from .common import read_tensors

    method = config["quantization_config"].get("quant_method")
    if method not in IMPORTERS:
        raise ValueError(f"config.json quantization_config.quant_method={method!r}: tquant loads 'tquant' "
                         f"checkpoints and imports {', '.join(repr(m) for m in IMPORTERS)}")
    module = importlib.import_module(f".{IMPORTERS[method]}", __package__)
    return module.load(path, config, read_tensors(path), device)

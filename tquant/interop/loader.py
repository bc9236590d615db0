"""tquant.load's dispatch for checkpoints other libraries wrote: config.json's quantization_config.quant_method
"compressed-tensors", "gptq" or "awq" -> that format's importer (tquant.interop.compressed_tensors / gptq / awq),
which builds tquant's modules from the packed tensors without dequantizing them."""
from __future__ import annotations

import importlib

IMPORTERS = {"compressed-tensors": "compressed_tensors", "gptq": "gptq", "awq": "awq"}


def load_foreign(path: str, config: dict, device=None):
    """The model of checkpoint folder `path` whose config.json (`config`) names another library's quant_method."""
    from .common import read_tensors

    method = config["quantization_config"].get("quant_method")
    if method not in IMPORTERS:
        raise ValueError(f"config.json quantization_config.quant_method={method!r}: tquant loads 'tquant' "
                         f"checkpoints and imports {', '.join(repr(m) for m in IMPORTERS)}")
    module = importlib.import_module(f".{IMPORTERS[method]}", __package__)
    return module.load(path, config, read_tensors(path), device)

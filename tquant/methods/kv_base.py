"""What every KV-cache quantization method implements (KIVI; KVQuant and QoQ's KV4 to come).

A KV-cache method quantizes no weights: it checks that the model fits it and returns the spec the cache is
built from (tquant.kv: quantization_config["kv_cache"] -> tquant.modules.QuantizedKVCache). It is registered
by name beside the weight methods, so tquant.quantize(model, "kivi", kv_bits=2) and tquant.methods() work the
same way; it combines with a weight method by calling quantize twice.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from .base import Method


@dataclasses.dataclass
class KVCacheMethod:
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    needs_calibration: ClassVar[bool] = False

    describe_options = classmethod(Method.describe_options.__func__)

    def check_model(self, config) -> None:
        """Raise ValueError naming what in the model's config the method cannot handle."""

    def spec(self) -> dict:
        """JSON-able: the method's name and options (what the cache is built from)."""
        return {"method": self.name, **dataclasses.asdict(self)}


def head_dim(config) -> int:
    """The attention head size of an HF config."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

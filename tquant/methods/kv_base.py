"""What every KV-cache quantization method implements (KIVI, KVQuant, QoQ's KV4).

A KV-cache method quantizes no weights. It is registered by name beside the weight methods, so
tquant.quantize(model, "kivi", kv_bits=2) and tquant.methods() work the same way; it combines with a weight
method by calling quantize twice. Its life:
    method.check_model(model.config)           # ValueError naming what the model lacks
    method.calibrate(model, ids, batch_size)   # methods with needs_calibration: fit per-layer data (JSON-able
                                               # dataclass fields) from calibration token ids [n, seqlen]
    spec = method.spec()                       # -> quantization_config["kv_cache"] (saved with the model)
    method = cls.from_spec(spec)               # tquant.kv.hook rebuilds it for every new cache
    method.make_layer(layer_idx, kernel)       # one transformers CacheLayerMixin per decoder layer
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

    def calibrate(self, model, ids, batch_size: int = 8) -> None:
        """Fit what the method learns from data (methods with needs_calibration; ids [n, seqlen])."""

    def spec(self) -> dict:
        """JSON-able: the method's name and options (what the cache is built from)."""
        return {"method": self.name, **dataclasses.asdict(self)}

    def validate(self, config) -> None:
        """Check what a saved spec carries beyond its options (tquant.load; calibrated tables: shapes, finite
        values) against the model's config; ValueError naming the field."""

    @classmethod
    def from_spec(cls, spec: dict) -> "KVCacheMethod":
        return cls(**{k: v for k, v in spec.items() if k != "method"})

    def make_layer(self, layer_idx: int, kernel: bool | None):
        """The cache layer of decoder layer layer_idx. kernel: decode steps through the Triton kernel (True),
        the torch path (False), or on CUDA tensors (None)."""
        raise NotImplementedError

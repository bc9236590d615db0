"""KIVI (Liu et al., 2024): tuning-free asymmetric 2/4-bit KV cache. Keys per channel (over groups of
`group_size` tokens), values per token (over groups of `group_size` channels), the newest `residual` tokens
in full precision and flushed into the quantized store group by group (formats: tquant.kv.uniform_format; cache:
tquant.kv.cache). Data-free: nothing is calibrated.
"""
from __future__ import annotations

import dataclasses

from ..kv.uniform_format import check_kv_bits
from .base import option, register
from ..models import head_dim
from .kv_base import KVCacheMethod


@register
@dataclasses.dataclass
class Kivi(KVCacheMethod):
    name = "kivi"

    kv_bits: int = option(2, "bits per cached key / value element: 2, 3, 4 or 8")
    group_size: int = option(32, "tokens per key group (per channel) and channels per value group (per token)")
    residual: int = option(128, "newest tokens kept in full precision (flushed in whole groups)")
    prefill_with_quant: bool = option(False, "a prefill attends to its own keys / values as quantized (True) or "
                                             "exact (False); later tokens see the quantized store either way")

    def __post_init__(self):
        check_kv_bits(self.kv_bits)
        if self.group_size < 1 or self.residual < 0:
            raise ValueError(f"kivi needs group_size >= 1 and residual >= 0; got {self.group_size}, {self.residual}")

    def make_layer(self, layer_idx: int, kernel: bool | None):
        from ..kv.cache import KiviLayer

        return KiviLayer(self.kv_bits, self.group_size, self.residual, self.prefill_with_quant, kernel)

    def check_model(self, config) -> None:
        d = head_dim(config)
        if d % self.group_size:
            raise ValueError(f"kivi: group_size={self.group_size} must divide the head size {d} (values are "
                             f"quantized per token in groups of channels)")

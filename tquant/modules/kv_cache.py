"""QuantizedKVCache: a transformers Cache whose layers keep keys and values in KIVI's packed formats
(tquant.kv_quant), with the most recent tokens in full precision.

Per layer (KiviLayer), for K, V [B, H_kv, t, D] handed to update() (keys after RoPE, as the model caches them):
    residual  the newest tokens in the model's dtype, kept between `residual` and residual + group - 1 long:
              once it holds residual + group tokens or more, its oldest whole groups of `group` tokens are
              quantized and appended to the packed store (K per channel over each group's tokens, V per
              token over groups of `group` channels), oldest first
    returns   [dequantized store ; residual] in the model's dtype, the K / V attention reads. With
              prefill_with_quant=False the t tokens of this call come back exactly as given (a prefill
              attends to itself in full precision and later tokens see it quantized); True returns every
              token as stored (quantized where it was flushed).
Memory: nbytes() counts the packed codes, the fp16 scales and minima and the residual window (the cache's
format). The torch path also keeps each flushed group decoded once (the packed codes never change), so a decode
step does not decode the whole store again; a decode-attention kernel reads the packed store instead.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..kv_quant import PackedKV, concat, dequantize_keys, dequantize_values, quantize_keys, quantize_values


class KiviLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, bits: int, group: int, residual: int, prefill_with_quant: bool):
        super().__init__()
        self.bits, self.group, self.residual, self.prefill_with_quant = bits, group, residual, prefill_with_quant
        self.packed_keys: PackedKV | None = None
        self.packed_values: PackedKV | None = None
        self._dequantized: tuple[torch.Tensor, torch.Tensor] | None = None  # the torch path's decoded store

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        flush = max(0, self.keys.shape[-2] - self.residual) // self.group * self.group
        if flush:
            k, v = quantize_keys(self.keys[..., :flush, :], self.bits, self.group), \
                quantize_values(self.values[..., :flush, :], self.bits, self.group)
            self.packed_keys = k if self.packed_keys is None else concat([self.packed_keys, k], dim=-2)
            self.packed_values = v if self.packed_values is None else concat([self.packed_values, v], dim=-2)
            self.keys, self.values = self.keys[..., flush:, :], self.values[..., flush:, :]
            k = dequantize_keys(k, self.bits, self.group).to(self.dtype)
            v = dequantize_values(v, self.bits, self.group).to(self.dtype)
            self._dequantized = (k, v) if self._dequantized is None else \
                tuple(torch.cat([old, new], dim=-2) for old, new in zip(self._dequantized, (k, v)))
        keys, values = self.stored()
        if not self.prefill_with_quant:
            t = key_states.shape[-2]
            keys = torch.cat([keys[..., :-t, :], key_states], dim=-2)
            values = torch.cat([values[..., :-t, :], value_states], dim=-2)
        return keys, values

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached token as the cache holds it: [dequantized packed store ; residual], model dtype."""
        if self._dequantized is None:
            return self.keys, self.values
        k, v = self._dequantized
        return torch.cat([k, self.keys], dim=-2), torch.cat([v, self.values], dim=-2)

    def quantized_length(self) -> int:
        return 0 if self.packed_values is None else self.packed_values.codes.shape[-2]

    def get_seq_length(self) -> int:
        return self.quantized_length() + (self.keys.shape[-2] if self.is_initialized else 0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes held: packed codes, fp16 scales and minima, and the full-precision residual window."""
        if not self.is_initialized:
            return 0
        packed = sum(p.nbytes() for p in (self.packed_keys, self.packed_values) if p is not None)
        return packed + sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def reset(self) -> None:
        self.packed_keys = self.packed_values = self._dequantized = None
        self.keys = self.values = None
        self.is_initialized = False


class QuantizedKVCache(Cache):
    """One KiviLayer per decoder layer; pass it to model(..., past_key_values=) or model.generate(...)."""

    def __init__(self, num_layers: int, *, bits: int, group: int, residual: int, prefill_with_quant: bool):
        super().__init__(layers=[KiviLayer(bits, group, residual, prefill_with_quant) for _ in range(num_layers)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

"""KVQuantLayer: a transformers cache layer holding keys and values in KVQuant's format (tquant.kvquant_format);
the torch path (decode steps attend through SDPA on what update() returns).

Per layer, for K, V [B, H_kv, t, D] handed to update() (keys after RoPE, as the model caches them):
    sink     the first `sink` tokens the cache receives (slots 0 .. sink - 1 of every row), kept exactly, in the
             model's dtype (a left-padded row's sink holds its first slots, padding included)
    store    every later token, quantized as it arrives (no residual window, no token groups): keys un-rotated to
             pre-RoPE with the call's cos / sin (unless rope is None: post-RoPE keys) and quantized per channel
             with the calibrated ranges, values per token; outliers in the fp16 CSR part
    returns  [sink ; dequantized store] in the model's dtype, keys re-rotated with each token's own cos / sin. With
             prefill_with_quant=False the t tokens of this call come back exactly as given (a prefill attends to
             itself in full precision, later tokens see it quantized); True returns every token as stored.
RoPE of a call (call_cos_sin): cos / sin of a cache_kwargs dict when the caller gives them (transformers 4.x),
else computed from the call's position_ids [B or 1, t] with the calibrated inv_freq and attention scaling, as the
model's rotary embedding does: transformers 5.x Llama-style attention calls cache.update(k, v, layer_idx,
kwargs={"position_ids": ..., "use_cache": ...}) and passes no cos / sin; others (transformers 5.17) pass nothing:
then the tokens are taken to follow the cached ones (positions start ... start + t - 1 for every row). A left-padded
batch has per-row positions, so per-row cos / sin; without them, a padded row is quantized in a frame rotated by
its padding (un-rotation and re-rotation use the same positions, so what attention reads stays consistent).
Memory: nbytes() counts the codes, the values' fp16 scales / offsets, the sparse part, the sink and the layer's
calibrated constants. The torch path also keeps the store decoded (model dtype; its codes never change), so a
decode step decodes only its own token.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from .. import kvquant_format as fmt


def call_cos_sin(args, kwargs, rope: tuple[torch.Tensor, float], dtype: torch.dtype, start: int, t: int,
                 device: torch.device):
    """cos, sin [B or 1, t, D] of the t tokens of one cache update that follow `start` cached ones (see the module
    docstring)."""
    given = [d for d in (*args, *kwargs.values(), kwargs) if isinstance(d, dict)]
    for d in given:
        if d.get("cos") is not None and d.get("sin") is not None:
            return d["cos"], d["sin"]
    for d in given:
        if d.get("position_ids") is not None:
            return fmt.rope_cos_sin(d["position_ids"], *rope, dtype)
    return fmt.rope_cos_sin(torch.arange(start, start + t, device=device)[None], *rope, dtype)


class KVQuantLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, params: fmt.LayerParams, bits: int, sink: int, outliers: float, prefill_with_quant: bool,
                 rope: tuple[torch.Tensor, float] | None):
        super().__init__()
        fmt.check_bits(bits)
        self.params, self.bits, self.sink, self.outliers = params, bits, sink, outliers
        self.prefill_with_quant, self.rope = prefill_with_quant, rope
        self.packed_keys: fmt.PackedKeys | None = None
        self.packed_values: fmt.PackedValues | None = None
        self._decoded: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        if tuple(self.params.key_offset.shape) != tuple(key_states.shape[1:2]) + (self.head_dim,):
            raise ValueError(f"kvquant was calibrated for keys of {tuple(self.params.key_offset.shape)} heads x "
                             f"channels; this cache gets {tuple(key_states.shape[1:2]) + (self.head_dim,)}")
        if key_states.shape[1] * self.head_dim > 2**15:
            raise ValueError(f"kvquant: the sparse part's int16 columns cover KV heads x head_dim <= 32768; this "
                             f"cache has {key_states.shape[1] * self.head_dim}")
        self.params = fmt.LayerParams(*(t.to(self.device, torch.float32) for t in self.params))
        self.n_value_outliers = fmt.value_outliers(self.outliers, self.head_dim)
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]  # the sink
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        s = min(t, self.sink - self.keys.shape[-2])  # tokens of this call that join the sink
        if self.rope is not None and s < t:
            cos, sin = call_cos_sin(args, kwargs, self.rope, key_states.dtype, self.get_seq_length(), t,
                                    key_states.device)
            if cos.shape[-1] != self.head_dim:
                raise ValueError(f"kvquant: RoPE covers {cos.shape[-1]} of the {self.head_dim} key channels (partial "
                                 f"rotary is not supported); pass pre_rope=False")
            cos, sin = cos[..., s:, :], sin[..., s:, :]
        self.keys = torch.cat([self.keys, key_states[..., :s, :]], dim=-2)
        self.values = torch.cat([self.values, value_states[..., :s, :]], dim=-2)
        if s < t:
            k, v = key_states[..., s:, :], value_states[..., s:, :]
            if self.rope is not None:
                k = fmt.unrotate(k, cos, sin)
            pk = fmt.quantize_keys(k, self.params, self.bits, self.outliers > 0)
            pv = fmt.quantize_values(v, self.params.value_codebook, self.bits, self.n_value_outliers)
            k = fmt.dequantize_keys(pk, self.params, self.bits)
            if self.rope is not None:
                k = fmt.apply_rope(k, cos, sin)
            decoded = (k.to(self.dtype), fmt.dequantize_values(pv, self.params.value_codebook, self.bits,
                                                               self.head_dim).to(self.dtype))
            if self.packed_keys is None:
                self.packed_keys, self.packed_values, self._decoded = pk, pv, decoded
            else:
                self.packed_keys = fmt.concat(self.packed_keys, pk)
                self.packed_values = fmt.concat(self.packed_values, pv)
                self._decoded = tuple(torch.cat([old, new], dim=-2) for old, new in zip(self._decoded, decoded))
        keys, values = self.stored()
        if not self.prefill_with_quant:
            keys = torch.cat([keys[..., : keys.shape[-2] - t, :], key_states], dim=-2)
            values = torch.cat([values[..., : values.shape[-2] - t, :], value_states], dim=-2)
        return keys, values

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached token as the cache holds it: [sink ; dequantized store], model dtype."""
        if self._decoded is None:
            return self.keys, self.values
        return tuple(torch.cat([sink, store], dim=-2) for sink, store in zip((self.keys, self.values), self._decoded))

    def quantized_length(self) -> int:
        return 0 if self.packed_values is None else self.packed_values.codes.shape[-2]

    def get_seq_length(self) -> int:
        return self.quantized_length() + (self.keys.shape[-2] if self.is_initialized else 0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes held: codes, value scales / offsets, the sparse part, the sink, the layer's calibrated constants."""
        if not self.is_initialized:
            return 0
        return sum(fmt.nbytes(p) for p in (self.packed_keys, self.packed_values, self.params, self.keys, self.values))

    def reset(self) -> None:
        self.packed_keys = self.packed_values = self._decoded = None
        self.keys = self.values = None
        self.is_initialized = False

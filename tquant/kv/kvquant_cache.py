"""KVQuantLayer: a transformers cache layer holding keys and values in KVQuant's format (tquant.kv.kvquant_format);
the torch path (decode steps attend through SDPA on what update() returns) and the kernel path.

Per layer, for K, V [B, H_kv, t, D] handed to update() (keys after RoPE, as the model caches them):
    sink     the first `sink` tokens the cache receives (slots 0 .. sink - 1 of every row), kept exactly, in the
             model's dtype (a left-padded row's sink holds its first slots, padding included: its own first
             tokens are quantized, and it decodes as alone with sink=0; 1-18 % more logit error than alone on the
             tiny Llama, tests/kv/test_kvquant_padding.py)
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
then the position_ids the attention module was called with (tquant.kv.hook.hook_positions hands them to the layer
as attention_positions), else the tokens are taken to follow the cached ones (start ... start + t - 1 for every row).
A left-padded batch has per-row positions, so per-row cos / sin; without them a padded row would be quantized in a
frame rotated by its padding (un-rotation and re-rotation use the same positions, so what attention reads stays
consistent, but the calibrated key ranges miss: 8% logit error on a tiny Llama, tests/methods/test_kvquant.py).
Memory: nbytes() counts the codes, the values' fp16 scales / offsets, the outliers, the sink, the layer's
calibrated constants and (kernel path, pre-RoPE) the positions. The torch path also keeps the store decoded (model
dtype; its codes never change), so a decode step decodes only its own token.

Kernel path (kernel=True; the default on CUDA), as KiviLayer's: a one-token update quantizes its token into the
store as always and returns only that token as given (the torch path's view: a call's own tokens exact; nothing with
prefill_with_quant), sets kernel_step to it, and the model's "tquant_kv" attention function calls decode_attention:
tquant.kv.kvquant_attention on the sink and on the store's codes, outliers and calibrated constants (its newest
token read exact from what update returned). Pre-RoPE keys are re-rotated in the kernel from each stored token's
position, kept as positions int32 [B, T] (the call's position_ids, else the positions following the cached tokens;
the keys are un-rotated with the cos / sin of those same positions, so a caller's cos / sin are not used on this
path). The store is not kept decoded; a multi-token update (a prefill) decodes it on demand.
"""
from __future__ import annotations

import torch

from . import growing
from . import kvquant_format as fmt
from .cache import QuantizedLayer, _last


def _given(args, kwargs) -> list[dict]:
    return [d for d in (*args, *kwargs.values(), kwargs) if isinstance(d, dict)]


def call_positions(args, kwargs, start: int, t: int, device: torch.device,
                   attention_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Positions [B or 1, t] of the t tokens of one cache update that follow `start` cached ones: the call's
    position_ids, else the attention call's (attention_positions, when of t tokens), else start ... start + t - 1."""
    for d in _given(args, kwargs):
        if d.get("position_ids") is not None:
            return d["position_ids"]
    if attention_positions is not None and attention_positions.shape[-1] == t:
        return attention_positions
    return torch.arange(start, start + t, device=device)[None]


def call_cos_sin(args, kwargs, rope: tuple[torch.Tensor, float], dtype: torch.dtype, start: int, t: int,
                 device: torch.device, attention_positions: torch.Tensor | None = None):
    """cos, sin [B or 1, t, D] of the t tokens of one cache update that follow `start` cached ones (see the module
    docstring)."""
    for d in _given(args, kwargs):
        if d.get("cos") is not None and d.get("sin") is not None:
            return d["cos"], d["sin"]
    return fmt.rope_cos_sin(call_positions(args, kwargs, start, t, device, attention_positions), *rope, dtype)


class KVQuantLayer(QuantizedLayer):

    def __init__(self, params: fmt.LayerParams, bits: int, sink: int, outliers: float, prefill_with_quant: bool,
                 rope: tuple[torch.Tensor, float] | None, kernel: bool | None = None):
        super().__init__()
        fmt.check_bits(bits)
        self.params, self.bits, self.sink, self.outliers = params, bits, sink, outliers
        self.prefill_with_quant, self.rope = prefill_with_quant, rope
        self.kernel = kernel  # None: on CUDA tensors
        self.kernel_step = None  # the keys the last update returned for the kernel (its exact newest token), or None
        self.packed_keys: fmt.PackedKeys | None = None  # views of the growing stores' filled parts
        self.packed_values: fmt.PackedValues | None = None
        self.positions: torch.Tensor | None = None  # kernel path, pre-RoPE: int32 [B, T] of the stored tokens
        self._stores = None  # (keys, values, positions or None): growing stores (tquant.kv.growing)
        self._full = None  # the torch path's (keys, values) Growing [B, H, T, D]: [sink ; decoded store]
        self._dirty = None  # (start, keys, values): the stored tokens the last update overwrote with its exact ones
        self.attention_positions = None  # the position_ids of the attention call about to update (hook_positions)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.kernel is None:
            self.kernel = key_states.is_cuda
        self.head_dim = key_states.shape[-1]
        if tuple(self.params.key_offset.shape) != tuple(key_states.shape[1:2]) + (self.head_dim,):
            raise ValueError(f"kvquant was calibrated for keys of {tuple(self.params.key_offset.shape)} heads x "
                             f"channels; this cache gets {tuple(key_states.shape[1:2]) + (self.head_dim,)}")
        self.params = fmt.LayerParams(*(t.to(self.device, torch.float32) for t in self.params))
        if self.rope is not None:
            self.rope = (self.rope[0].to(self.device, torch.float32), self.rope[1])
        self.n_value_outliers = fmt.value_outliers(self.outliers, self.head_dim)
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]  # the sink
        if not self.kernel:
            self._full = tuple(growing.Growing(x[..., :0, :].to(self.dtype)) for x in (key_states, value_states))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Appends the call's tokens in O(t) amortized (growing storage: only the new tokens are quantized, and on
        the torch path decoded). KVQuant's format (NUQ codes, CSR key outliers, per-vector value outliers) has no
        Triton write kernel: the new tokens are quantized in torch on every device, then appended."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._restore()
        t = key_states.shape[-2]
        s = min(t, self.sink - self.keys.shape[-2])  # tokens of this call that join the sink
        cos = sin = None
        if self.rope is not None and s < t:
            if self.kernel:  # the kernel re-rotates from positions: un-rotate with those same positions
                positions = call_positions(args, kwargs, self.get_seq_length(), t, key_states.device,
                                           self.attention_positions)
                cos, sin = fmt.rope_cos_sin(positions, *self.rope, key_states.dtype)
            else:
                cos, sin = call_cos_sin(args, kwargs, self.rope, key_states.dtype, self.get_seq_length(), t,
                                        key_states.device, self.attention_positions)
            if cos.shape[-1] != self.head_dim:
                raise ValueError(f"kvquant: RoPE covers {cos.shape[-1]} of the {self.head_dim} key channels (partial "
                                 f"rotary is not supported); pass pre_rope=False")
            cos, sin = cos[..., s:, :], sin[..., s:, :]
        if s:
            self.keys = torch.cat([self.keys, key_states[..., :s, :]], dim=-2)
            self.values = torch.cat([self.values, value_states[..., :s, :]], dim=-2)
            if self._full is not None:
                for g, x in zip(self._full, (key_states, value_states)):
                    g.append(x[..., :s, :])
        if s < t:
            k, v = key_states[..., s:, :], value_states[..., s:, :]
            if self.rope is not None:
                k = fmt.unrotate(k, cos, sin)
            pk = fmt.quantize_keys(k, self.params, self.bits, self.outliers > 0)
            pv = fmt.quantize_values(v, self.params.value_codebook, self.bits, self.n_value_outliers)
            pos = None
            if self.kernel and self.rope is not None:
                pos = positions[..., s:].expand(k.shape[0], -1).to(torch.int32)
            if self._stores is None:
                self._stores = tuple(growing.grow(x) for x in (pk, pv, pos))
            for store, new, old in zip(self._stores, (pk, pv, pos), (self.packed_keys, self.packed_values, None)):
                growing.append(store, new if old is None else fmt.appendable(new, old))
            self.packed_keys, self.packed_values, self.positions = (growing.view(x) for x in self._stores)
            if self._full is not None:
                for g, x in zip(self._full, self._decode(pk, pv, cos, sin)):
                    g.append(x)
        _last.layer = self
        self.kernel_step = None
        if self.kernel and t == 1 and self.packed_keys is not None:
            exact = 0 if self.prefill_with_quant else 1
            self.kernel_step = key_states[..., :exact, :]
            return self.kernel_step, value_states[..., :exact, :]
        if self._full is None:  # the kernel path's prefill: the store decoded on demand
            keys, values = self.stored()
            if not self.prefill_with_quant:
                keys = torch.cat([keys[..., : keys.shape[-2] - t, :], key_states], dim=-2)
                values = torch.cat([values[..., : values.shape[-2] - t, :], value_states], dim=-2)
            return keys, values
        keys, values = (g.view for g in self._full)
        end = keys.shape[-2]
        start = max(end - t, self.keys.shape[-2])  # the call's tokens in the store (the sink holds them exact)
        if not self.prefill_with_quant and start < end:
            # the call's own tokens come back exact: write them over their stored form, which the next update
            # (or stored()) puts back
            self._return_exact(keys, values, start, key_states[..., start - end:, :],
                               value_states[..., start - end:, :])
        return keys, values

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached token as the cache holds it: [sink ; dequantized store], model dtype. On the torch path
        views of its decoded copy (a fresh copy while the last update's exact tokens cover part of it)."""
        if self._full is not None:
            return self._decoded_copy()
        if self.packed_keys is None:
            return self.keys, self.values
        store = self._decode(self.packed_keys, self.packed_values, *(
            () if self.rope is None else fmt.rope_cos_sin(self.positions, *self.rope, self.dtype)))
        return tuple(torch.cat([sink, part], dim=-2) for sink, part in zip((self.keys, self.values), store))

    def _decode(self, pk: fmt.PackedKeys, pv: fmt.PackedValues, cos=None, sin=None):
        """The model-dtype keys (re-rotated by cos, sin unless post-RoPE) and values of packed tokens."""
        k = fmt.dequantize_keys(pk, self.params, self.bits)
        if self.rope is not None:
            k = fmt.apply_rope(k, cos, sin)
        return k.to(self.dtype), fmt.dequantize_values(pv, self.params.value_codebook, self.bits,
                                                       self.head_dim).to(self.dtype)

    def decode_attention(self, q, keys, values, sm_scale: float | None, start) -> torch.Tensor:
        """The kernel path's attention of one query token per row, q [B, Hq, D], over the sink and the store, its
        last keys.shape[-2] tokens read exact from keys, values (what the kernel step's update returned)."""
        from .kvquant_attention import kvquant_decode_attention

        return kvquant_decode_attention(q, self.packed_keys, self.packed_values, self.params, self.keys, self.values,
                                        keys, values, bits=self.bits, sm_scale=sm_scale, rope=self.rope,
                                        positions=self.positions, start=start)

    def nbytes(self) -> int:
        """Bytes held: codes, value scales / offsets, the outliers, the sink, the layer's calibrated constants and
        the kernel path's positions."""
        if not self.is_initialized:
            return 0
        return sum(fmt.nbytes(p) for p in (self.packed_keys, self.packed_values, self.params, self.keys, self.values,
                                           self.positions))

    def reset(self) -> None:
        self.packed_keys = self.packed_values = self.positions = self._stores = self._full = self._dirty = None
        self.keys = self.values = None
        self.is_initialized = False

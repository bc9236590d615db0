"""FP8Layer: a transformers cache layer holding keys and values as float8_e4m3fn with one fp32 scale per KV head
(tquant.kv.fp8_format; the fp8_kv method), the torch path and the kernel path.

Per layer, for K, V [B, H_kv, t, D] handed to update() (keys after RoPE, as the model caches them):
    store    every token, quantized as it arrives (no residual window, no groups, no sink): codes float8_e4m3fn
             [B, Hkv, T, D] for keys and for values, on growing storage (tquant.kv.growing)
    returns  the dequantized store in the model's dtype. With prefill_with_quant=False the t tokens of this call
             come back exactly as given (a prefill attends to itself in full precision and later tokens see it as
             stored); True returns every token as stored.
Memory: nbytes() counts one byte a cached element and the layer's two fp32 scales a KV head. The torch path also
keeps the store decoded (model dtype; the codes never change), so a decode step decodes only its own token.

Kernel path (kernel=True; the default on CUDA GPUs of compute capability 8.9 or newer: fp8_format.kernel_device), as
KiviLayer's with no window: a one-token update stores its token and returns it as given (nothing with
prefill_with_quant), sets kernel_step to it, and the model's "tquant_kv" attention function calls decode_attention:
tquant.kv.attention.fp8_decode_attention over the e4m3 store (its last token not read where it comes exact) and that
token. The write is torch (a division, a clamp and the cast: no Triton write kernel); a multi-token update (a
prefill) decodes the store on demand.
"""
from __future__ import annotations

import torch

from . import growing
from .cache import QuantizedLayer, _last
from ..kernels.fp8_gemm import FP8
from .fp8_format import dequantize_fp8_kv, kernel_device, quantize_fp8_kv


class FP8Layer(QuantizedLayer):

    def __init__(self, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, prefill_with_quant: bool,
                 kernel: bool | None = None):
        """k_scale, v_scale: fp32 [Hkv] (the calibrated scales of this layer), or None for 1.0 on every head."""
        super().__init__()
        self.k_scale, self.v_scale, self.prefill_with_quant = k_scale, v_scale, prefill_with_quant
        self.kernel = kernel  # None: on CUDA tensors
        self.kernel_step = None  # the keys the last update returned for the kernel (its exact newest token), or None
        self.packed_keys = self.packed_values = None  # codes float8_e4m3fn [B, Hkv, T, D]: views of the stores
        self._stores = None  # (keys, values) growing.Growing of codes
        self._full = None  # the torch path's (keys, values) Growing [B, H, T, D]: the decoded store
        self._dirty = None  # (start, keys, values): the stored tokens the last update overwrote with its exact ones

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.kernel is None:
            self.kernel = kernel_device(key_states.device)
        heads = key_states.shape[1]
        for name in ("k_scale", "v_scale"):
            scale = getattr(self, name)
            if scale is None:
                scale = torch.ones(heads)
            if tuple(scale.shape) != (heads,):
                raise ValueError(f"fp8_kv was calibrated with {name} for {tuple(scale.shape)} KV heads; this cache "
                                 f"gets keys of {heads} KV heads")
            setattr(self, name, scale.to(self.device, torch.float32))
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]  # no full-precision tokens
        self._stores = tuple(growing.Growing(x[..., :0, :].to(FP8)) for x in (key_states, value_states))
        if not self.kernel:
            self._full = tuple(growing.Growing(x[..., :0, :].to(self.dtype)) for x in (key_states, value_states))
        self.is_initialized = True

    def quantized_length(self) -> int:
        return 0 if self._stores is None else self._stores[0].n

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Appends the call's tokens in O(t) amortized: only they are quantized (and on the torch path decoded)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._restore()
        t = key_states.shape[-2]
        codes = (quantize_fp8_kv(key_states, self.k_scale, "keys"), quantize_fp8_kv(value_states, self.v_scale,
                                                                                     "values"))
        for store, x in zip(self._stores, codes):
            store.append(x)
        self.packed_keys, self.packed_values = (s.view for s in self._stores)
        if self._full is not None:
            for g, x, scale in zip(self._full, codes, (self.k_scale, self.v_scale)):
                g.append(dequantize_fp8_kv(x, scale).to(self.dtype))
        _last.layer = self
        self.kernel_step = None
        if self.kernel and t == 1:
            exact = 0 if self.prefill_with_quant else 1
            self.kernel_step = key_states[..., :exact, :]
            return self.kernel_step, value_states[..., :exact, :]
        if self._full is None:  # the kernel path's prefill: the store decoded on demand
            return self._stored_with(key_states, value_states)
        keys, values = (g.view for g in self._full)
        if not self.prefill_with_quant:
            # the call's own tokens come back exact: written over their stored form, which the next update (or
            # stored()) puts back
            self._return_exact(keys, values, keys.shape[-2] - t, key_states, value_states)
        return keys, values

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached token as the cache holds it, model dtype (on the torch path views of its decoded copy; a
        fresh copy while the last update's exact tokens cover part of it)."""
        if self._full is not None:
            return self._decoded_copy()
        return tuple(dequantize_fp8_kv(x, s).to(self.dtype)
                     for x, s in ((self.packed_keys, self.k_scale), (self.packed_values, self.v_scale)))

    def decode_attention(self, q, keys, values, sm_scale: float | None, start) -> torch.Tensor:
        """The kernel path's attention of one query token per row, q [B, Hq, D], over the store, its last
        keys.shape[-2] tokens read exact from keys, values (what the kernel step's update returned)."""
        from .attention import fp8_decode_attention

        length = None
        if keys.shape[-2]:
            length = torch.full((q.shape[0],), self.quantized_length() - keys.shape[-2], dtype=torch.int32,
                                device=q.device)
        return fp8_decode_attention(q, self.packed_keys, self.packed_values, self.k_scale, self.v_scale, keys,
                                    values, sm_scale=sm_scale, start=start, length=length)

    def nbytes(self) -> int:
        """Bytes held: one a cached key / value element and the two fp32 scales of each KV head."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.packed_keys, self.packed_values, self.k_scale,
                                                            self.v_scale) if t is not None)

    def reset(self) -> None:
        self.packed_keys = self.packed_values = self._stores = self._full = self._dirty = None
        self.keys = self.values = None
        self.is_initialized = False

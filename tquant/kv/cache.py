"""QuantizedKVCache: a transformers Cache whose layers keep keys and values in KIVI's packed formats
(tquant.kv.uniform_format), with the most recent tokens in full precision.

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
step does not decode the whole store again.

Kernel path (kernel=True; the default on CUDA): a one-token update returns only the residual window (with no
window, residual 0 and prefill_with_quant=False: the step's exact token, whose stored copy the kernel skips, so
both paths attend to a call's own tokens as given), and the model's attention function "tquant_kv" (registered
here; tquant.kv.hook sets it on the model) calls decode_attention of the layer updated last: KiviLayer's runs
tquant.kv.attention on the packed store and the window (other layers, e.g. KVQuantLayer, bring their own
kernel and set _last.layer and kernel_step the same way). Every other call (prefills, the torch path) goes through
SDPA on the K / V that update returned.
"""
from __future__ import annotations

import threading

import torch
import transformers
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from . import growing
from .uniform_format import PackedKV, check_fp16_params, dequantize_values, key_format, quantize_values


class QuantizedLayer(CacheLayerMixin):
    """What every quantized cache layer shares: a packed store (packed_values: codes [B, H, T, ...]) followed by
    full-precision tokens (keys [B, H, t, D]: a residual window or a sink); no fixed maximum length."""
    is_compileable = False
    is_sliding = False

    def quantized_length(self) -> int:
        return 0 if self.packed_values is None else self.packed_values.codes.shape[-2]

    def get_seq_length(self) -> int:
        return self.quantized_length() + (self.keys.shape[-2] if self.is_initialized else 0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _return_exact(self, keys, values, start: int, key_states, value_states) -> None:
        """Write the call's own tokens (exact) over their stored form at [start, start + t) of the returned views
        keys / values of the torch path's decoded copy, keeping the stored form for _restore."""
        stop = start + key_states.shape[-2]
        self._dirty = (start, keys[..., start:stop, :].clone(), values[..., start:stop, :].clone())
        keys[..., start:stop, :] = key_states
        values[..., start:stop, :] = value_states

    def _restore(self) -> None:
        """The stored form back where the last update returned its tokens exact."""
        if self._dirty is not None:
            start, k, v = self._dirty
            for g, x in zip(self._full, (k, v)):
                g.view[..., start : start + x.shape[-2], :] = x
            self._dirty = None

    def _stored_with(self, key_states, value_states) -> tuple[torch.Tensor, torch.Tensor]:
        """A kernel path's prefill: every token as stored (stored()), the call's own t tokens exact unless
        prefill_with_quant."""
        keys, values = self.stored()
        if not self.prefill_with_quant:
            t = key_states.shape[-2]
            keys = torch.cat([keys[..., :-t, :], key_states], dim=-2)
            values = torch.cat([values[..., :-t, :], value_states], dim=-2)
        return keys, values

    def _decoded_copy(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch path's decoded copy as stored: views, or a fresh copy while the last update's exact tokens
        cover part of it."""
        keys, values = (g.view for g in self._full)
        if self._dirty is None:
            return keys, values
        start, k, v = self._dirty
        return tuple(torch.cat([x[..., :start, :], part, x[..., start + part.shape[-2]:, :]], dim=-2)
                     for x, part in ((keys, k), (values, v)))

    def growing(self) -> list:
        """Every growing.Growing the layer holds (its stores and the torch path's decoded copy)."""
        return growing._leaves(self._stores) + list(self._full or ())


class KiviLayer(QuantizedLayer):

    def __init__(self, bits: int, group: int, residual: int, prefill_with_quant: bool, kernel: bool | None = None,
                 key_axis: str = "channel", write_kernel: bool | None = None):
        super().__init__()
        self.bits, self.group, self.residual, self.prefill_with_quant = bits, group, residual, prefill_with_quant
        self.key_axis = key_axis
        self._quantize_keys, self._dequantize_keys = key_format(key_axis)
        self.flush_tokens = group if key_axis == "channel" else 1
        self.kernel = kernel  # None: on CUDA tensors
        self.write_kernel = write_kernel  # None: on CUDA tensors, where the format is the write kernel's
        self.kernel_step = None  # the keys the last update returned for the kernel (its residual window), or None
        self._unread = 0  # newest stored tokens the kernel step skips (they are in its window exactly)
        self.packed_keys: PackedKV | None = None  # views of the growing stores' filled parts
        self.packed_values: PackedKV | None = None
        self._stores = None  # (keys, values): PackedKV of growing.Growing
        self._full = None  # the torch path's (keys, values) Growing [B, H, T, D]: [decoded store ; residual]
        self._dirty = None  # (start, keys, values): the stored tokens the last update overwrote with its exact ones

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.kernel is None:
            self.kernel = key_states.is_cuda
        b, h, _, d = key_states.shape
        if self.write_kernel is None:
            from .write import BITS

            self.write_kernel = key_states.is_cuda and self.key_axis == "token" and self.group == d \
                and self.bits in BITS and d & (d - 1) == 0 and d * self.bits >= 32
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        empty = key_states.new_empty(b, h, 0, d, dtype=torch.float32)
        self._stores = tuple(growing.grow(p) for p in (self._quantize_keys(empty, self.bits, self.group),
                                                       quantize_values(empty, self.bits, self.group)))
        if not self.kernel:
            self._full = tuple(growing.Growing(x[..., :0, :].to(self.dtype)) for x in (key_states, value_states))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Appends the call's tokens in O(t) amortized (growing storage; the store's new groups only are quantized,
        and on the torch path decoded). On CUDA, keys and values stored per token over all D channels (key_axis
        "token", group = head_dim, 4 or 8 bits: QoQ's KV4 / KV8) are quantized straight into the store by the
        Triton write kernel (tquant.kv.write); KIVI's per-channel key groups have no write kernel and are
        quantized in torch (quantize_keys of the flushed groups), then appended."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._restore()
        t = key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self._full is not None:
            for g, x in zip(self._full, (key_states, value_states)):
                g.append(x)
        flush = max(0, self.keys.shape[-2] - self.residual) // self.flush_tokens * self.flush_tokens
        if flush:
            start = self.quantized_length()
            if self.write_kernel:
                from .write import kv_quant_write

                (k_buf, _), (v_buf, _) = (growing.extend(s, flush) for s in self._stores)
                rows = torch.arange(start, start + flush, device=self.keys.device)
                kv_quant_write(self.keys[..., :flush, :], self.values[..., :flush, :], k_buf, v_buf, rows, self.bits)
                for what, buf, x in (("keys", k_buf, self.keys), ("values", v_buf, self.values)):
                    written = slice(start, start + flush)
                    check_fp16_params(buf.scale[..., written, :], buf.mn[..., written, :], x[..., :flush, :], what)
                k = v = None
            else:
                k, v = self._quantize_keys(self.keys[..., :flush, :], self.bits, self.group), \
                    quantize_values(self.values[..., :flush, :], self.bits, self.group)
                growing.append(self._stores[0], k)
                growing.append(self._stores[1], v)
            self.packed_keys, self.packed_values = (growing.view(s) for s in self._stores)
            self.keys, self.values = self.keys[..., flush:, :], self.values[..., flush:, :]
            if self._full is not None:  # the flushed tokens' stored (decoded) form replaces their exact one
                if k is None:
                    k, v = (PackedKV(*(p[..., start:, :] for p in packed))
                            for packed in (self.packed_keys, self.packed_values))
                k = self._dequantize_keys(k, self.bits, self.group).to(self.dtype)
                v = dequantize_values(v, self.bits, self.group).to(self.dtype)
                for g, x in zip(self._full, (k, v)):
                    g.view[..., start : start + flush, :] = x
        _last.layer = self
        kernel_step = bool(self.kernel) and t == 1 and self.packed_keys is not None
        self.kernel_step, self._unread = (self.keys if kernel_step else None), 0
        if kernel_step and self.keys.shape[-2] == 0 and not self.prefill_with_quant:
            # no window (residual 0): the step's token went to the store; as on the torch path it attends to
            # itself exactly, so the kernel reads the store but its last token, and the exact token as the window
            self.kernel_step, self._unread = key_states, 1
            return key_states, value_states
        if kernel_step:
            return self.keys, self.values
        if self._full is None:  # the kernel path's prefill: the store decoded on demand
            return self._stored_with(key_states, value_states)
        keys, values = (g.view for g in self._full)
        end, first = keys.shape[-2], self.quantized_length()
        start = end - t
        if not self.prefill_with_quant and start < first:
            # the call's own tokens come back exact: write them over their stored form, which the next update
            # (or stored()) puts back
            self._return_exact(keys, values, start, key_states[..., : first - start, :],
                               value_states[..., : first - start, :])
        return keys, values

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached token as the cache holds it: [dequantized packed store ; residual], model dtype. On the
        torch path views of its decoded copy (a fresh copy while the last update's exact tokens cover part of it)."""
        if self._full is not None:
            return self._decoded_copy()
        if self.packed_keys is None:
            return self.keys, self.values
        k, v = (self._dequantize_keys(self.packed_keys, self.bits, self.group).to(self.dtype),
                dequantize_values(self.packed_values, self.bits, self.group).to(self.dtype))
        return torch.cat([k, self.keys], dim=-2), torch.cat([v, self.values], dim=-2)

    def decode_attention(self, q, keys, values, sm_scale: float | None, start) -> torch.Tensor:
        """The kernel path's attention of one query token per row, q [B, Hq, D], over the packed store and the
        window keys, values (what the kernel step's update returned)."""
        from .attention import kivi_decode_attention

        length = None
        if self._unread:
            length = torch.full((q.shape[0],), self.quantized_length() - self._unread, dtype=torch.int32,
                                device=q.device)
        return kivi_decode_attention(q, self.packed_keys, self.packed_values, keys, values, bits=self.bits,
                                     group=self.group, sm_scale=sm_scale, start=start, key_axis=self.key_axis,
                                     length=length)

    def nbytes(self) -> int:
        """Bytes held: packed codes, fp16 scales and minima, and the full-precision residual window."""
        if not self.is_initialized:
            return 0
        packed = sum(p.nbytes() for p in (self.packed_keys, self.packed_values) if p is not None)
        return packed + sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def reset(self) -> None:
        self.packed_keys = self.packed_values = self._stores = self._full = self._dirty = None
        self.keys = self.values = None
        self.is_initialized = False


class QuantizedKVCache(Cache):
    """One quantized cache layer per decoder layer (KiviLayer, or another method's: KVCacheMethod.make_layer);
    pass it to model(..., past_key_values=) or model.generate(...). tquant.kv_cache(model) builds it:
    QuantizedKVCache(layers=[...])."""

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


_last = threading.local()  # the cache layer updated last in this thread: the attention call that follows reads it
ATTENTION = "tquant_kv"


def softcap_attention(module, query, key, value, attention_mask, scaling: float, softcap: float, dropout=0.0):
    """Attention with logit soft-capping (Gemma-2), as transformers' eager Gemma-2 attention computes it:
    s = cap * tanh((q k^T * scaling) / cap), masked, softmax in fp32, times v. query [B, Hq, q, D], key / value
    [B, Hkv, T, D] (Hq a multiple of Hkv), attention_mask a bool mask (True attends), an additive one, or None (causal,
    the q queries being the last q of the T positions). Returns ([B, q, Hq, D], None) like every attention function."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None and q_len > 1:
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    if attention_mask is not None:
        mask = attention_mask[..., :k_len]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def kv_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function "tquant_kv": the layer's decode-attention kernel (layer.decode_attention) when
    `key` is what the layer updated last returned for its kernel (kernel_step: a one-token step on the kernel path,
    the full-precision tokens the kernel reads beside its packed store), else SDPA; with logit soft-capping (the
    model passes softcap=, Gemma-2) softcap_attention (tquant.kv.hook keeps such models off the kernel path: the
    decode kernels have no soft-capping)."""
    softcap = kwargs.pop("softcap", None)
    if softcap:
        return softcap_attention(module, query, key, value, attention_mask, scaling, softcap, dropout)
    layer = getattr(_last, "layer", None)
    if layer is None or layer.kernel_step is None or key is not layer.kernel_step:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layer.kernel_step = None
    start = None
    if attention_mask is not None:  # [B, 1, 1, T] (bool: True attends; or additive): a left-padded batch
        allowed = attention_mask[:, 0, -1, :]
        allowed = allowed if allowed.dtype == torch.bool else allowed == 0
        start = (allowed.shape[-1] - allowed.sum(-1)).to(torch.int32)
        positions = torch.arange(allowed.shape[-1], device=allowed.device)
        if not torch.equal(allowed, positions[None, :] >= start[:, None]):
            raise ValueError("the tquant_kv decode kernel takes left padding only (a contiguous run of tokens)")
    return layer.decode_attention(query[:, :, 0], key, value, scaling, start)[:, None], None


transformers.AttentionInterface.register(ATTENTION, kv_attention_forward)
transformers.AttentionMaskInterface.register(ATTENTION, sdpa_mask)

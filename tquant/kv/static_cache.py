"""The static KV caches of tquant.StaticDecoder: allocated once for `batch` sequences of up to max_len tokens, written
and read at positions held in device tensors, so that a decode step does the same work at every position and a CUDA
graph can replay it.

    cache = static_cache(model, batch, max_len)   # the form the model's KV method asks for
    cache.prepare(pos)                              # once a forward: what every layer derives from the positions
    cache.write(layer, k, v, pos); o = cache.decode_attention(layer, q, k, v, sm_scale); cache.stored(layer, t)
    cache.check_range(n)                            # after n tokens: a stored fp16 scale / minimum not finite raises

StaticKVCache: the float cache, and qoq_kv4's per-token codes. StaticKiviCache: KIVI's per-channel key groups and
per-token values, with the newest tokens in a full-precision ring window (its docstring). fp8_kv's e4m3 cache:
tquant.kv.fp8_static_cache. KVQuant's cache (outliers,
non-uniform codebooks, a sink) has no static form yet and is refused.

The fp16 range of the quantized caches' parameters (tquant.kv.uniform_format): a bf16 / fp32 write checks its groups
as it quantizes them on the torch path, but not while a CUDA graph is captured (no host sync there), and the write
kernels (tquant.kv.write, tquant.kv.kivi_write) not at all; check_range looks at the parameters stored for tokens
0 ... n - 1 instead (one host sync, no work per step), which the decoder calls after a prefill, after generating and
every CHECK_EVERY steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import tquant_config
from .attention import masked_attention
from .fp8_static_cache import fp8_static_cache
from . import kivi_write as kw
from .uniform_format import PackedKV, dequantize_keys, dequantize_values, stored_params_error, words_per_group
from ..models import head_dim


class StaticKVCache:
    """Keys / values (after RoPE) of every layer for `batch` sequences of up to max_len tokens, allocated once.

    bits None: k, v [L, B, Hkv, T, D] in the model's dtype
    bits 4 / 8 (qoq_kv4): per-token asymmetric codes with one fp16 (scale, minimum) per token and KV head (the
        per-token layout of tquant.kv.uniform_format, group = D): codes int32 [L, B, Hkv, T, D * bits / 32],
        scale, mn fp16 [L, B, Hkv, T, 1], for keys and for values
    write(layer, k, v, pos) stores k, v [B, Hkv, t, D] at positions pos (int64 [t]; codes: one kernel on CUDA,
    tquant.kv.write); attend(layer, q, length,
    ...) is one query token per row, q [B, Hq, D], over positions 0 ... length[b] - 1 (length int32 [B]) and an
    optional exact window. A decode step of a quantized cache without prefill_with_quant attends to its own token
    exactly (as tquant.kv_cache's layers do: a call's own tokens come as given) and to the earlier ones as stored
    (decode_attention, after prepare(pos) of the step's position).
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, head_size: int, max_len: int, dtype: torch.dtype,
                 device, bits: int | None = None, prefill_with_quant: bool = False):
        self.bits, self.dtype, self.prefill_with_quant, self.batch = bits, dtype, prefill_with_quant, batch
        self._exact = bits is not None and not prefill_with_quant  # a decode step's own token is attended exactly
        self.kernel = torch.device(device).type == "cuda"
        shape = (layers, batch, kv_heads, max_len)
        if bits is None:
            self.k = torch.zeros(*shape, head_size, dtype=dtype, device=device)
            self.v = torch.zeros_like(self.k)
        else:
            def store():
                return PackedKV(torch.zeros(*shape, head_size * bits // 32, dtype=torch.int32, device=device),
                                torch.ones(*shape, 1, dtype=torch.float16, device=device),
                                torch.zeros(*shape, 1, dtype=torch.float16, device=device))
            self.k, self.v = store(), store()
            self._window = torch.zeros(batch, kv_heads, 0, head_size, dtype=dtype, device=device)  # no fp window

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        if self.bits is None:
            self.k[layer].index_copy_(2, pos, k.to(self.dtype))
            self.v[layer].index_copy_(2, pos, v.to(self.dtype))
            return
        from .write import kv_quant_write, kv_quant_write_ref

        stores = [PackedKV(*(p[layer] for p in store)) for store in (self.k, self.v)]
        (kv_quant_write if self.kernel else kv_quant_write_ref)(k, v, *stores, pos, self.bits)

    def stored(self, layer: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions 0 ... t - 1 of one layer as the cache holds them, in the model's dtype."""
        if self.bits is None:
            return self.k[layer][:, :, :t], self.v[layer][:, :, :t]
        d = self._window.shape[-1]
        return tuple(dequantize_values(PackedKV(*(p[layer][:, :, :t] for p in store)), self.bits, d).to(self.dtype)
                     for store in (self.k, self.v))

    def attend(self, layer: int, q: torch.Tensor, length: torch.Tensor, sm_scale: float, k_new=None, v_new=None
               ) -> torch.Tensor:
        """o [B, Hq, D]: softmax(sm_scale q K^T) V over the first length[b] cached tokens of each row and, if
        given, the exact k_new, v_new [B, Hkv, 1, D] after them."""
        window = () if k_new is None else (k_new.to(self.dtype), v_new.to(self.dtype))
        if self.float_store and self.kernel and k_new is None:
            from .attention import float_decode_attention

            return float_decode_attention(q, self.k[layer], self.v[layer], length=length, sm_scale=sm_scale)
        if self.bits is not None and self.kernel:
            from .attention import kivi_decode_attention

            return kivi_decode_attention(q, PackedKV(*(p[layer] for p in self.k)),
                                         PackedKV(*(p[layer] for p in self.v)), *(window or (self._window,) * 2),
                                         bits=self.bits, group=q.shape[-1], sm_scale=sm_scale, key_axis="token",
                                         length=length)
        k, v = self.stored(layer, self.max_len)
        live = torch.arange(self.max_len, device=q.device)[None, :] < length[:, None]  # [B, T]
        if window:
            k, v = torch.cat([k, window[0]], dim=2), torch.cat([v, window[1]], dim=2)
            live = F.pad(live, (0, 1), value=True)
        return masked_attention(q, k, v, live, sm_scale)

    def prepare(self, pos: torch.Tensor) -> None:
        """Before a forward that writes positions pos (int64 [t]): the stored tokens a decode step attends to
        (all up to pos, or those before it where its own token comes exact), computed once for every layer."""
        self._length = (pos[-1:] + (0 if self._exact else 1)).to(torch.int32).expand(self.batch).contiguous()

    def decode_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         sm_scale: float) -> torch.Tensor:
        """o [B, Hq, D] of a decode step's query q [B, Hq, D] whose own k, v [B, Hkv, 1, D] were just written at
        the position prepared: over positions 0 ... pos, its own token exact for a quantized cache without
        prefill_with_quant."""
        return self.attend(layer, q, self._length, sm_scale, *((k, v) if self._exact else ()))

    def check_range(self, n: int) -> None:
        """ValueError naming the keys or values, the dtype and the token (uniform_format.stored_params_error) when
        a token of positions 0 ... n - 1 has a stored fp16 scale or minimum that is not finite; nothing to check
        for the float cache or an fp16 one (one host sync otherwise)."""
        if self.bits is None or self.dtype == torch.float16:
            return
        for what, store in (("keys", self.k), ("values", self.v)):
            error = stored_params_error(store.scale[:, :, :, :n], store.mn[:, :, :, :n], self.bits, self.dtype, what,
                                        lambda i: f"layer {i[0]}, sequence {i[1]}, KV head {i[2]}, token {i[3]}")
            if error is not None:
                raise error

    @property
    def float_store(self) -> bool:
        """Keys and values as they are: k, v [L, B, Hkv, T, D] tensors a RoPE kernel may write into."""
        return self.bits is None

    @property
    def max_len(self) -> int:
        return (self.k if self.bits is None else self.k.codes).shape[3]

    def bytes_per_token(self) -> int:
        """Cache bytes one token of one sequence takes, all layers (keys and values)."""
        parts = (self.k, self.v) if self.bits is None else (*self.k, *self.v)
        return sum(p.element_size() * p[:, 0, :, 0].numel() for p in parts)


class StaticKiviCache:
    """KIVI's cache (tquant.methods.kivi, formats of tquant.kv.uniform_format) in static form, for every layer.

    G = group_size, R = residual, W = R + G ring slots, NG = ceil(max_len / G) + 1 key groups (one spare: the pending
    group below always has a home):
        keys    PackedKV per channel: codes int32 [L, B, Hkv, NG * wpg, D], scale, mn fp16 [L, B, Hkv, NG, D]
        values  PackedKV per token:   codes int32 [L, B, Hkv, NG * G, D / G * wpg], scale, mn [L, B, Hkv, NG * G, D / G]
        ring    k, v [L, B, Hkv, W, D] in the model's dtype: position p at slot p % W
    After n tokens the first flushed(n) = G * floor(max(0, n - R) / G) are read from the packed store and the rest
    (flushed(n) ... n - 1, between min(n, R) and R + G - 1 of them) from the ring: the dynamic KiviLayer's rule,
    so both hold the same codes. Each write puts its tokens in the ring and then quantizes the pending group
    (positions flushed(n) ... flushed(n) + G - 1, read from the ring) into its store slot, which is not read until
    flushed grows past it; with R >= 1 that group is complete one write before it is. So every write does the
    same work, whatever the position: no host branch, one CUDA graph. Decode attention reads the store up to
    flushed and the ring's positions flushed ... pos (kernels.kv_attention's ring window). A prefill of t tokens
    also quantizes its complete groups, positions 0 ... n0 - 1 with n0 = G * floor(max(0, t - R) / G), straight into
    the store (the pending group is the next, n0 / G). With kernels (on CUDA; write_kernel True / False forces them on
    or off, None follows kernel; tquant.kv.kivi_write) a decode step's write is one launch a layer (kivi_write: the
    token into the ring, the pending group into the store) and a prefill's four: the ring's index_copy_ of k and of v,
    kivi_prefill_write (the n0 / G complete groups) and kivi_write of the newest token (the pending group); without,
    the same steps in torch ops, the same codes.
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, head_size: int, max_len: int, dtype: torch.dtype,
                 device, bits: int, group: int, residual: int, prefill_with_quant: bool = False):
        if residual < 1:
            raise ValueError("static KIVI decoding needs residual >= 1 (the newest token in the full-precision window)")
        self.bits, self.group, self.residual, self.dtype, self.batch = bits, group, residual, dtype, batch
        self.prefill_with_quant, self._max_len = prefill_with_quant, max_len
        self.kernel = torch.device(device).type == "cuda"
        self.write_kernel: bool | None = None  # the write kernels: None follows kernel
        self.slots = residual + group
        groups = -(-max_len // group) + 1
        wpg = words_per_group(bits, group)
        lead = (layers, batch, kv_heads)

        def zeros(*shape, dtype):
            return torch.zeros(*lead, *shape, dtype=dtype, device=device)

        self.k = PackedKV(zeros(groups * wpg, head_size, dtype=torch.int32),
                          zeros(groups, head_size, dtype=torch.float16), zeros(groups, head_size, dtype=torch.float16))
        self.v = PackedKV(zeros(groups * group, head_size // group * wpg, dtype=torch.int32),
                          zeros(groups * group, head_size // group, dtype=torch.float16),
                          zeros(groups * group, head_size // group, dtype=torch.float16))
        self.ring_k = zeros(self.slots, head_size, dtype=dtype)
        self.ring_v = torch.zeros_like(self.ring_k)
        self._offsets = torch.arange(group, device=device)
        self._word_offsets = torch.arange(wpg, device=device)
        self._flushed = torch.zeros(1, dtype=torch.long, device=device)
        self._newest = torch.zeros(1, dtype=torch.long, device=device)

    float_store = False

    def _flushed_after(self, n):
        return (n - self.residual).clamp(min=0) // self.group * self.group

    def prepare(self, pos: torch.Tensor) -> None:
        """Before a forward that writes positions pos (int64 [t], consecutive; a prefill starts at 0): the ring slots
        of its newest tokens, the newest position, flushed(newest + 1), the pending group's ring slots and store rows,
        computed once for every layer."""
        keep = min(len(pos), self.slots)
        self._slots = pos[-keep:] % self.slots
        self._newest = pos[-1:]
        self._flushed = self._flushed_after(self._newest + 1)
        self._pending = (self._flushed + self._offsets) % self.slots
        first_group = self._flushed // self.group
        self._key_rows = (first_group * len(self._word_offsets) + self._word_offsets, first_group, first_group)
        self._value_rows = self._flushed + self._offsets
        self._lengths = tuple(n.to(torch.int32).expand(self.batch).contiguous() for n in (self._flushed, self._newest))
        self._attended = self._lengths[1] + 1

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """k, v [B, Hkv, t, D] at positions pos (int64 [t], consecutive; a prefill starts at 0), after prepare(pos)."""
        t, g = k.shape[2], self.group
        kernel = self.kernel if self.write_kernel is None else self.write_kernel
        stores = [PackedKV(*(p[layer] for p in store)) for store in (self.k, self.v)]
        if t > 1 or not kernel:
            keep = len(self._slots)
            self.ring_k[layer].index_copy_(2, self._slots, k[:, :, -keep:].to(self.dtype))
            self.ring_v[layer].index_copy_(2, self._slots, v[:, :, -keep:].to(self.dtype))
        if t > 1:  # a prefill of positions 0 ... t - 1: its complete groups go straight to the store
            n0 = max(0, t - self.residual) // g * g
            (kw.kivi_prefill_write if kernel else kw.kivi_prefill_write_ref)(k[:, :, :n0], v[:, :, :n0], *stores,
                                                                             self.bits, g)
        if kernel:  # the newest token (again, for a prefill) and the pending group, read from the ring
            kw.kivi_write(k[:, :, -1:], v[:, :, -1:], self.ring_k[layer], self.ring_v[layer], *stores,
                          self._slots[-1:], self._flushed, self.bits, g)
        else:
            kw.store_pending_group(self.ring_k[layer], self.ring_v[layer], *stores, self._pending, self._key_rows,
                                   self._value_rows, self.bits, g)

    def stored(self, layer: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions 0 ... t - 1 of one layer as the cache holds them (the store before flushed, the ring from
        there to the newest written position; later positions hold whatever the store has), model dtype."""
        out = []
        slot = torch.arange(self.slots, device=self._newest.device)
        held = self._newest - (self._newest - slot) % self.slots  # the position in each ring slot
        for store, ring, decode in ((self.k, self.ring_k, dequantize_keys), (self.v, self.ring_v, dequantize_values)):
            x = decode(PackedKV(*(p[layer] for p in store)), self.bits, self.group).to(self.dtype)
            x = F.pad(x, (0, 0, 0, 1))  # a last row for the ring slots read from the store instead
            dump = x.shape[2] - 1
            x.index_copy_(2, torch.where(held >= self._flushed, held, dump), ring[layer])
            out.append(x[:, :, :t])
        return tuple(out)

    def attend(self, layer: int, q: torch.Tensor, length: torch.Tensor, sm_scale: float) -> torch.Tensor:
        """o [B, Hq, D] over positions 0 ... length[b] - 1 (length = the newest written position + 1)."""
        if self.kernel:
            from .attention import kivi_decode_attention

            keys, values = (PackedKV(*(p[layer] for p in store)) for store in (self.k, self.v))
            return kivi_decode_attention(q, keys, values, self.ring_k[layer], self.ring_v[layer], bits=self.bits,
                                         group=self.group, sm_scale=sm_scale, key_axis="channel",
                                         length=self._lengths[0], newest=self._lengths[1])
        live = torch.arange(self.max_len, device=q.device)[None, :] < length[:, None]
        return masked_attention(q, *self.stored(layer, self.max_len), live, sm_scale)

    def decode_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         sm_scale: float) -> torch.Tensor:
        """o [B, Hq, D] of a decode step whose k, v were just written at the prepared position: its own token is in
        the ring."""
        return self.attend(layer, q, self._attended, sm_scale)

    def check_range(self, n: int) -> None:
        """ValueError naming the keys or values, the dtype and the group (uniform_format.stored_params_error) when a
        group flushed after n tokens (flushed(n) of them: what attention reads from the store) has a stored fp16
        scale or minimum that is not finite; nothing to check for an fp16 cache (one host sync otherwise)."""
        if self.dtype == torch.float16:
            return
        g, flushed = self.group, int(self._flushed_after(torch.tensor(n)))

        def place(what, i):  # i: (layer, sequence, KV head, store row, last-dim index)
            layer, b, h, row, col = i
            tokens = f"tokens {row * g}..{row * g + g - 1}, channel {col}" if what == "keys" else \
                f"token {row}, channels {col * g}..{col * g + g - 1}"
            return f"layer {layer}, sequence {b}, KV head {h}, {tokens}"
        for what, store, stop in (("keys", self.k, flushed // g), ("values", self.v, flushed)):
            error = stored_params_error(store.scale[:, :, :, :stop], store.mn[:, :, :, :stop], self.bits, self.dtype,
                                        what, lambda i, what=what: place(what, i))
            if error is not None:
                raise error

    @property
    def max_len(self) -> int:
        return self._max_len

    def bytes_per_token(self) -> int:
        """Store bytes one token of one sequence takes, all layers (the ring of R + G full-precision tokens a
        sequence holds besides is fixed, not per token)."""
        tokens = self.v.codes.shape[3]
        return sum(p.element_size() * p[:, 0].numel() for p in (*self.k, *self.v)) // tokens


def static_cache(model, batch: int, max_len: int):
    """The static cache the model's KV method asks for: float without one, qoq_kv4's codes, KIVI's or fp8_kv's;
    ValueError for methods with no static form."""
    cfg = model.config
    spec = (tquant_config(model.config) or {}).get("kv_cache")
    dtype = model.get_input_embeddings().weight.dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = torch.float16
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    shape = (cfg.num_hidden_layers, batch, kv_heads, head_dim(cfg), max_len, dtype,
             model.get_input_embeddings().weight.device)
    if spec is None:
        return StaticKVCache(*shape)
    if spec["method"] == "fp8_kv":
        return fp8_static_cache(spec, *shape)
    if spec["method"] == "kivi":
        return StaticKiviCache(*shape, spec["kv_bits"], spec["group_size"], spec["residual"],
                               spec["prefill_with_quant"])
    if spec["method"] != "qoq_kv4":
        raise ValueError(f"static decoding supports the float cache, qoq_kv4's, KIVI's and fp8_kv's; this model's KV "
                         f"cache is {spec['method']!r} (use model.generate, which builds its dynamic cache)")
    if spec["residual"]:
        raise ValueError("static decoding keeps no full-precision window: qoq_kv4's residual must be 0")
    return StaticKVCache(*shape, spec["kv_bits"], spec["prefill_with_quant"])

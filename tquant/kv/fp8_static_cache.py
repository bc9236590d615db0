"""fp8_kv's cache in static form for tquant.StaticDecoder (the interface of tquant.kv.static_cache's caches): allocated
once for `batch` sequences of up to max_len tokens, written and read at positions held in device tensors, so a CUDA
graph can replay a decode step.

    k, v     float8_e4m3fn [L, B, Hkv, T, D]   (tquant.kv.fp8_format: E(clamp(x / s, -448, 448)))
    scales   k_scale, v_scale fp32 [L, Hkv]     one a layer and KV head (the spec's, or 1.0 for scale='none')
write(layer, k, v, pos) quantizes k, v [B, Hkv, t, D] in torch (a division, a clamp, the cast; no host sync) into rows
pos (int64 [t]). A decode step attends to positions 0 ... pos - 1 as stored and to its own token exactly (or to all up
to pos as stored with prefill_with_quant), through fp8_decode_attention on CUDA of compute capability 8.9 or newer
(length = the stored tokens read, on the device) and masked SDPA over the dequantized store elsewhere. e4m3
saturates and the scales are finite, so nothing the cache stores can be inf: check_range has nothing to check.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.fp8_gemm import FP8
from .attention import fp8_decode_attention, masked_attention
from .fp8_format import dequantize_fp8_kv, kernel_device, quantize_fp8_kv


class StaticFP8Cache:
    float_store = False

    def __init__(self, layers: int, batch: int, kv_heads: int, head_size: int, max_len: int, dtype: torch.dtype,
                 device, k_scale: torch.Tensor, v_scale: torch.Tensor, prefill_with_quant: bool = False):
        """k_scale, v_scale: fp32 [layers, kv_heads]."""
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if tuple(s.shape) != (layers, kv_heads):
                raise ValueError(f"{name} must be [layers={layers}, KV heads={kv_heads}]; got {tuple(s.shape)}")
        self.dtype, self.prefill_with_quant, self.batch = dtype, prefill_with_quant, batch
        self.kernel = kernel_device(device)
        self.k = torch.zeros(layers, batch, kv_heads, max_len, head_size, dtype=FP8, device=device)
        self.v = torch.zeros_like(self.k)
        self.k_scale, self.v_scale = (s.to(device, torch.float32).contiguous() for s in (k_scale, v_scale))
        self._window = torch.zeros(batch, kv_heads, 0, head_size, dtype=dtype, device=device)  # no exact token

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        for store, x, scale, what in ((self.k, k, self.k_scale, "keys"), (self.v, v, self.v_scale, "values")):
            codes = quantize_fp8_kv(x, scale[layer], what)  # index_copy_ has no float8 kernel on the CPU: bytes
            store[layer].view(torch.uint8).index_copy_(2, pos, codes.view(torch.uint8))

    def stored(self, layer: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions 0 ... t - 1 of one layer as the cache holds them, in the model's dtype."""
        return tuple(dequantize_fp8_kv(store[layer][:, :, :t], scale[layer]).to(self.dtype)
                     for store, scale in ((self.k, self.k_scale), (self.v, self.v_scale)))

    def prepare(self, pos: torch.Tensor) -> None:
        """Before a forward that writes positions pos (int64 [t]): the stored tokens a decode step reads (those before
        its own position where its own token comes exact, else all up to it), once for every layer."""
        exact = 0 if self.prefill_with_quant else 1
        self._length = (pos[-1:] + 1 - exact).to(torch.int32).expand(self.batch).contiguous()

    def decode_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         sm_scale: float) -> torch.Tensor:
        """o [B, Hq, D] of a decode step's query q [B, Hq, D] whose own k, v [B, Hkv, 1, D] were just written at the
        prepared position: over the stored positions before it and, unless prefill_with_quant, k, v exactly (else
        its stored form)."""
        window = (self._window,) * 2 if self.prefill_with_quant else (k.to(self.dtype), v.to(self.dtype))
        if self.kernel:
            return fp8_decode_attention(q, self.k[layer], self.v[layer], self.k_scale[layer], self.v_scale[layer],
                                        *window, sm_scale=sm_scale, length=self._length)
        keys, values = self.stored(layer, self.max_len)
        live = torch.arange(self.max_len, device=q.device)[None, :] < self._length[:, None]  # [B, T]
        keys, values = torch.cat([keys, window[0]], dim=2), torch.cat([values, window[1]], dim=2)
        live = F.pad(live, (0, window[0].shape[2]), value=True)
        return masked_attention(q, keys, values, live, sm_scale)

    def check_range(self, n: int) -> None:
        """Nothing to check: e4m3 saturates at +-448 and has no inf, and the scales are finite (module docstring)."""

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def bytes_per_token(self) -> int:
        """Cache bytes one token of one sequence takes, all layers (keys and values; the scales are per layer)."""
        return 2 * self.k[:, 0, :, 0].numel()


def fp8_static_cache(spec: dict, layers: int, batch: int, kv_heads: int, head_size: int, max_len: int,
                     dtype: torch.dtype, device) -> StaticFP8Cache:
    """The StaticFP8Cache of an fp8_kv spec (quantization_config["kv_cache"]): its calibrated k_scales / v_scales, or
    1.0 for scale='none'."""
    if spec["scale"] == "none":
        scales = [torch.ones(layers, kv_heads)] * 2
    elif spec.get("k_scales") is None:
        raise ValueError("fp8_kv is not calibrated: run tquant.quantize(model, 'fp8_kv', calib=...) first, or pass "
                         "scale='none'")
    else:
        scales = [torch.tensor(spec[f], dtype=torch.float32) for f in ("k_scales", "v_scales")]
    return StaticFP8Cache(layers, batch, kv_heads, head_size, max_len, dtype, device, *scales,
                          spec["prefill_with_quant"])

"""QoQ's KV4 cache with SmoothAttention (Lin et al., 2024, QServe).

Cache: keys and values alike per token and per KV head: the D = head_dim channels of one token of one head share
one fp16 (scale, minimum), asymmetric 4-bit (or 8-bit) codes (tquant.kv.uniform_format's per-token layout, group = D:
codes int32 [B, Hkv, T, D / epw], scale, mn fp16 [B, Hkv, T, 1]); KiviLayer with key_axis="token" flushes a
token at a time, with no full-precision window by default (residual=0, as QServe).
SmoothAttention (tquant.calib.smooth_attention): per-token keys suffer from outlier channels, so λ = max|K|^alpha per
KV head and key channel (post-RoPE calibration keys, tied over RoPE pairs) is divided out of k_proj and
multiplied into q_proj before anything is cached. The folded weights are ordinary float weights (a weight method
may quantize them afterwards; tquant.save stores them); λ is recorded in the spec as smooth_scales.
"""
from __future__ import annotations

import dataclasses

from .base import option, register
from ..config import tquant_config
from ..models import head_dim
from .kv_base import KVCacheMethod


@register
@dataclasses.dataclass
class QoQKV4(KVCacheMethod):
    name = "qoq_kv4"

    kv_bits: int = option(4, "bits per cached key / value element: 4 or 8")
    residual: int = option(0, "newest tokens kept in full precision (QServe keeps none)")
    prefill_with_quant: bool = option(False, "a prefill attends to its own keys / values as quantized (True) or "
                                             "exact (False); later tokens see the quantized store either way")
    smooth_alpha: float = option(0.5, "SmoothAttention: λ = max|K|^alpha per key channel, in [0, 1]; 0 = no "
                                      "smoothing (and no calibration)")
    head_dim: int = option(0, "channels sharing a scale / minimum (one per token per KV head): set from the model")
    smooth_scales: list | None = option(None, "λ [layer][KV head][channel] folded into k_proj / q_proj, written "
                                              "by calibration (a record, not an input)")

    def __post_init__(self):
        if self.kv_bits not in (4, 8):
            raise ValueError(f"qoq_kv4: kv_bits={self.kv_bits} is not supported; choose 4 or 8")
        if not 0 <= self.smooth_alpha <= 1:
            raise ValueError(f"qoq_kv4: smooth_alpha must be in [0, 1]; got {self.smooth_alpha}")
        if self.residual < 0:
            raise ValueError(f"qoq_kv4: residual must be >= 0; got {self.residual}")

    @property
    def needs_calibration(self) -> bool:
        return self.smooth_alpha > 0

    def check_model(self, config) -> None:
        """Also fills head_dim from the config and refuses a model already smoothed by qoq_kv4."""
        d = head_dim(config)
        if d % 2:
            raise ValueError(f"qoq_kv4 needs an even head size (RoPE pairs channels j, j + head_dim/2); got {d}")
        if self.head_dim not in (0, d):
            raise ValueError(f"qoq_kv4: head_dim={self.head_dim} is not the model's head size {d}")
        self.head_dim = d
        previous = (tquant_config(config) or {}).get("kv_cache")
        if previous and previous["method"] == self.name and previous.get("smooth_scales"):
            raise ValueError("this model's q_proj / k_proj already carry qoq_kv4's SmoothAttention (smooth_scales in "
                             "its quantization_config): apply qoq_kv4 once, to the float model")

    def calibrate(self, model, ids, batch_size: int = 8) -> None:
        from ..calib.smooth_attention import smooth_attention

        lams = smooth_attention(model, ids, self.smooth_alpha, batch_size)
        self.smooth_scales = [lam.tolist() for lam in lams]

    def make_layer(self, layer_idx: int, kernel: bool | None):
        from ..kv.cache import KiviLayer

        return KiviLayer(self.kv_bits, self.head_dim, self.residual, self.prefill_with_quant, kernel, key_axis="token")

"""The FP8 (e4m3) KV-cache format (vLLM's fp8 cache) in plain torch: what FP8Layer / StaticFP8Cache store and what
the decode-attention kernel reads (tquant.kv.attention.fp8_decode_attention).

    codes   float8_e4m3fn [B, Hkv, T, D]:  E(clamp(x / s_h, -448, 448)),  E = round to the nearest e4m3 value, ties to
            even (torch's float32 -> float8_e4m3fn cast, on the CPU too; tquant.kernels.fp8_gemm's docstring)
    s_h     fp32 [Hkv] a layer, keys and values each: one scale a KV head, fixed for the cache's life (no per-token
            parameters): calibrated max |x| over the calibration set / 448 (absmax_scale: 1.0 for a head whose maximum
            is 0), or 1.0 (vLLM's uncalibrated fp8 cache)
    x'      float(code) * s_h in fp32 (the e4m3 -> fp32 cast is exact), then the model's dtype
Precision: 3 mantissa bits, a relative error of at most 2^-4 for |x| / s_h in [2^-6, 448]; below 2^-6 (subnormals)
an absolute error of at most 2^-10 s_h. Saturation: |x| past 448 s_h (keys or values beyond the calibrated range)
is stored as +-448 s_h, as vLLM's cache (cvt.rn.satfinite) does; NaN stays NaN. No range check is needed: e4m3 has no
inf and the scales are finite numbers recorded in the spec.
"""
from __future__ import annotations

import torch

from ..kernels.fp8_gemm import E4M3_MAX, FP8


def check_scale(x: torch.Tensor, scale: torch.Tensor, what: str) -> None:
    """x [B, H, T, D] float and scale fp32 [H]; ValueError naming `what` (keys / values) otherwise."""
    if x.dim() != 4 or not x.is_floating_point() or x.dtype == FP8:
        raise ValueError(f"the fp8 KV cache's {what} must be a float [B, Hkv, T, D] tensor; got {x.dtype} "
                         f"{tuple(x.shape)}")
    if scale.dtype != torch.float32 or scale.shape != (x.shape[1],):
        raise ValueError(f"the {what} scale must be fp32 [Hkv={x.shape[1]}] (one a KV head); got {scale.dtype} "
                         f"{tuple(scale.shape)}")


def quantize_fp8_kv(x: torch.Tensor, scale: torch.Tensor, what: str = "keys") -> torch.Tensor:
    """codes float8_e4m3fn [B, H, T, D] of x [B, H, T, D] with the KV heads' scales scale fp32 [H] (module
    docstring). The division is a tensor one (IEEE in fp32 on every device)."""
    check_scale(x, scale, what)
    y = x.float() / scale.to(x.device)[:, None, None]
    return y.clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def dequantize_fp8_kv(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 [B, H, T, D] = float(codes) * scale[h], codes float8_e4m3fn [B, H, T, D], scale fp32 [H]."""
    return codes.float() * scale.to(codes.device)[:, None, None]


def kernel_device(device) -> bool:
    """Whether fp8_decode_attention runs on `device`: CUDA of compute capability 8.9 or newer (Ada, Hopper; Triton has
    no e4m3 below it). Elsewhere the fp8 caches attend in torch."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def absmax_scale(absmax: torch.Tensor) -> torch.Tensor:
    """fp32 scales [...] = absmax / 448 (IEEE), 1.0 where that is below the smallest normal fp32 (absmax 0: nothing
    to scale; a subnormal scale would make x / s inf)."""
    scale = absmax.float() / torch.tensor(E4M3_MAX, device=absmax.device)
    return torch.where(scale >= torch.finfo(torch.float32).tiny, scale, 1.0)


__all__ = ["absmax_scale", "dequantize_fp8_kv", "kernel_device", "quantize_fp8_kv"]

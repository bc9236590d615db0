"""RMSNorm with the residual add in front of it, as a decoder layer runs them (HF's LlamaRMSNorm rounding):

    h = x + residual               rounded to x's dtype            (residual None: h = x)
    y = w * (h * rsqrt(mean(h^2) + eps)).to(x.dtype)              mean and rsqrt in fp32; the product rounded to
                                                                   y's dtype = promote(w.dtype, x.dtype)
    x, residual [..., H] (rows of H contiguous; residual of x's shape and dtype), w [H]
    returns (y, h) [..., H]; h is x itself when residual is None

Kernel: one program per row, the whole row (H padded to a power of two) in registers: one read of x (and
residual), one write of y (and h). Replaces a step's seven or eight small torch ops a norm (cast, square, mean,
rsqrt, two products, the add before it) with one launch. `rms_norm_ref` is the same math in torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import DTYPES, check_device, next_power_of_2



def rms_norm_ref(x, w, eps: float, residual=None):
    h = x if residual is None else x + residual
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return w * normed.to(x.dtype), h


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, H, stride_x, stride_r, stride_y, stride_h, eps,
                     BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    h = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
        tl.store(h_ptr + row * stride_h + cols, h, mask=ok)
    hf = h.to(tl.float32)
    inv = tl.math.rsqrt(tl.sum(hf * hf, axis=0) / H + eps)
    normed = (hf * inv).to(h.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=ok)


def rows_of(t: torch.Tensor, name: str) -> torch.Tensor:
    """t as 2-D rows [R, H] with unit column stride (a view where possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) != 1:
        raise ValueError(f"{name}'s last dim must be contiguous; got strides {t.stride()}")
    return t2


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """(y, h) of the module docstring in one launch."""
    if x.dtype not in DTYPES or w.dtype not in DTYPES:
        raise ValueError(f"x and w must be fp16 / bf16 / fp32; got {x.dtype}, {w.dtype}")
    if w.shape != (x.shape[-1],):
        raise ValueError(f"w must be [H={x.shape[-1]}]; got {tuple(w.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x ({x.dtype} {tuple(x.shape)}); got {residual.dtype} "
                         f"{tuple(residual.shape)}")
    check_device({"x": x, "w": w, "residual": residual})
    x2 = rows_of(x, "x")
    r2 = rows_of(residual, "residual") if residual is not None else x2
    y = torch.empty(x.shape, dtype=torch.promote_types(w.dtype, x.dtype), device=x.device)
    h = torch.empty_like(x) if residual is not None else x
    y2, h2 = y.view(-1, x.shape[-1]), (h.view(-1, x.shape[-1]) if residual is not None else x2)
    block = next_power_of_2(x.shape[-1])
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, w, y2, h2, x.shape[-1], x2.stride(0), r2.stride(0), y2.stride(0),
                                         h2.stride(0), eps, BLOCK=block, HAS_RESIDUAL=residual is not None,
                                         num_warps=min(16, max(1, block // 256)))
    return y, h


__all__ = ["rms_norm", "rms_norm_ref"]

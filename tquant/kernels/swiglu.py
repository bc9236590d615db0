"""The gated MLP's activation, silu(gate) * up, in one launch (HF's LlamaMLP rounding: silu rounded to the
inputs' dtype, then the product):

    y = (g / (1 + exp(-g))).to(dtype) * up        g = gate in fp32;  gate, up, y [..., I] of one dtype

Kernel: a 1-D grid of BLOCK elements over rows of I (gate and up may be strided views, e.g. halves of one fused
projection; their rows of I contiguous). Two torch launches (silu, multiply) become one. `silu_mul_ref` is the same
in torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .rms_norm import rows_of
from .runtime import DTYPES, check_device

BLOCK = 1024


def silu_mul_ref(gate, up):
    return F.silu(gate) * up


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, n, width, stride_g, stride_u, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    row, col = offs // width, offs % width
    g = tl.load(g_ptr + row * stride_g + col, mask=ok, other=0.0)
    u = tl.load(u_ptr + row * stride_u + col, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(y_ptr + offs, (act * u.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """y = silu(gate) * up, a new contiguous tensor of gate's shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dtype not in DTYPES:
        raise ValueError(f"gate and up must be float tensors of one shape and dtype; got {gate.dtype} "
                         f"{tuple(gate.shape)} and {up.dtype} {tuple(up.shape)}")
    check_device({"gate": gate, "up": up})
    g2, u2 = rows_of(gate, "gate"), rows_of(up, "up")
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = y.numel()
    if n:
        _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](g2, u2, y, n, gate.shape[-1], g2.stride(0), u2.stride(0),
                                                   BLOCK=BLOCK, num_warps=4)
    return y


__all__ = ["silu_mul", "silu_mul_ref"]

"""Per-token dynamic activation quantization: the fused Triton kernel and its torch reference.

    xs[m, k]  = x[m, k] / smooth[k]        (SmoothQuant migration; xs = x without smooth), in fp32
    scale[m]  = max_k |xs[m, k]| / qmax,   qmax = 2^(bits-1) - 1 (127 for 8 bits, 7 for 4 bits)
                (static per-tensor quantization: scale[m] = the given scale[0] for every row)
    code[m,k] = clamp(round(xs[m, k] / scale[m]), -qmax, qmax)      round: half to even (as torch.round)
    x         [M, K] fp16 / bf16 / fp32      smooth [K] fp16 / bf16 / fp32 or None
    q         int8 [M, K] for bits=8; bits=4: int8 [M, ceil(K / 2)], byte j = code(2j) & 15 | code(2j+1) << 4
              (low nibble = even k, two's-complement nibbles; a missing code past an odd K is 0), or with
              pack=False int8 [M, K] codes in [-7, 7] (what an int8 GEMM reads: Hopper has no int4 MMA)
    scale     fp32 [M]
A row whose scale would fall below the smallest normal fp32 (all zeros, or max |xs| < 1.5e-36) gets
scale 1 and codes 0, so dividing by the scale never makes inf or NaN. Every step is one correctly
rounded fp32 operation, in the same order in kernel and reference, so both give identical q and scale.

`quantize_activations` runs one program per row (K walked twice in BLOCK_K steps: max, then codes).
`quantize_activations_ref` is plain torch; `fake_quantize_activations` is Q(xs) * scale as a float tensor
(what the GEMM epilogue multiplies back), used by methods to simulate the quantized layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import check_device, interpreter_on

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BITS = (4, 8)
FLT_MIN = tl.constexpr(torch.finfo(torch.float32).tiny)  # smallest normal fp32
RNE = tl.constexpr(12582912.0)  # 1.5 * 2^23: (y + RNE) - RNE is y rounded half to even for |y| < 2^22


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def check_inputs(x, bits, smooth, scale=None) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {BITS}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K] (flatten leading dims first); got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not supported; use one of {DTYPES}")
    if x.shape[1] == 0:
        raise ValueError("x must have at least one column (K >= 1)")
    if smooth is not None:
        if smooth.dtype not in DTYPES:
            raise ValueError(f"smooth dtype {smooth.dtype} is not supported; use one of {DTYPES}")
        if tuple(smooth.shape) != (x.shape[1],):
            raise ValueError(f"smooth shape {tuple(smooth.shape)} does not match: expected ({x.shape[1]},) for x "
                             f"of shape {tuple(x.shape)}")
    if scale is not None and (scale.dtype != torch.float32 or scale.numel() != 1):
        raise ValueError(f"a static scale must be one float32 value; got {scale.dtype} of shape {tuple(scale.shape)}")


def _codes_ref(x, bits, smooth, scale):
    """(int32 codes [M, K], fp32 scale [M])."""
    xs = x.float() if smooth is None else x.float() / smooth.float()
    if scale is None:
        # a tensor divisor: on CUDA, torch divides by a Python scalar as a multiply by its reciprocal (not IEEE)
        scale = xs.abs().amax(dim=1) / torch.tensor(float(qmax(bits)), device=x.device)
        scale = torch.where(scale >= FLT_MIN.value, scale, 1.0)
    else:
        scale = scale.reshape(1).expand(x.shape[0]).clone()
    return torch.round(xs / scale[:, None]).clamp(-qmax(bits), qmax(bits)).to(torch.int32), scale


def fake_quantize_activations(x, *, bits=8, smooth=None, scale=None):
    """codes * scale [..., K] in fp32: the activation the quantized GEMM sees (x / smooth, quantized)."""
    check_inputs(x.reshape(-1, x.shape[-1]), bits, smooth, scale)
    codes, s = _codes_ref(x.reshape(-1, x.shape[-1]), bits, smooth, scale)
    return (codes.float() * s[:, None]).reshape(x.shape)


def quantize_activations_ref(x, *, bits=8, smooth=None, scale=None, pack=True):
    check_inputs(x, bits, smooth, scale)
    codes, scale = _codes_ref(x, bits, smooth, scale)
    if bits == 4 and pack:
        codes = torch.nn.functional.pad(codes, (0, x.shape[1] % 2))
        codes = (codes[:, 0::2] & 15) | (codes[:, 1::2] << 4)
    return codes.to(torch.int8), scale


@triton.jit
def _smoothed(x_row, s_ptr, k, K, HAS_SMOOTH: tl.constexpr):
    """x[k] / smooth[k] in fp32 (0 past K)."""
    ok = k < K
    x = tl.load(x_row + k, mask=ok, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = tl.div_rn(x, tl.load(s_ptr + k, mask=ok, other=1.0).to(tl.float32))
    return x


@triton.jit
def _code(x_row, s_ptr, k, K, scale, QMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr):
    """clamp(round_half_even(xs[k] / scale), -QMAX, QMAX) as int32 (0 past K)."""
    y = tl.div_rn(_smoothed(x_row, s_ptr, k, K, HAS_SMOOTH), scale)
    y = (y + RNE) - RNE
    return tl.clamp(y, -QMAX, QMAX).to(tl.int32)


@triton.jit
def _act_quant_kernel(x_ptr, s_ptr, static_ptr, q_ptr, scale_ptr, K, KB, stride_xm, stride_qm, QMAX: tl.constexpr,
                      PACK: tl.constexpr, HAS_SMOOTH: tl.constexpr, STATIC: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    if STATIC:
        scale = tl.load(static_ptr)
    else:
        offs = tl.arange(0, BLOCK_K)
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            amax = tl.maximum(amax, tl.abs(_smoothed(x_row, s_ptr, k0 + offs, K, HAS_SMOOTH)))
        scale = tl.div_rn(tl.max(amax, axis=0), 1.0 * QMAX)
        scale = tl.where(scale >= FLT_MIN, scale, 1.0)
    tl.store(scale_ptr + row, scale)
    byte = tl.arange(0, BLOCK_K // PACK)
    for b0 in range(0, KB, BLOCK_K // PACK):
        j = b0 + byte
        q = _code(x_row, s_ptr, j * PACK, K, scale, QMAX, HAS_SMOOTH)
        if PACK == 2:  # low nibble = even k; hi << 4 keeps the sign, so the byte is in [-128, 127]
            q = (q & 15) | (_code(x_row, s_ptr, j * 2 + 1, K, scale, QMAX, HAS_SMOOTH) << 4)
        tl.store(q_ptr + row.to(tl.int64) * stride_qm + j, q.to(tl.int8), mask=j < KB)


def quantize_activations(x, *, bits=8, smooth=None, scale=None, pack=True):
    """Per-token dynamic quantization of x [M, K], or static per-tensor with scale (fp32, one value);
    pack=False keeps 4-bit codes one per int8."""
    check_inputs(x, bits, smooth, scale)
    check_device(dict(x=x, smooth=smooth, scale=scale))
    m, k = x.shape
    pack = 8 // bits if pack else 1
    kb = -(-k // pack)
    q = torch.empty(m, kb, dtype=torch.int8, device=x.device)
    static = scale
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    x = x.contiguous()
    smooth = smooth.contiguous() if smooth is not None else None
    block_k = 32 if interpreter_on() else min(max(triton.next_power_of_2(k), 128), 4096)
    _act_quant_kernel[(m,)](
        x, smooth if smooth is not None else x, static if static is not None else scale, q, scale, k, kb,
        x.stride(0), q.stride(0), QMAX=qmax(bits), PACK=pack, HAS_SMOOTH=smooth is not None,
        STATIC=static is not None, BLOCK_K=block_k, num_warps=4 if block_k <= 1024 else 8,
    )
    return q, scale

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

Asymmetric (zero_point=True, bits 2..8; ABQ-LLM / OmniQuant's per-token activations; the grid of
tquant.formats.quantizer.qparams(sym=False) with every division IEEE-rounded):
    lo[m] = min(min_k xs[m, k], 0),  hi[m] = max(max_k xs[m, k], 0)    (a row with hi - lo < 2^bits * FLT_MIN:
                                                                       lo, hi = -1, 1)
    scale[m] = (hi - lo) / (2^bits - 1),   zero[m] = round(-lo / scale[m])
                (where hi - lo passes fp32's max, a row holding +-3e38: scale = hi / (2^bits-1) - lo / (2^bits-1))
    a[m, k] = clamp(round(xs[m, k] / scale[m]) + zero[m], 0, 2^bits - 1),   x ~= scale * (a - zero)
    q int8 [M, K] = a - 2^(bits-1) (centred: every bits <= 8 fits int8),  scale fp32 [M],  zero int32 [M]

`quantize_activations` runs one program per row (K walked twice in BLOCK_K steps: max, then codes).
`quantize_activations_ref` is plain torch; `fake_quantize_activations` is Q(xs) * scale as a float tensor
(what the GEMM epilogue multiplies back), used by methods to simulate the quantized layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import DTYPES, check_device, interpreter_on

BITS = (4, 8)
ASYM_BITS = tuple(range(2, 9))
FLT_MIN = tl.constexpr(torch.finfo(torch.float32).tiny)  # smallest normal fp32
FLT_MAX = tl.constexpr(torch.finfo(torch.float32).max)
RNE = tl.constexpr(12582912.0)  # 1.5 * 2^23: (y + RNE) - RNE is y rounded half to even for |y| < 2^22


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def check_inputs(x, bits, smooth, scale=None, zero_point=False) -> None:
    if bits not in (ASYM_BITS if zero_point else BITS):
        raise ValueError(f"bits={bits} is not supported; use one of {ASYM_BITS if zero_point else BITS}"
                         + ("" if zero_point else " (2..8 with zero_point=True)"))
    if zero_point and scale is not None:
        raise ValueError("zero_point=True quantizes per token: a static scale is not supported")
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


def _asym_codes_ref(x, bits, smooth):
    """(a int32 [M, K] in [0, 2^bits), scale fp32 [M], zero int32 [M]) of the asymmetric grid above."""
    xs = x.float() if smooth is None else x.float() / smooth.float()
    maxq = torch.tensor(float(2**bits - 1), device=x.device)  # a tensor divisor: IEEE on CUDA too
    lo, hi = xs.amin(dim=1).clamp(max=0), xs.amax(dim=1).clamp(min=0)
    flat = (hi - lo) < FLT_MIN.value * 2**bits
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    scale = (hi - lo) / maxq
    scale = torch.where(scale.isinf(), hi / maxq - lo / maxq, scale)  # a row holding +-3e38: hi - lo overflows
    zero = torch.round(-lo / scale)
    a = (torch.round(xs / scale[:, None]) + zero[:, None]).clamp(0, 2**bits - 1)
    return a.to(torch.int32), scale, zero.to(torch.int32)


def fake_quantize_activations(x, *, bits=8, smooth=None, scale=None):
    """codes * scale [..., K] in fp32: the activation the quantized GEMM sees (x / smooth, quantized)."""
    check_inputs(x.reshape(-1, x.shape[-1]), bits, smooth, scale)
    codes, s = _codes_ref(x.reshape(-1, x.shape[-1]), bits, smooth, scale)
    return (codes.float() * s[:, None]).reshape(x.shape)


def quantize_activations_ref(x, *, bits=8, smooth=None, scale=None, pack=True, zero_point=False):
    check_inputs(x, bits, smooth, scale, zero_point)
    if zero_point:
        a, scale, zero = _asym_codes_ref(x, bits, smooth)
        return (a - 2 ** (bits - 1)).to(torch.int8), scale, zero
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
def _asym_code(x_row, s_ptr, k, K, scale, zero, MAXQ: tl.constexpr, HAS_SMOOTH: tl.constexpr):
    """clamp(round_half_even(xs[k] / scale) + zero, 0, MAXQ) - (MAXQ + 1) / 2 as int32."""
    y = (tl.div_rn(_smoothed(x_row, s_ptr, k, K, HAS_SMOOTH), scale) + RNE) - RNE
    return tl.clamp(y + zero, 0.0, 1.0 * MAXQ).to(tl.int32) - (MAXQ + 1) // 2


@triton.jit
def _act_quant_kernel(x_ptr, s_ptr, static_ptr, q_ptr, scale_ptr, zero_ptr, K, KB, stride_xm, stride_qm,
                      QMAX: tl.constexpr, PACK: tl.constexpr, HAS_SMOOTH: tl.constexpr, STATIC: tl.constexpr,
                      ASYM: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    if ASYM:  # QMAX is 2^bits - 1 here
        offs = tl.arange(0, BLOCK_K)
        lo = tl.zeros([BLOCK_K], dtype=tl.float32)  # min(., 0) and max(., 0) from the start (0 past K too)
        hi = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xs = _smoothed(x_row, s_ptr, k0 + offs, K, HAS_SMOOTH)
            lo, hi = tl.minimum(lo, xs), tl.maximum(hi, xs)
        lo, hi = tl.min(lo, axis=0), tl.max(hi, axis=0)
        flat = (hi - lo) < FLT_MIN * (QMAX + 1)
        lo, hi = tl.where(flat, -1.0, lo), tl.where(flat, 1.0, hi)
        scale = tl.div_rn(hi - lo, 1.0 * QMAX)
        scale = tl.where(scale > FLT_MAX, tl.div_rn(hi, 1.0 * QMAX) - tl.div_rn(lo, 1.0 * QMAX), scale)  # hi - lo inf
        zero = (tl.div_rn(-lo, scale) + RNE) - RNE
        tl.store(scale_ptr + row, scale)
        tl.store(zero_ptr + row, zero.to(tl.int32))
        for j0 in range(0, K, BLOCK_K):
            j = j0 + offs
            q = _asym_code(x_row, s_ptr, j, K, scale, zero, QMAX, HAS_SMOOTH)
            tl.store(q_ptr + row.to(tl.int64) * stride_qm + j, q.to(tl.int8), mask=j < K)
    else:
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


def quantize_activations(x, *, bits=8, smooth=None, scale=None, pack=True, zero_point=False):
    """Per-token dynamic quantization of x [M, K], or static per-tensor with scale (fp32, one value);
    pack=False keeps 4-bit codes one per int8. zero_point=True: the asymmetric per-token grid (bits 2..8), returning
    (q, scale, zero)."""
    check_inputs(x, bits, smooth, scale, zero_point)
    check_device(dict(x=x, smooth=smooth, scale=scale))
    m, k = x.shape
    pack = 8 // bits if pack and not zero_point else 1
    kb = -(-k // pack)
    q = torch.empty(m, kb, dtype=torch.int8, device=x.device)
    static = scale
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    zero = torch.empty(m if zero_point else 0, dtype=torch.int32, device=x.device)
    if m == 0:
        return (q, scale, zero) if zero_point else (q, scale)
    x = x.contiguous()
    smooth = smooth.contiguous() if smooth is not None else None
    block_k = 32 if interpreter_on() else min(max(triton.next_power_of_2(k), 128), 4096)
    _act_quant_kernel[(m,)](
        x, smooth if smooth is not None else x, static if static is not None else scale, q, scale,
        zero if zero_point else scale, k, kb, x.stride(0), q.stride(0),
        QMAX=2**bits - 1 if zero_point else qmax(bits), PACK=pack, HAS_SMOOTH=smooth is not None,
        STATIC=static is not None, ASYM=zero_point, BLOCK_K=block_k, num_warps=4 if block_k <= 1024 else 8,
    )
    return (q, scale, zero) if zero_point else (q, scale)

"""FP8 (float8 e4m3) GEMMs: per-token activation quantization, the W8A8 tl.dot GEMM, and the weight-only GEMM.

e4m3 ("float8_e4m3fn", Triton's tl.float8e4nv): 1 sign, 4 exponent (bias 7), 3 mantissa bits, no inf; finite values
+-448 at most, normal down to 2^-6, subnormal multiples of 2^-9 below; 0x7F / 0xFF are NaN.
Rounding E(y): y (|y| <= 448) to the nearest e4m3 value, ties to even (what torch's cast of a float32 does).

Activation quantization (`quantize_fp8`, one program per row, the row read once: scale and codes in one pass):
    scale[m] = max_k |x[m, k]| / 448                       (dynamic, per token; a row whose scale would be below the
                                                            smallest normal fp32 (all zeros, max |x| < 5.3e-36) gets
                                                            scale 1, so x / scale is never 0 / 0)
             = the given scale[0] for every row             (static, per tensor; calibrated)
    xq[m, k] = E(clamp(x[m, k] / scale[m], -448, 448))     x / scale IEEE-rounded in fp32, as torch divides
    x [M, K] fp16 / bf16 / fp32  ->  xq float8_e4m3fn [M, K], scale fp32 [M]

W8A8 GEMM (`fp8_matmul`):
    y[m, n] = (acc[m, n] * x_scale[m]) * w_scale[n] (+ bias[n]),   acc[m, n] = sum_k xq[m, k] * wq[n, k]  (fp32)
    xq float8_e4m3fn [M, K], x_scale fp32 [M]; wq float8_e4m3fn [N, K] (nn.Linear layout: K contiguous in each
    output row, the K-major B operand that Hopper's fp8 wgmma reads), w_scale fp32 [N]; bias fp16 / bf16 / fp32
    [N] or None, added in fp32; y [M, N] in out_dtype (fp16 / bf16 / fp32).
    Each product of two e4m3 values is exact in fp32 (4 x 4 significant bits). On an H100 (sm_90) Triton's fp8
    tl.dot accumulates inside the tensor core with fewer bits than fp32 (its default max_num_imprecise_acc: no
    promotion, as torch._scaled_mm(use_fast_accum=True)); under the interpreter in fp32.
Weight-only GEMM (`fp8_weight_only_matmul`, FP8 W8A16):
    y[m, n] = acc[m, n] * w_scale[n] (+ bias[n]),   acc[m, n] = sum_k x[m, k] * float(wq[n, k])  (fp32)
    x fp16 / bf16 / fp32 [M, K]; each weight tile converted from e4m3 to x's dtype (exact: e4m3 values are fp16 /
    bf16 values) and multiplied by tl.dot in x's dtype (fp32: "ieee"); y in x's dtype.

Fused W8A8 (`fp8_linear`'s "fused" path, per-token scales only): the W8A8 GEMM of x [M, K] fp16 / bf16 / fp32 given
in its own dtype, y = fp8_matmul(*quantize_fp8(x), wq, w_scale, bias) bit for bit at the same tile, in one launch.
Each program first reads its BLOCK_M rows of x over all of K (small at decode sizes, and L2-resident for the
programs after the first) for scale[m] as above, then in the K loop turns each x tile into e4m3 codes before the
tl.dot: E(clamp(x / scale, -448, 448)) with x / scale the IEEE quotient computed without a division (`divide`: a
reciprocal per row and two fma corrections), and applies scale[m] in the epilogue. Every program repeats the rows'
quantization (N / BLOCK_N times in all), so it pays where the separate launch costs more than that: small M.
`fp8_linear` (FP8Linear's W8A8 forward) takes, per GPU and key, whichever of the two launches and the fused kernel
at each small-M tile the tuner times fastest (linear_configs).

One kernel serves all three GEMMs (WEIGHT_ONLY, QUANT_X constexprs): program (pid, split) owns a [BLOCK_M, BLOCK_N]
tile of y (GROUP_M-grouped order) and walks its share of K in BLOCK_K steps; the scales are applied in the epilogue.
Split-K (SPLIT_K > 1, the int8 GEMMs' split candidates up to M = 64: w8a8_gemm.SPLIT_TILES): grid axis 1 splits K into
S = ceil(K / P) ranges of P = ceil(ceil(K / SPLIT_K) / BLOCK_K) * BLOCK_K (dequant_gemm.split_args), split s
owning k in [s P, min((s + 1) P, K)) with its own fp32 accumulator acc_s (the tl.dot's, as the unsplit loop over that
range);
the last split of a tile to arrive (dequant_gemm.split_k_sum: fp32 workspace [S, M, N], arrival counters, one launch)
computes
    acc = (((0 + acc_0) + acc_1) + ...) + acc_{S-1}     (fp32, in this fixed split order)
    y   = (acc * x_scale[m]) * w_scale[n] (+ bias[n])   (the unsplit epilogue; weight-only: acc * w_scale[n])
so y differs from the unsplit kernel's only by the fp32 rounding of the regrouped sum (deterministic: no atomics on
values). The fused mode splits the same way, each split taking the rows' scales over all of K first. The launch
config is tuned per GPU and key (M rounded up to a power of two, N, K, out dtype, bias, mode) by autotune_cache among
the int8 GEMMs' candidates (w8a8_gemm.configs: the same one-byte weight tiles); the interpreter runs one small config.

Under the Triton interpreter (Triton 3.9), fp8 tensors load, store and tl.dot exactly (the dot widens them to
fp16), and e4m3 -> wider casts are exact, but the fp32 -> e4m3 cast is not RNE: it rounds half up without the
sticky bits, truncates subnormals and does not saturate (1.0625 -> 1.125, 1e-3 -> 0, 500 -> 256). So the kernel
never relies on that cast to round: `round_e4m3` rounds in fp32 integer arithmetic (RNE on the mantissa bits for
normals, a multiple of 2^-9 for subnormals), and the cast then only converts an exact e4m3 value, which both the
interpreter and the GPU's cvt.rn.satfinite do exactly. The same code runs on both; no GPU-only branch. On CUDA the
kernels need compute capability 8.9 or newer (Ada, Hopper: Triton has no e4m3 below it); older GPUs are refused by name
(check_fp8_device). Not yet run on a GPU here: tests/kernels/test_kernels_fp8.py with TRITON_INTERPRET=0 checks it.
The references (`*_ref`) are plain torch: torch.float8_e4m3fn's cast (RNE, on the CPU too) and fp64 matmuls.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune_cache import tune
from .runtime import DTYPES, check_device, dot_args, interpreter_on, next_power_of_2
from .tiling import store_output, tile_offsets
from .dequant_gemm import k_range, split_args, split_k_sum
from .w8a8_gemm import check_operand_shapes, configs

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TL_E4M3_MAX = tl.constexpr(E4M3_MAX)
FLT_MIN = tl.constexpr(torch.finfo(torch.float32).tiny)  # smallest normal fp32
RNE = tl.constexpr(12582912.0)  # 1.5 * 2^23: (y + RNE) - RNE is y rounded half to even for |y| < 2^22


def check_fp8_device(device: torch.device) -> None:
    """Triton's float8e4nv needs compute capability 8.9 or newer (Ada, Hopper) on CUDA; the interpreter takes it."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"the FP8 kernels need a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}: run FP8Linear with "
                         "backend='torch' (the references), or quantize with another method")


def check_activations(x, scale, name="x") -> None:
    """x [M, K] float (K >= 1); a static scale is one positive finite float32 value."""
    if x.dim() != 2 or x.dtype not in DTYPES:
        raise ValueError(f"{name} must be a 2-D [M, K] tensor of {DTYPES} (flatten leading dims first); got "
                         f"{x.dtype} of shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one column (K >= 1)")
    if scale is not None and (scale.dtype != torch.float32 or scale.numel() != 1):
        raise ValueError(f"a static scale must be one float32 value; got {scale.dtype} of shape {tuple(scale.shape)}")


def quantize_fp8_ref(x, *, scale=None):
    """(xq float8_e4m3fn [M, K], scale fp32 [M]) of x [M, K]: per token, or static with scale (fp32, one value)."""
    check_activations(x, scale)
    x32 = x.float()
    if scale is None:
        # a tensor divisor: on CUDA, torch divides by a Python scalar as a multiply by its reciprocal (not IEEE)
        scale = x32.abs().amax(dim=1) / torch.tensor(E4M3_MAX, device=x.device)
        scale = torch.where(scale >= FLT_MIN.value, scale, 1.0)
    else:
        scale = scale.reshape(1).expand(x.shape[0]).clone()
    return (x32 / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8), scale


def fake_quantize_fp8(x, *, scale=None):
    """E(x / scale) * scale [..., K] in fp32: the activation the W8A8 GEMM sees (what methods simulate)."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, s = quantize_fp8_ref(x2, scale=scale)
    return (xq.float() * s[:, None]).reshape(x.shape)


@triton.jit
def round_e4m3(y):
    """E(y) as an fp32 value, for fp32 y with |y| <= 448: normals (|y| >= 2^-6) keep 3 mantissa bits, rounded half to
    even on the bits (add 0x7FFFF + the kept lsb, clear the 20 low bits; a carry moves into the exponent);
    subnormals are multiples of 2^-9 of |y|, rounded half to even, with y's sign bit (-1e-4 -> -0, as torch)."""
    bits = y.to(tl.int32, bitcast=True)
    normal = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 = ~0xFFFFF as int32
    subnormal = ((tl.abs(y) * 512.0 + RNE) - RNE) * 0.001953125
    subnormal = subnormal.to(tl.int32, bitcast=True) | (bits & -2147483648)  # -2^31: the sign bit
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal).to(tl.float32, bitcast=True)


@triton.jit
def token_scale(amax):
    """scale = amax / 448 (IEEE-rounded, as the reference's tensor division), 1 where that is below FLT_MIN."""
    scale = tl.div_rn(amax, TL_E4M3_MAX)
    return tl.where(scale >= FLT_MIN, scale, 1.0)


@triton.jit
def e4m3_codes(y):
    """E(clamp(y, -448, 448)) as float8e4nv, y = x / scale in fp32 (any shape)."""
    return round_e4m3(tl.clamp(y, -TL_E4M3_MAX, TL_E4M3_MAX)).to(tl.float8e4nv)


@triton.jit
def divisor(scale):
    """(m, r, p) of normal fp32 scales, scale = m 2^e with m in [1, 2): m, r = RN(1 / m) (IEEE), p = 2^-e."""
    bits = scale.to(tl.int32, bitcast=True)
    m = ((bits & -2139095041) | 0x3F800000).to(tl.float32, bitcast=True)  # -2139095041 = 0x807FFFFF: sign, mantissa
    p = ((254 - ((bits >> 23) & 0xFF)) << 23).to(tl.float32, bitcast=True)
    return m, tl.div_rn(1.0, m), p


@triton.jit
def divide(x, m, r, p):
    """RN(x / scale), the IEEE quotient, of fp32 x with |x / scale| < 2^100 (scale = m / p: divisor), without a
    division: xp = x p is exact (a power of two; |xp| < 2^101), so x / scale = xp / m. q0 = RN(xp r) is within 2 ulps
    of xp / m; one correction q1 = RN(q0 + RN(xp - m q0) r) (fma) is within 1 ulp; Markstein's theorem (r within half
    an ulp of 1 / m, q1 within 1 ulp, the remainder xp - m q1 exact in an fma) makes q = RN(q1 + (xp - m q1) r) the
    correctly rounded xp / m. The remainder is a multiple of ulp(q) 2^-23, exact down to |x / scale| >= 2^-103; below
    (where both round to an e4m3 zero) q may differ from the IEEE quotient by ulps, never in sign: q carries x's sign
    bit, as -tiny / scale = -0 does."""
    xp = x * p
    q = xp * r
    q = tl.fma(tl.fma(-m, q, xp), r, q)
    q = tl.fma(tl.fma(-m, q, xp), r, q)
    sign = x.to(tl.int32, bitcast=True) & -2147483648
    return (q.to(tl.int32, bitcast=True) & 0x7FFFFFFF | sign).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_quant_kernel(x_ptr, static_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm, STATIC: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    ok = offs < K
    x = tl.load(x_ptr + row.to(tl.int64) * stride_xm + offs, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(static_ptr) if STATIC else token_scale(tl.max(tl.abs(x), axis=0))
    tl.store(scale_ptr + row, scale)
    tl.store(q_ptr + row.to(tl.int64) * stride_qm + offs, e4m3_codes(tl.div_rn(x, scale)), mask=ok)


def quantize_fp8(x, *, scale=None):
    """The kernel of quantize_fp8_ref (identical xq and scale). The whole row is held in registers (BLOCK_K =
    next power of two >= K), so x is read once."""
    check_activations(x, scale)
    check_device(dict(x=x, scale=scale))
    check_fp8_device(x.device)
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    out_scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, out_scale
    x = x.contiguous()
    block_k = triton.next_power_of_2(k)
    _fp8_quant_kernel[(m,)](x, scale if scale is not None else out_scale, q, out_scale, k, x.stride(0), q.stride(0),
                            STATIC=scale is not None, BLOCK_K=block_k, num_warps=min(16, max(4, block_k // 512)))
    return q, out_scale


def check_gemm_inputs(x, x_scale, wq, w_scale, bias, out_dtype, weight_only=False) -> None:
    """Raise ValueError naming the first tensor whose dtype or shape is wrong."""
    if weight_only:
        check_activations(x, None)  # out_dtype is x's dtype
    elif out_dtype not in DTYPES:
        raise ValueError(f"out_dtype {out_dtype} is not supported; use one of {DTYPES}")
    elif x.dim() != 2 or x.dtype != FP8:
        raise ValueError(f"xq must be a 2-D float8_e4m3fn tensor; got {x.dtype} of shape {tuple(x.shape)}")
    if wq.dim() != 2 or wq.dtype != FP8:
        raise ValueError(f"wq must be a 2-D float8_e4m3fn tensor; got {wq.dtype} of shape {tuple(wq.shape)}")
    check_operand_shapes(x, x_scale, wq, w_scale, bias, "x" if weight_only else "xq")


def _finish(acc, bias, out_dtype):
    return (acc if bias is None else acc + bias.float()).to(out_dtype)


def fp8_matmul_ref(xq, x_scale, wq, w_scale, *, bias=None, out_dtype=torch.float16):
    check_gemm_inputs(xq, x_scale, wq, w_scale, bias, out_dtype)
    acc = (xq.double() @ wq.double().T).float()
    return _finish(acc * x_scale[:, None] * w_scale[None, :], bias, out_dtype)


def fp8_weight_only_matmul_ref(x, wq, w_scale, *, bias=None):
    check_gemm_inputs(x, None, wq, w_scale, bias, x.dtype, weight_only=True)
    acc = (x.double() @ wq.double().T).float()
    return _finish(acc * w_scale[None, :], bias, x.dtype)


@triton.jit
def row_scales(x_tile, m_ok, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """token_scale(max_k |x[m, k]|) [BLOCK_M] fp32 of a tile's rows of float x (x_tile: pointers to its first
    [BLOCK_M, BLOCK_K] block), a first pass over the rows' K in BLOCK_K steps (rows past M: 0, scale 1)."""
    offs_k = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_tile + k0, mask=m_ok[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(a), axis=1).to(tl.float32))
    return token_scale(amax)


@triton.jit
def _fp8_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_wn,
                stride_ym, k_per_split, splits, HAS_BIAS: tl.constexpr, WEIGHT_ONLY: tl.constexpr,
                QUANT_X: tl.constexpr, SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    offs_m, offs_n, m_ok, n_ok = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    x_tile = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_tile = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] of wq^T
    if QUANT_X:
        xs = row_scales(x_tile, m_ok, K, BLOCK_M, BLOCK_K)
        xs_m, xs_r, xs_p = divisor(xs)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start, k_end = k_range(K, k_per_split, tl.program_id(1), SPLIT)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(x_tile + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_tile + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if WEIGHT_ONLY:
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        elif QUANT_X:
            a = divide(a.to(tl.float32), xs_m[:, None], xs_r[:, None], xs_p[:, None])
            acc = tl.dot(e4m3_codes(a), b, acc)
        else:
            acc = tl.dot(a, b, acc)
    last = True
    if SPLIT:  # the fp32 partials summed in split order, then one epilogue
        acc, last = split_k_sum(acc, offs_m, offs_n, M, N, part_ptr, count_ptr, pid, tl.program_id(1), splits)
    if last:
        ws = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
        if QUANT_X:
            acc = acc * xs[:, None]
        elif not WEIGHT_ONLY:
            acc = acc * tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
        store_output(acc * ws[None, :], bias_ptr, y_ptr, offs_m, offs_n, m_ok, n_ok, stride_ym, HAS_BIAS)


def launch(config, mode, x, x_scale, wq, w_scale, bias, out_dtype) -> torch.Tensor:
    """One launch with config (inputs checked and contiguous). mode "w8a8": x the e4m3 codes, x_scale their row
    scales; "w8a16": x float, x_scale None; "fused": x float, quantized per token in the kernel, x_scale None."""
    m, k = x.shape
    n = wq.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    weight_only = mode == "w8a16"
    dot = dot_args(x.dtype) if weight_only else dict(DOT_DTYPE=tl.float32, PRECISION="ieee")  # unused for fp8
    tiles = triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"])
    per_split, splits, part, counters = split_args(config, k, config["BLOCK_K"], m, n, tiles, y)
    _fp8_kernel[(tiles, splits)](
        x, w_scale if x_scale is None else x_scale, wq, w_scale, bias if bias is not None else y, y, part, counters,
        m, n, k, x.stride(0), wq.stride(0), y.stride(0), per_split, splits, HAS_BIAS=bias is not None,
        WEIGHT_ONLY=weight_only, QUANT_X=mode == "fused", SPLIT=splits > 1, **dot, BLOCK_M=config["BLOCK_M"],
        BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return y


def _run(x, x_scale, wq, w_scale, bias, out_dtype):
    check_device(dict(x=x, x_scale=x_scale, wq=wq, w_scale=w_scale, bias=bias))
    check_fp8_device(x.device)
    m, n = x.shape[0], wq.shape[0]
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=out_dtype, device=x.device)
    mode = "w8a16" if x_scale is None else "w8a8"
    args = [t.contiguous() if t is not None else None for t in (x, x_scale, wq, w_scale, bias)]
    key = dict(M=next_power_of_2(m), N=n, K=x.shape[1], out=str(out_dtype).removeprefix("torch."),
               bias=int(bias is not None), mode=mode)
    config = tune("fp8_matmul", key, configs(key["M"], n=n, k=key["K"]), lambda c: launch(c, mode, *args, out_dtype),
                  x.device)
    return launch(config, mode, *args, out_dtype)


def fp8_matmul(xq, x_scale, wq, w_scale, *, bias=None, out_dtype=torch.float16):
    check_gemm_inputs(xq, x_scale, wq, w_scale, bias, out_dtype)
    return _run(xq, x_scale, wq, w_scale, bias, out_dtype)


def fp8_weight_only_matmul(x, wq, w_scale, *, bias=None):
    check_gemm_inputs(x, None, wq, w_scale, bias, x.dtype, weight_only=True)
    return _run(x, None, wq, w_scale, bias, x.dtype)


TWO_LAUNCH = dict(path="two_launch")
# the fused kernel's candidates go up to this M (a power of two): past it the x tiles that every one of the N / BLOCK_N
# programs quantizes again (BLOCK_M rows of 16 or more: 2x the ALU work at M = 32) cost more than the separate launch
FUSED_MAX_M = 16


def linear_configs(m: int, static: bool, n: int | None = None, k: int | None = None) -> list[dict]:
    """fp8_linear's candidates for batch m (a power of two): "two_launch" first (the untuned default), then for
    per-token scales up to FUSED_MAX_M "fused" at each GEMM tile of configs(m, n=n, k=k) with BLOCK_M 16 (a taller
    tile only quantizes more padding rows), split-K tiles included. The interpreter runs one: fused where it is a
    candidate."""
    fused = ([dict(path="fused", **c) for c in configs(m, n=n, k=k) if c["BLOCK_M"] == 16]
             if m <= FUSED_MAX_M and not static else [])
    if interpreter_on():
        return fused[:1] or [TWO_LAUNCH]
    return [TWO_LAUNCH] + fused


def run_path(config, x, scale, wq, w_scale, bias) -> torch.Tensor:
    """fp8_linear by config's path (inputs checked and contiguous): "two_launch" is quantize_fp8 then fp8_matmul
    (tuned under its own key), "fused" one launch of _fp8_kernel with QUANT_X at config's tile."""
    if config["path"] == "fused":  # per-token scales only (linear_configs)
        return launch(config, "fused", x, None, wq, w_scale, bias, x.dtype)
    xq, x_scale = quantize_fp8(x, scale=scale)
    return fp8_matmul(xq, x_scale, wq, w_scale, bias=bias, out_dtype=x.dtype)


def fp8_linear(x, wq, w_scale, *, scale=None, bias=None):
    """FP8Linear's W8A8 forward: fp8_matmul(*quantize_fp8(x, scale=scale), wq, w_scale, bias=bias,
    out_dtype=x.dtype), by the path the tuner picks (linear_config): the two launches, or at small M the fused kernel,
    whose output equals theirs at the same tile."""
    check_gemm_inputs(x, None, wq, w_scale, bias, x.dtype, weight_only=True)
    check_activations(x, scale)
    check_device(dict(x=x, scale=scale, wq=wq, w_scale=w_scale, bias=bias))
    check_fp8_device(x.device)
    m, n = x.shape[0], wq.shape[0]
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    args = [t.contiguous() if t is not None else None for t in (x, scale, wq, w_scale, bias)]
    return run_path(linear_config(*args), *args)


def linear_config(x, scale, wq, w_scale, bias) -> dict:
    """fp8_linear's candidate for these inputs (checked, contiguous), tuned once per GPU and key (M rounded up to a
    power of two, N, K, dtype, bias, static)."""
    args = (x, scale, wq, w_scale, bias)
    key = dict(M=next_power_of_2(x.shape[0]), N=wq.shape[0], K=x.shape[1], dtype=str(x.dtype).removeprefix("torch."),
               bias=int(bias is not None), static=int(scale is not None))
    return tune("fp8_linear", key, linear_configs(key["M"], scale is not None, key["N"], key["K"]),
                lambda c: run_path(c, *args), x.device)

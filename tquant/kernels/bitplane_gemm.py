"""Bit-plane GEMM (ABQ-LLM's arbitrary-bit WpAq): p-bit weights stored as p binary planes, q-bit asymmetric
activations, int8 tensor-core dots with int32 accumulation per group and a dequantizing epilogue; and the A16 path
(WpA16: the same planes dequantized to fp16 / bf16 / fp32 for a float tl.dot).

Format (p = bits in 2..8, q = act_bits in 2..8, G = K // group_size, g = k // group_size):
    weights      unsigned codes c[n, k] in [0, 2^p), asymmetric with a per-group float scale and integer zero:
                 w[n, k] ~= w_scale[g, n] * (c[n, k] - w_zero[g, n])
                 (group_size divides K and is a multiple of 32, or equals K: one group per channel)
    planes       int32 [p, ceil(K / 32), N]: plane i holds bit i of every code, packed by tquant/packing.py's 1-bit
                 layout: bit k % 32 of planes[i, k // 32, n] = (c[n, k] >> i) & 1 (pack_planes); bits past K are 0
    w_scale      fp32 [G, N]        w_zero int32 [G, N] in [0, 2^p)
    activations  per-token asymmetric codes a[m, k] in [0, 2^q): x[m, k] ~= x_scale[m] * (a[m, k] - x_zero[m])
    xq           int8 [M, K] holding a' = a - 2^(q-1) (centered, so every q <= 8 fits int8)
    x_scale      fp32 [M]           x_zero int32 [M] in [0, 2^q)
    bias         fp16 / bf16 / fp32 [N] or None, added in fp32
    y[m, n]      = x_scale[m] * sum_g w_scale[g, n] * S[m, g, n] (+ bias[n]), fp32 math, stored in out_dtype
                   (fp16 / bf16 / fp32), where
    S[m, g, n]   = sum_{k in g} (a[m, k] - x_zero[m]) * (c[n, k] - w_zero[g, n])   (an exact integer)
The kernel computes S from int8 products and the zero points by the row / column-sum identity: with any integer
centre C of the weight codes, c' = c - C, a' = a - 2^(q-1), dx[m] = 2^(q-1) - x_zero[m], dw[g, n] = C - w_zero[g, n]
(so a - x_zero = a' + dx, c - w_zero = c' + dw):
    S = sum_{k in g} a' c'  +  dw * sum_{k in g} a'  +  dx * sum_{k in g} c'  +  |g| * dx * dw
Two variants, chosen by the config's "variant" (the constexpr PLANES), compute sum a' c':
    "rebuild"  C = 2^(p-1): per K step the p plane words of a [BLOCK_N, BLOCK_K / 32] tile are loaded, their bits
               split out in registers (tiling.unpack_words) and summed into c = sum_i bit_i << i, centred to
               c' = c - 2^(p-1) in [-2^(p-1), 2^(p-1)) (an int8 for every p <= 8), and one int8 tl.dot(a', c')
               adds to the int32 accumulator.
    "planes"   C = 0 (c' = c, dw = -w_zero): one int8 tl.dot per plane of the activations (kept whole) with the
               binary plane tile u_i (0 / 1 as int8): sum_k a' c = sum_i 2^i sum_k a' u_i, so the accumulator adds
               (a' . u_i) << i; sum_k c = sum_i 2^i sum_k u_i (ABQ-LLM's bit-plane product, p dots a step).
sum a' (per row) and sum c' (per column) come from the same tiles; xq is loaded as 0 past K (a' = 0 adds nothing to
sum a' c' or sum a'), and bits past K in the last word are masked to 0 (c = 0), so sum c over the tile is the sum
over k < K, and sum c' = sum c - C * |g| with |g| the number of k < K counted (the centred value of a padded code
is -C, not 0). Every term's magnitude is at most 128 * 255 a k, so the four partial sums of a span of at most
MAX_SPAN = 16384 k are exact in int32 with no wrap-around (4 * 128 * 255 * 16384 < 2^31); a group longer than that
(per-channel K > 16384) is walked in spans of MAX_SPAN, each converted to fp32 on its own (one rounding a span).

`bitplane_matmul`: program pid owns a [BLOCK_M, BLOCK_N] tile of y (GROUP_M-grouped order) and walks the groups;
each group in spans, each span in BLOCK_K steps (BLOCK_K divides group_size when there are several groups, so a step
never straddles groups; K not a multiple of 32 or of BLOCK_K is masked). At each span's end S (int32) is converted
and multiplied by w_scale[g, n] into the fp32 accumulator; the epilogue multiplies x_scale[m], adds bias and casts.
The variant and tile are tuned per GPU and key (M rounded up to a power of two, N, K, p, q, group_size, out dtype,
bias) by autotune_cache; the interpreter runs one fixed small config (INTERPRETER_CONFIGS holds one per variant).
The kernel does not check the codes' ranges (that would sync the GPU); bitplane_matmul_ref does.
`bitplane_matmul_ref` is plain torch: S summed exactly in fp64 (integers below 2^53) per group, then the epilogue in
fp64. The activations come from tquant.kernels.act_quant.quantize_activations(x, bits=q, zero_point=True) (or its
_ref); `quantize_weight_ref` makes (planes, w_scale, w_zero) per group through tquant.quantizer (asymmetric min-max
with an integer zero), the same grid.

A16 (WpA16, e.g. W2A16 / W3A16 / W4A16 with groups), the same planes, w_scale and w_zero:
    y[m, n] = sum_k x[m, k] * w16[n, k] (+ bias[n]),  w16[n, k] = dtype(w_scale[g, n] * (c[n, k] - w_zero[g, n]))
    x [M, K] fp16 / bf16 / fp32;  bias [N] in x's dtype or None;  y [M, N] in x's dtype
`bitplane_matmul_a16` rebuilds c from the planes in registers per [BLOCK_N, BLOCK_K] tile, dequantizes in fp32 and
rounds once to x's dtype, then tl.dot in x's dtype (runtime.dot_types) with fp32 accumulation. `..._a16_ref`
dequantizes the same way in torch and multiplies in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..packing import pack_codes
from ..quantizer import grouped_qparams, quantize
from .autotune_cache import tune
from .bcq_matmul import unpack_planes
from .runtime import check_device, check_tensors, dot_types, interpreter_on, next_power_of_2
from .tiling import store_output, tile_offsets, unpack_words

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BITS = range(2, 9)  # weight bits p and activation bits q
MAX_SPAN = 16384  # k summed in int32 before a conversion to fp32 (module docstring: no int32 overflow)
VARIANTS = ("rebuild", "planes")


# ---- format helpers (plain torch) ----

def check_bits(name: str, bits) -> None:
    if not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"{name}={bits} is not supported; use an integer in 2..8")


def pack_planes(codes: torch.Tensor, bits: int, checked: bool = True) -> torch.Tensor:
    """codes: integer [N, K] in [0, 2^bits) -> planes int32 [bits, ceil(K / 32), N] (plane i: bit i of every code,
    tquant.packing's 1-bit layout; bits past K are 0). checked=False skips the range check (it reads the codes back
    to the host, which a CUDA graph capture cannot)."""
    check_bits("bits", bits)
    if codes.dim() != 2 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be a 2-D integer tensor [N, K]; got {codes.dtype} of shape {tuple(codes.shape)}")
    if checked and codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit planes: expected values in [0, {2**bits})")
    codes = codes.to(torch.int32)
    return torch.stack([pack_codes((codes >> i) & 1, 1, checked=False) for i in range(bits)])


def unpack_codes_from_planes(planes: torch.Tensor, k: int) -> torch.Tensor:
    """codes int32 [N, K] of planes int32 [p, ceil(K / 32), N]: sum_i bit_i << i (bcq_matmul.unpack_planes)."""
    bits = unpack_planes(planes, k).to(torch.int32)  # [p, N, K]
    shifts = torch.arange(planes.shape[0], dtype=torch.int32, device=planes.device)[:, None, None]
    return (bits << shifts).sum(dim=0, dtype=torch.int32)


def quantize_weight_ref(w: torch.Tensor, bits: int, group_size: int):
    """Per-group asymmetric min-max codes of a float weight w [N, K] (tquant.quantizer, sym=False), in this format:
    (planes int32 [bits, ceil(K / 32), N], w_scale fp32 [G, N], w_zero int32 [G, N])."""
    check_bits("bits", bits)
    n, k = w.shape
    check_group_size(group_size, k)
    scale, zero = grouped_qparams(w, bits, group_size, sym=False)  # [N, G]
    codes = quantize(w.reshape(n, k // group_size, group_size), scale[..., None], zero[..., None], bits)
    return pack_planes(codes.reshape(n, k), bits), scale.t().contiguous().float(), zero.t().to(torch.int32).contiguous()


# ---- input checks ----

def check_group_size(group_size, k: int) -> None:
    if not isinstance(group_size, int) or group_size < 1 or k % group_size:
        raise ValueError(f"group_size={group_size} must be a positive integer dividing K={k}")
    if group_size != k and group_size % 32:
        raise ValueError(f"group_size={group_size} must be a multiple of 32 or equal K={k} (one group per channel)")


def check_weight(planes, w_scale, w_zero, bits, group_size, k, n_context: str) -> int:
    """Checks shared by both paths; returns N."""
    check_bits("bits", bits)
    if k < 1:
        raise ValueError(f"{n_context} must have at least one column (K >= 1)")
    check_group_size(group_size, k)
    if planes.dim() != 3 or planes.dtype != torch.int32:
        raise ValueError(f"planes must be a 3-D int32 tensor [bits, ceil(K / 32), N]; got {planes.dtype} of shape "
                         f"{tuple(planes.shape)}")
    if planes.shape[0] != bits:
        raise ValueError(f"planes holds {planes.shape[0]} planes but bits={bits}: expected planes.shape[0] == bits")
    if planes.shape[1] != -(-k // 32):
        raise ValueError(f"planes shape {tuple(planes.shape)} does not match: expected [bits, ceil(K / 32), N] = "
                         f"[{bits}, {-(-k // 32)}, N] for K={k}")
    n = planes.shape[2]
    expected = {"w_scale": (w_scale, (k // group_size, n), (torch.float32,)),
                "w_zero": (w_zero, (k // group_size, n), (torch.int32,))}
    check_tensors(expected, f"N={n}, K={k}, group_size={group_size}")
    return n


def check_inputs(xq, x_scale, x_zero, planes, w_scale, w_zero, bits, act_bits, group_size, bias, out_dtype) -> None:
    """Raise ValueError naming the first argument whose value, dtype or shape is wrong (the format above)."""
    check_bits("act_bits", act_bits)
    if out_dtype not in DTYPES:
        raise ValueError(f"out_dtype {out_dtype} is not supported; use one of {DTYPES}")
    if xq.dim() != 2 or xq.dtype != torch.int8:
        raise ValueError(f"xq must be a 2-D int8 tensor [M, K]; got {xq.dtype} of shape {tuple(xq.shape)}")
    m, k = xq.shape
    n = check_weight(planes, w_scale, w_zero, bits, group_size, k, "xq")
    expected = {"x_scale": (x_scale, (m,), (torch.float32,)), "x_zero": (x_zero, (m,), (torch.int32,)),
                "bias": (bias, (n,), DTYPES)}
    check_tensors(expected, f"M={m}, N={n}, K={k}")


def check_a16_inputs(x, planes, w_scale, w_zero, bits, group_size, bias) -> None:
    if x.dim() != 2 or x.dtype not in DTYPES:
        raise ValueError(f"x must be a 2-D fp16 / bf16 / fp32 tensor [M, K]; got {x.dtype} of shape {tuple(x.shape)}")
    m, k = x.shape
    n = check_weight(planes, w_scale, w_zero, bits, group_size, k, "x")
    check_tensors({"bias": (bias, (n,), (x.dtype,))}, f"x of {x.dtype}, N={n}")


def check_ranges(name: str, t: torch.Tensor, lo: int, hi: int) -> None:
    if t.numel() and (int(t.min()) < lo or int(t.max()) >= hi):
        raise ValueError(f"{name} out of range: expected values in [{lo}, {hi})")


# ---- torch references ----

def bitplane_matmul_ref(xq, x_scale, x_zero, planes, w_scale, w_zero, *, bits, act_bits, group_size, bias=None,
                        out_dtype=torch.float16):
    """y of the module docstring in plain torch: S exact per group (fp64 sums of integers), then the epilogue in fp64.
    Also checks the codes' ranges (the kernel does not)."""
    check_inputs(xq, x_scale, x_zero, planes, w_scale, w_zero, bits, act_bits, group_size, bias, out_dtype)
    check_ranges("xq", xq, -(2 ** (act_bits - 1)), 2 ** (act_bits - 1))
    check_ranges("x_zero", x_zero, 0, 2**act_bits)
    check_ranges("w_zero", w_zero, 0, 2**bits)
    (m, k), n = xq.shape, planes.shape[2]
    groups = k // group_size
    a = (xq.double() + 2 ** (act_bits - 1) - x_zero.double()[:, None]).reshape(m, groups, group_size)
    c = unpack_codes_from_planes(planes, k).double().reshape(n, groups, group_size) - w_zero.double().t()[..., None]
    s = torch.einsum("mgk,ngk->mgn", a, c)  # [M, G, N], exact: |S| < 2^16 K
    y = (s * w_scale.double()[None]).sum(dim=1) * x_scale.double()[:, None]
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype)


def dequantize_a16(planes, w_scale, w_zero, group_size, k, dtype) -> torch.Tensor:
    """w16 [N, K] = dtype(w_scale * (c - w_zero)) (computed in fp32, rounded once to dtype)."""
    c = unpack_codes_from_planes(planes, k)
    g = torch.arange(k, device=planes.device) // group_size
    return ((c - w_zero.t()[:, g]).float() * w_scale.t()[:, g]).to(dtype)


def bitplane_matmul_a16_ref(x, planes, w_scale, w_zero, *, bits, group_size, bias=None):
    check_a16_inputs(x, planes, w_scale, w_zero, bits, group_size, bias)
    check_ranges("w_zero", w_zero, 0, 2**bits)
    y = x.float() @ dequantize_a16(planes, w_scale, w_zero, group_size, x.shape[1], x.dtype).float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---- Triton kernels ----

@triton.jit
def plane_bits(p_ptr, i, kw0, offs_n, n_ok, K, KW, N, BLOCK_KW: tl.constexpr, FULL_WORDS: tl.constexpr):
    """Bits (0 / 1, int32) [BLOCK_N, 32 * BLOCK_KW] of plane i's words kw0 .. kw0 + BLOCK_KW - 1 at columns offs_n:
    column 32 j + b holds bit b of word kw0 + j, i.e. k = 32 (kw0 + j) + b. Words past KW load as 0, and unless every
    word is full (K % 32 == 0) the bits of k >= K are cleared."""
    w = kw0 + tl.arange(0, BLOCK_KW)
    words = tl.load(p_ptr + (i * KW + w)[None, :].to(tl.int64) * N + offs_n[:, None],
                    mask=n_ok[:, None] & (w < KW)[None, :], other=0)
    if not FULL_WORDS:
        valid = tl.minimum(tl.maximum(K - 32 * w, 0), 32)  # bits of each word below K
        ones = tl.full([BLOCK_KW], 1, tl.int32)
        words &= tl.where(valid >= 32, -1, (ones << tl.minimum(valid, 31)) - 1)[None, :]
    return unpack_words(words, 1)


@triton.jit
def plane_codes(p_ptr, kw0, offs_n, n_ok, K, KW, N, P: tl.constexpr, BLOCK_KW: tl.constexpr,
                FULL_WORDS: tl.constexpr):
    """Codes c = sum_i bit_i << i (int32) [BLOCK_N, 32 * BLOCK_KW], 0 past K."""
    c = plane_bits(p_ptr, 0, kw0, offs_n, n_ok, K, KW, N, BLOCK_KW, FULL_WORDS)
    for i in tl.static_range(1, P):
        c += plane_bits(p_ptr, i, kw0, offs_n, n_ok, K, KW, N, BLOCK_KW, FULL_WORDS) << i
    return c


@triton.jit
def _bitplane_kernel(x_ptr, xs_ptr, xz_ptr, p_ptr, ws_ptr, wz_ptr, bias_ptr, y_ptr, M, N, K, KW, GROUPS, group_size,
                     span, stride_xm, stride_ym, P: tl.constexpr, Q: tl.constexpr, CENTER: tl.constexpr,
                     PLANES: tl.constexpr, FULL_WORDS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    BLOCK_KW: tl.constexpr = BLOCK_K // 32
    pid = tl.program_id(0)
    offs_m, offs_n, m_ok, n_ok = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    dx = (1 << (Q - 1)) - tl.load(xz_ptr + offs_m, mask=m_ok, other=0)  # [BLOCK_M] int32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(0, GROUPS):
        dw = CENTER - tl.load(wz_ptr + g * N + offs_n, mask=n_ok, other=0)  # [BLOCK_N] int32
        ws = tl.load(ws_ptr + g * N + offs_n, mask=n_ok, other=0.0)
        g_end = tl.minimum((g + 1) * group_size, K)
        for s0 in range(g * group_size, g_end, span):
            s_end = tl.minimum(s0 + span, g_end)
            dot = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)  # sum a' c'
            sum_a = tl.zeros([BLOCK_M], dtype=tl.int32)  # sum a'
            sum_c = tl.zeros([BLOCK_N], dtype=tl.int32)  # sum c (uncentred, 0 past K)
            for k0 in range(s0, s_end, BLOCK_K):
                k = k0 + offs_k
                a = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0)  # a', 0 past K
                sum_a += tl.sum(a.to(tl.int32), axis=1)
                if PLANES:
                    for i in tl.static_range(P):
                        u = plane_bits(p_ptr, i, k0 // 32, offs_n, n_ok, K, KW, N, BLOCK_KW, FULL_WORDS)
                        sum_c += tl.sum(u, axis=1) << i
                        dot += tl.dot(a, tl.trans(u.to(tl.int8)), out_dtype=tl.int32) << i
                else:
                    c = plane_codes(p_ptr, k0 // 32, offs_n, n_ok, K, KW, N, P, BLOCK_KW, FULL_WORDS)
                    sum_c += tl.sum(c, axis=1)
                    dot = tl.dot(a, tl.trans((c - CENTER).to(tl.int8)), dot, out_dtype=tl.int32)
            count = s_end - s0  # k < K in the span
            s = (dot + dw[None, :] * sum_a[:, None] + dx[:, None] * (sum_c - CENTER * count)[None, :]
                 + count * (dx[:, None] * dw[None, :]))
            acc += s.to(tl.float32) * ws[None, :]
    store_output(acc * tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)[:, None], bias_ptr, y_ptr, offs_m, offs_n,
                 m_ok, n_ok, stride_ym, HAS_BIAS)


@triton.jit
def _bitplane_a16_kernel(x_ptr, p_ptr, ws_ptr, wz_ptr, bias_ptr, y_ptr, M, N, K, KW, group_size, stride_xm,
                         stride_ym, P: tl.constexpr, FULL_WORDS: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    BLOCK_KW: tl.constexpr = BLOCK_K // 32
    pid = tl.program_id(0)
    offs_m, offs_n, m_ok, n_ok = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # a step lies in one group (BLOCK_K divides group_size, or one group)
        k = k0 + offs_k
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
        c = plane_codes(p_ptr, k0 // 32, offs_n, n_ok, K, KW, N, P, BLOCK_KW, FULL_WORDS)
        at = (k0 // group_size) * N + offs_n
        z = tl.load(wz_ptr + at, mask=n_ok, other=0)
        s = tl.load(ws_ptr + at, mask=n_ok, other=0.0)
        w = ((c - z[:, None]).to(tl.float32) * s[:, None]).to(x_ptr.dtype.element_ty)  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    store_output(acc, bias_ptr, y_ptr, offs_m, offs_n, m_ok, n_ok, stride_ym, HAS_BIAS)


# ---- configs and launchers ----

INTERPRETER_CONFIGS = {v: dict(variant=v, BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
                       for v in VARIANTS}
A16_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
SMALL_M_TILES = [(16, 64, 4), (16, 128, 4), (32, 64, 4)]  # (BLOCK_M, BLOCK_N, warps), batch <= 32
# two accumulators (the span's int32 and the fp32 sum) and the code tiles: 8 warps from 64 x 128 on (sm_90, p = 4
# and 8, BLOCK_K 64 / 128: no spills at 64 x 128 and 64 x 64, some at 128 x 64 and 128 x 128)
LARGE_M_TILES = [(64, 128, 8), (128, 64, 8), (64, 64, 4), (128, 128, 8)]


def block_ks(k: int, group_size: int) -> list[int]:
    """BLOCK_K candidates: the two largest of 128 / 64 / 32 dividing group_size (any with one group per channel)."""
    return [bk for bk in (128, 64, 32) if group_size == k or group_size % bk == 0][:2]


def tiles(m: int, k: int, group_size: int) -> list[dict]:
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
            for bm, bn, warps in (SMALL_M_TILES if m <= 32 else LARGE_M_TILES) for bk in block_ks(k, group_size)
            for stages in (3, 4)]


def configs(m: int, k: int, group_size: int) -> list[dict]:
    """Candidates for batch m (rounded up to a power of two), K = k and group_size; the first is the untuned default
    ("rebuild"). Both variants on a GPU; the interpreter runs INTERPRETER_CONFIGS["rebuild"] (tests launch the
    "planes" one themselves)."""
    if interpreter_on():
        return [INTERPRETER_CONFIGS["rebuild"]]
    return [dict(variant=v, **t) for v in VARIANTS for t in tiles(m, k, group_size)]


def a16_configs(m: int, k: int, group_size: int) -> list[dict]:
    return [A16_INTERPRETER_CONFIG] if interpreter_on() else tiles(m, k, group_size)


def check_config(config, k: int, group_size: int) -> None:
    if config["BLOCK_K"] % 32 or (group_size != k and group_size % config["BLOCK_K"]):
        raise ValueError(f"BLOCK_K={config['BLOCK_K']} must be a multiple of 32 dividing group_size={group_size} "
                         f"(K={k} has several groups)")


def launch(config, xq, x_scale, x_zero, planes, w_scale, w_zero, bits, act_bits, group_size, bias,
           out_dtype) -> torch.Tensor:
    """One launch of the WpAq kernel with config (inputs checked and contiguous)."""
    (m, k), n = xq.shape, planes.shape[2]
    check_config(config, k, group_size)
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    planes_variant = config["variant"] == "planes"
    _bitplane_kernel[grid](
        xq, x_scale, x_zero, planes, w_scale, w_zero, bias if bias is not None else y, y, m, n, k, planes.shape[1],
        k // group_size, group_size, min(group_size, MAX_SPAN), xq.stride(0), y.stride(0), P=bits, Q=act_bits,
        CENTER=0 if planes_variant else 2 ** (bits - 1), PLANES=planes_variant, FULL_WORDS=k % 32 == 0,
        HAS_BIAS=bias is not None, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        GROUP_M=config["GROUP_M"], num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return y


def bitplane_matmul(xq, x_scale, x_zero, planes, w_scale, w_zero, *, bits, act_bits, group_size, bias=None,
                    out_dtype=torch.float16):
    """y [M, N] of the module docstring: WpAq with p = bits, q = act_bits, on the Triton kernel."""
    check_inputs(xq, x_scale, x_zero, planes, w_scale, w_zero, bits, act_bits, group_size, bias, out_dtype)
    check_device(dict(xq=xq, x_scale=x_scale, x_zero=x_zero, planes=planes, w_scale=w_scale, w_zero=w_zero,
                      bias=bias))
    (m, k), n = xq.shape, planes.shape[2]
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=out_dtype, device=xq.device)
    tensors = [t.contiguous() if t is not None else None for t in (xq, x_scale, x_zero, planes, w_scale, w_zero, bias)]
    args = (*tensors[:6], bits, act_bits, group_size, tensors[6], out_dtype)
    key = dict(M=next_power_of_2(m), N=n, K=k, p=bits, q=act_bits, g=group_size,
               out=str(out_dtype).removeprefix("torch."), bias=int(bias is not None))
    config = tune("bitplane_matmul", key, configs(key["M"], k, group_size), lambda c: launch(c, *args), xq.device)
    return launch(config, *args)


def launch_a16(config, x, planes, w_scale, w_zero, bits, group_size, bias) -> torch.Tensor:
    """One launch of the A16 kernel with config (inputs checked and contiguous)."""
    (m, k), n = x.shape, planes.shape[2]
    check_config(config, k, group_size)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    dot_dtype, precision = dot_types(x.dtype)
    _bitplane_a16_kernel[grid](
        x, planes, w_scale, w_zero, bias if bias is not None else y, y, m, n, k, planes.shape[1], group_size,
        x.stride(0), y.stride(0), P=bits, FULL_WORDS=k % 32 == 0, HAS_BIAS=bias is not None,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"],
        DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return y


def bitplane_matmul_a16(x, planes, w_scale, w_zero, *, bits, group_size, bias=None):
    """y [M, N] = x @ w16^T (+ bias) in x's dtype: WpA16 on the same planes (module docstring)."""
    check_a16_inputs(x, planes, w_scale, w_zero, bits, group_size, bias)
    check_device(dict(x=x, planes=planes, w_scale=w_scale, w_zero=w_zero, bias=bias))
    (m, k), n = x.shape, planes.shape[2]
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    args = (*[t.contiguous() for t in (x, planes, w_scale, w_zero)], bits, group_size,
            bias.contiguous() if bias is not None else None)
    key = dict(M=next_power_of_2(m), N=n, K=k, p=bits, g=group_size, dtype=str(x.dtype).removeprefix("torch."),
               bias=int(bias is not None))
    config = tune("bitplane_matmul_a16", key, a16_configs(key["M"], k, group_size), lambda c: launch_a16(c, *args),
                  x.device)
    return launch_a16(config, *args)


__all__ = ["bitplane_matmul", "bitplane_matmul_ref", "bitplane_matmul_a16", "bitplane_matmul_a16_ref", "pack_planes",
           "unpack_codes_from_planes", "quantize_weight_ref"]

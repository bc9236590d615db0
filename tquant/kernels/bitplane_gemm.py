"""Bit-plane GEMM (ABQ-LLM's arbitrary-bit WpAq): p-bit weights stored as p binary planes, q-bit asymmetric
activations, int8 tensor-core dots with int32 accumulation per group and a dequantizing epilogue; and the A16 path
(WpA16: the same planes dequantized to fp16 / bf16 / fp32 for a float tl.dot).

Format (p = bits in 2..8, q = act_bits in 2..8, G = K // group_size, g = k // group_size):
    weights      unsigned codes c[n, k] in [0, 2^p), asymmetric with a per-group float scale and integer zero:
                 w[n, k] ~= w_scale[g, n] * (c[n, k] - w_zero[g, n])
                 (group_size divides K and is a multiple of 32, or equals K: one group per channel)
    planes       int32 [p, ceil(K / 32), N]: plane i holds bit i of every code in tquant.formats.packing.pack_planes' byte-SWAR
                 order: bit j of planes[i, w, n] = (c[n, 32 w + 4 (j % 8) + j // 8] >> i) & 1; bits past K are 0
    w_scale      fp32 [G, N]        w_zero uint8 [G, N] in [0, 2^p)
    w_sum        int32 [G, N]: sum_{k in g} c[n, k] (code_sums), stored with the weight so no kernel reduces codes
    activations  per-token asymmetric codes a[m, k] in [0, 2^q): x[m, k] ~= x_scale[m] * (a[m, k] - x_zero[m])
    xq           int8 [M, K] holding a' = a - 2^(q-1) (centered, so every q <= 8 fits int8)
    x_scale      fp32 [M]           x_zero int32 [M] in [0, 2^q)
    bias         fp16 / bf16 / fp32 [N] or None, added in fp32
    y[m, n]      = x_scale[m] * sum_g w_scale[g, n] * S[m, g, n] (+ bias[n]), fp32 math, stored in out_dtype
                   (fp16 / bf16 / fp32), where
    S[m, g, n]   = sum_{k in g} (a[m, k] - x_zero[m]) * (c[n, k] - w_zero[g, n])   (an exact integer)

Zero points by the row / column-sum identity. With dx[m] = 2^(q-1) - x_zero[m] (so a - x_zero = a' + dx) and an
integer centre Z[g, n] of the weight codes, c' = c - Z, dw = Z - w_zero (so c - w_zero = c' + dw):
    S = sum a' c' + dw * sum a' + dx * sum (c' + dw)
      = D + dw * A + dx * W,   D = sum_{k in g} a' c',  A[m, g] = sum_{k in g} a',  W[g, n] = w_sum - |g| * w_zero
W depends on the weight alone (w_sum is stored), so nothing in the K loop sums codes, and the dx term leaves the
groups' loop too: y = x_scale * (sum_g w_scale (D + dw A) + dx[m] * col[n]) with col = sum_g w_scale[g, n] W[g, n],
one [BLOCK_N] vector per group. Z is chosen so c' is an int8 (tl.dot's operand):
    "rebuild", p <= 7   Z = w_zero: c' in [-127, 127], dw = 0, so no A: the K loop is loads, decode and one dot.
    "rebuild", p = 8    Z = 128: c' in [-128, 127]; A is the one reduction left in the loop (of the activation
                        tile, [BLOCK_M] a step, not of the codes).
    "planes"            Z = 0 (c' = c, dw = -w_zero): one int8 dot per plane with the binary plane tile u_i (0 / 1):
                        D = sum_i 2^i (a' . u_i) (ABQ-LLM's bit-plane product, p dots a step); A is summed too.
Exactness: |a'| <= 128, |c'| <= 255 and |dw| <= 255, so D + dw A (and every partial sum of it, plane by plane) is
below 2 * 128 * 255 * n for n summed k: exact in int32 (no wrap-around) for spans of MAX_SPAN = 16384 k
(2 * 128 * 255 * 16384 < 2^31). A group longer than that (per-channel K > 16384) is walked in spans of MAX_SPAN,
each span's D + dw A converted to fp32 on its own; W is an int32 below 255 * |g| in magnitude (w_sum's own bound).
After the int32 sums the math is fp32: each conversion rounds once (exact below 2^24), then w_scale products, the
fp32 sums over spans and groups, acc + dx * col and x_scale, as in a float GEMM epilogue; with unit scales and
every partial sum an integer below 2^24 in magnitude, y is exact (the tests check it).

Decode (byte-SWAR; pack_planes' order puts k = 32 w + 4 s + b at bit 8 b + s of word w): per K step each plane's
words [BLOCK_N, BLOCK_K / 32] are loaded once (one coalesced load a plane), and
    v_s = OR_i ((w_i >> s) & 0x01010101) << i,   s = 0..7
holds in byte b the code c of k = 32 w + 4 s + b. "rebuild" adds (128 - Z) * 0x01010101 (p <= 7; no byte carries:
c - Z + 128 is in [1, 256)) and XORs 0x80808080, so byte b is c - Z as an int8; the four bytes come out as int8
((v >> 8 b).to(int8) truncates). Both steps are tl.join trees (s, then b, on trailing dims of size 2), reshaped to
[BLOCK_N, BLOCK_K] in k order, so every value stays in the registers of the thread that loaded its words
(tiling.unpack_words says why a reshape of broadcast shifts is slow). Per 4 weights: a shift and an and-or a plane
(ptxas fuses the rest), add and XOR, the byte packing: on sm_90 the whole K loop (loads, decode, shared-memory
staging of the dot operand, mma) is 2.7 / 4.1 / 6.7 instructions a weight for p = 2 / 4 / 8 at 16 x 64 x 128 (the
bit-by-bit unpack it replaces: 11.9 / 16.8 / 25.9; w4a8_gemm's int4 unpack: 3.9). "planes" takes plane i alone
(bytes 0 / 1, no centring). "dense" decodes once per call instead: _decode_kernel writes c' (rebuild's centre) as int8
[N, K] (decode_codes; a transient copy of N K bytes), and the K loop loads its [BLOCK_K, BLOCK_N] tiles as w8a8_gemm
loads its weight, so no row tile redoes the decode (the tuner offers it from M = DENSE_MIN_M). xq is loaded as 0
past K, so the codes there (whatever the bits past K) add nothing to D or A, and W comes from w_sum: no bit masks.

`launch` (the WpAq kernel; tquant.kernels.bitplane_matmul tunes it against bitplane_gemv): program pid owns a [BLOCK_M, BLOCK_N] tile of y (GROUP_M-grouped order) and walks the groups;
each group in spans, each span in BLOCK_K steps (BLOCK_K divides group_size when there are several groups, and
MAX_SPAN, so a step never straddles groups or spans; K not a multiple of 32 or of BLOCK_K is masked). SPLIT_K > 1
(small batches) splits K over grid axis 1, per channel in BLOCK_K steps (the first split adds the dx term), else in
whole groups: y is linear in the splits' sums, so each split's epilogue gives a partial y, and dequant_gemm's
store_output adds them in the same launch (fp32 workspace, the last split to arrive sums and stores). One group of
at most MAX_SPAN k (per channel, ONE_SPAN) keeps the span's int32 sum as the only accumulator in the K loop (no
fp32 one beside it: the registers that let 128 x 128 tiles run without spills). The variant and tile are tuned per
GPU and key (M rounded up to a power of two, N, K, p, q, group_size, out dtype, bias) by autotune_cache; the
interpreter runs interpreter_tile.
The kernel does not check the codes' ranges or w_sum (that would sync the GPU); bitplane_matmul_ref does.
`bitplane_matmul_ref` is plain torch: S summed exactly in fp64 (integers below 2^53) per group, then the epilogue in
fp64. The activations come from tquant.kernels.act_quant.quantize_activations(x, bits=q, zero_point=True) (or its
_ref); `quantize_weight_ref` makes (planes, w_scale, w_zero, w_sum) per group through tquant.formats.quantizer (asymmetric
min-max with an integer zero), the same grid.

A16 (WpA16, e.g. W2A16 / W3A16 / W4A16 with groups), the same planes, w_scale and w_zero (no w_sum):
    y[m, n] = sum_k x[m, k] * w16[n, k] (+ bias[n]),  w16[n, k] = dtype(w_scale[g, n] * (c[n, k] - w_zero[g, n]))
    x [M, K] fp16 / bf16 / fp32;  bias [N] in x's dtype or None;  y [M, N] in x's dtype
`bitplane_matmul_a16` decodes c - Z per [BLOCK_N, BLOCK_K] tile as "rebuild" does (a step lies in one group), adds
Z - w_zero (p = 8 only) and multiplies by w_scale in fp32, rounds once to x's dtype, then tl.dot in x's dtype
(runtime.dot_args) with fp32 accumulation; x is 0 past K. `..._a16_ref` dequantizes the same way in torch and
multiplies in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.packing import pack_planes, unpack_planes
from ..formats.quantizer import grouped_qparams, quantize
from .autotune_cache import tune
from .runtime import DTYPES, check_device, check_tensors, dot_args, interpreter_on, next_power_of_2
from .dequant_gemm import k_range, split_args
from .dequant_gemm import store_output as split_output
from .tiling import store_output, tile_offsets

BITS = range(2, 9)  # weight bits p and activation bits q
MAX_SPAN = 16384  # k summed in int32 before a conversion to fp32 (module docstring: no int32 overflow)
XOR80 = tl.constexpr(0x80808080 - 2**32)  # as an int32: flips bit 7 of every byte
VARIANTS = ("rebuild", "planes", "dense")
DENSE_MIN_M = 256  # batches (rounded up to a power of two) from which "dense" joins the candidates


# ---- format helpers (plain torch) ----

def check_bits(name: str, bits) -> None:
    if not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"{name}={bits} is not supported; use an integer in 2..8")


def group_sums(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """w_sum int32 [G, N]: sum over k in each group of the (uncentred) codes [N, K]."""
    n, k = codes.shape
    return codes.view(n, k // group_size, group_size).sum(dim=-1, dtype=torch.int32).t().contiguous()


def code_sums(planes: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """group_sums of the codes held by planes [p, ceil(K / 32), N]."""
    return group_sums(unpack_planes(planes, k), group_size)


def weight_tensors(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int):
    """This format of asymmetric codes [N, K] with scale and integer zero [N, G] (the quantizer's layout):
    (planes int32 [bits, ceil(K / 32), N], w_scale fp32 [G, N], w_zero uint8 [G, N], w_sum int32 [G, N])."""
    codes = codes.to(torch.int32)
    return (pack_planes(codes, bits), scale.t().float().contiguous(), zero.t().round().to(torch.uint8).contiguous(),
            group_sums(codes, group_size))


def quantize_weight_ref(w: torch.Tensor, bits: int, group_size: int):
    """Per-group asymmetric min-max codes of a float weight w [N, K] (tquant.formats.quantizer, sym=False), in this format
    (weight_tensors)."""
    check_bits("bits", bits)
    n, k = w.shape
    check_group_size(group_size, k)
    scale, zero = grouped_qparams(w, bits, group_size, sym=False)  # [N, G]
    codes = quantize(w.reshape(n, k // group_size, group_size), scale[..., None], zero[..., None], bits)
    return weight_tensors(codes.reshape(n, k), scale, zero, bits, group_size)


# ---- input checks ----

def check_group_size(group_size, k: int) -> None:
    if not isinstance(group_size, int) or group_size < 1 or k % group_size:
        raise ValueError(f"group_size={group_size} must be a positive integer dividing K={k}")
    if group_size != k and group_size % 32:
        raise ValueError(f"group_size={group_size} must be a multiple of 32 or equal K={k} (one group per channel)")


def check_weight(planes, w_scale, w_zero, bits, group_size, k, n_context: str, w_sum=None) -> int:
    """Checks shared by both paths (w_sum: the WpAq path's); returns N."""
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
                "w_zero": (w_zero, (k // group_size, n), (torch.uint8,))}
    if w_sum is not None:
        expected["w_sum"] = (w_sum, (k // group_size, n), (torch.int32,))
    check_tensors(expected, f"N={n}, K={k}, group_size={group_size}")
    return n


def check_inputs(xq, x_scale, x_zero, planes, w_scale, w_zero, w_sum, bits, act_bits, group_size, bias,
                 out_dtype) -> None:
    """Raise ValueError naming the first argument whose value, dtype or shape is wrong (the format above)."""
    check_bits("act_bits", act_bits)
    if out_dtype not in DTYPES:
        raise ValueError(f"out_dtype {out_dtype} is not supported; use one of {DTYPES}")
    if xq.dim() != 2 or xq.dtype != torch.int8:
        raise ValueError(f"xq must be a 2-D int8 tensor [M, K]; got {xq.dtype} of shape {tuple(xq.shape)}")
    m, k = xq.shape
    if w_sum is None:
        raise ValueError("w_sum is required: int32 [K // group_size, N], the codes' sums per group (code_sums)")
    n = check_weight(planes, w_scale, w_zero, bits, group_size, k, "xq", w_sum)
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

def bitplane_matmul_ref(xq, x_scale, x_zero, planes, w_scale, w_zero, w_sum, *, bits, act_bits, group_size,
                        bias=None, out_dtype=torch.float16):
    """y of the module docstring in plain torch: S exact per group (fp64 sums of integers), then the epilogue in fp64.
    Also checks the codes' ranges and w_sum (the kernel does not)."""
    check_inputs(xq, x_scale, x_zero, planes, w_scale, w_zero, w_sum, bits, act_bits, group_size, bias, out_dtype)
    check_ranges("xq", xq, -(2 ** (act_bits - 1)), 2 ** (act_bits - 1))
    check_ranges("x_zero", x_zero, 0, 2**act_bits)
    check_ranges("w_zero", w_zero, 0, 2**bits)
    (m, k), n = xq.shape, planes.shape[2]
    groups = k // group_size
    a = (xq.double() + 2 ** (act_bits - 1) - x_zero.double()[:, None]).reshape(m, groups, group_size)
    codes = unpack_planes(planes, k)
    if not torch.equal(w_sum, group_sums(codes, group_size)):
        raise ValueError("w_sum does not match the planes: expected the codes' sums per group (code_sums)")
    c = codes.double().reshape(n, groups, group_size) - w_zero.double().t()[..., None]
    s = torch.einsum("mgk,ngk->mgn", a, c)  # [M, G, N], exact: |S| < 2^16 K
    y = (s * w_scale.double()[None]).sum(dim=1) * x_scale.double()[:, None]
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype)


def per_column(t: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """A per-group tensor [G, N] spread over the columns of its groups: [N, K]."""
    return t.t()[:, torch.arange(k, device=t.device) // group_size]


def dequantize_a16(planes, w_scale, w_zero, group_size, k, dtype) -> torch.Tensor:
    """w16 [N, K] = dtype(w_scale * (c - w_zero)) (computed in fp32, rounded once to dtype)."""
    c = unpack_planes(planes, k)
    return ((c - per_column(w_zero, group_size, k)).float() * per_column(w_scale, group_size, k)).to(dtype)


def bitplane_matmul_a16_ref(x, planes, w_scale, w_zero, *, bits, group_size, bias=None):
    check_a16_inputs(x, planes, w_scale, w_zero, bits, group_size, bias)
    check_ranges("w_zero", w_zero, 0, 2**bits)
    y = x.float() @ dequantize_a16(planes, w_scale, w_zero, group_size, x.shape[1], x.dtype).float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---- Triton kernels ----

@triton.jit
def spread_bits(w):
    """((w >> s) & 0x01010101) for s = 0..7, stacked on three trailing dims of size 2 (tl.join, lowest stride last):
    flattened, trailing index s holds in byte b the bit of k = 32 word + 4 s + b of plane words w (pack_planes'
    order). Trees of tl.join keep the eight words in the registers of the thread holding w."""
    M: tl.constexpr = 0x01010101
    return tl.join(tl.join(tl.join(w & M, (w >> 4) & M), tl.join((w >> 2) & M, (w >> 6) & M)),
                   tl.join(tl.join((w >> 1) & M, (w >> 5) & M), tl.join((w >> 3) & M, (w >> 7) & M)))


@triton.jit
def byte_tile(v, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int8 [BLOCK_N, BLOCK_K] in k order of words v [BLOCK_N, BLOCK_K / 32, 2, 2, 2] (spread_bits' stacking): the
    four bytes of each word (truncations, byte b = k % 4) joined as spread_bits joins s."""
    b0, b1, b2, b3 = v.to(tl.int8), (v >> 8).to(tl.int8), (v >> 16).to(tl.int8), (v >> 24).to(tl.int8)
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (BLOCK_N, BLOCK_K))


@triton.jit
def word_tile(p_ptr, kw0, offs_n, n_ok, KW, N, BLOCK_KW: tl.constexpr):
    """(pointers, mask) [BLOCK_N, BLOCK_KW] of plane 0's words kw0 .. kw0 + BLOCK_KW - 1 at columns offs_n (plane i:
    pointers + i * stride_p); the mask is false past KW and N."""
    w = kw0 + tl.arange(0, BLOCK_KW)
    return p_ptr + w[None, :].to(tl.int64) * N + offs_n[:, None], n_ok[:, None] & (w < KW)[None, :]


@triton.jit
def centred_codes(words, ok, stride_p, zero, P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c' = c - Z as int8 [BLOCK_N, BLOCK_K] of the P planes' words at (words, ok) (word_tile; module docstring:
    decode): Z = zero [BLOCK_N] int32 in [0, 2^P) for P <= 7, Z = 128 for P = 8 (zero unused)."""
    v = spread_bits(tl.load(words, mask=ok, other=0))
    for i in tl.static_range(1, P):
        v |= spread_bits(tl.load(words + i * stride_p, mask=ok, other=0)) << i
    if P < 8:
        v += ((128 - zero) * 0x01010101)[:, None, None, None, None]  # wraps for zero = 0: only the bytes matter
    return byte_tile(v ^ XOR80, BLOCK_N, BLOCK_K)


@triton.jit
def group_terms(ws_ptr, wz_ptr, wsum_ptr, g, N, offs_n, n_ok, group_size):
    """(w_zero, w_scale, w_scale * W) [BLOCK_N] of group g (W = w_sum - group_size * w_zero, module docstring)."""
    at = g * N + offs_n
    zero = tl.load(wz_ptr + at, mask=n_ok, other=0).to(tl.int32)
    ws = tl.load(ws_ptr + at, mask=n_ok, other=0.0)
    return zero, ws, ws * (tl.load(wsum_ptr + at, mask=n_ok, other=0) - zero * group_size).to(tl.float32)


@triton.jit
def span_sum(x_rows, m_ok, p_ptr, offs_n, n_ok, zero, s0, s_end, K, KW, N, stride_p, P: tl.constexpr,
             PLANES: tl.constexpr, DENSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """D + dw A (int32 [BLOCK_M, BLOCK_N], exact) over k in [s0, s_end) (one group's span), in BLOCK_K steps; DENSE:
    p_ptr is decode_codes' int8 c' [N, K] (row stride stride_p), loaded as a [BLOCK_K, BLOCK_N] tile of c'^T."""
    ROW_SUMS: tl.constexpr = PLANES or P == 8  # dw != 0
    d = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.int32)  # A
    for k0 in range(s0, s_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0)  # a', 0 past K
        if ROW_SUMS:
            row_sum += tl.sum(a.to(tl.int32), axis=1)
        if DENSE:
            b = tl.load(p_ptr + offs_n.to(tl.int64)[None, :] * stride_p + k[:, None],
                        mask=(k < K)[:, None] & n_ok[None, :], other=0)
            d = tl.dot(a, b, d, out_dtype=tl.int32)
        elif PLANES:
            words, ok = word_tile(p_ptr, k0 // 32, offs_n, n_ok, KW, N, BLOCK_K // 32)
            for i in tl.static_range(P):
                u = byte_tile(spread_bits(tl.load(words + i * stride_p, mask=ok, other=0)), BLOCK_N, BLOCK_K)
                d += tl.dot(a, tl.trans(u), out_dtype=tl.int32) << i
        else:
            words, ok = word_tile(p_ptr, k0 // 32, offs_n, n_ok, KW, N, BLOCK_K // 32)
            d = tl.dot(a, tl.trans(centred_codes(words, ok, stride_p, zero, P, BLOCK_N, BLOCK_K)), d,
                       out_dtype=tl.int32)
    if ROW_SUMS:
        d += row_sum[:, None] * ((0 if PLANES else 128) - zero)[None, :]  # dw = Z - w_zero
    return d


@triton.jit
def _bitplane_kernel(x_ptr, xs_ptr, xz_ptr, p_ptr, ws_ptr, wz_ptr, wsum_ptr, bias_ptr, y_ptr, part_ptr, count_ptr, M, N,
                     K, KW, GROUPS, group_size, span, per_split, splits, stride_xm, stride_p, stride_ym,
                     P: tl.constexpr, Q: tl.constexpr, PLANES: tl.constexpr, DENSE: tl.constexpr,
                     ONE_SPAN: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m, offs_n, m_ok, n_ok = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    if ONE_SPAN:  # one group of at most MAX_SPAN k: the int32 sum is the only accumulator in the K loop
        zero, ws, col = group_terms(ws_ptr, wz_ptr, wsum_ptr, 0, N, offs_n, n_ok, group_size)
        k0, k_end = k_range(K, per_split, pid_k, SPLIT)  # split pid_k's k; the first one adds the dx term
        acc = span_sum(x_rows, m_ok, p_ptr, offs_n, n_ok, zero, k0, k_end, K, KW, N, stride_p, P, PLANES, DENSE,
                       BLOCK_M, BLOCK_N, BLOCK_K).to(tl.float32) * ws[None, :]
        col = tl.where(pid_k == 0, col, 0.0)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # sum_g w_scale (D + dw A)
        col = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_g w_scale W
        g_first, g_last = k_range(GROUPS, per_split, pid_k, SPLIT)  # split pid_k's groups
        for g in range(g_first, g_last):
            zero, ws, wcol = group_terms(ws_ptr, wz_ptr, wsum_ptr, g, N, offs_n, n_ok, group_size)
            col += wcol
            g_end = (g + 1) * group_size
            for s0 in range(g * group_size, g_end, span):
                d = span_sum(x_rows, m_ok, p_ptr, offs_n, n_ok, zero, s0, tl.minimum(s0 + span, g_end), K, KW, N,
                             stride_p, P, PLANES, DENSE, BLOCK_M, BLOCK_N, BLOCK_K)
                acc += d.to(tl.float32) * ws[None, :]
    dx = ((1 << (Q - 1)) - tl.load(xz_ptr + offs_m, mask=m_ok, other=0)).to(tl.float32)
    y = (acc + dx[:, None] * col[None, :]) * tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    if SPLIT:  # y is linear in the splits' sums: dequant_gemm's one-launch reduction adds the partials (and bias)
        split_output(y_ptr, y, offs_m, offs_n, M, N, stride_ym, bias_ptr, part_ptr, count_ptr, pid, pid_k, splits,
                     HAS_BIAS, SPLIT)
    else:
        store_output(y, bias_ptr, y_ptr, offs_m, offs_n, m_ok, n_ok, stride_ym, HAS_BIAS)


@triton.jit
def _decode_kernel(p_ptr, wz_ptr, w8_ptr, N, K, KW, group_size, stride_p, P: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """w8[n, k] = c' (centred_codes: c - w_zero of k's group for P <= 7, c - 128 for P = 8), int8 [N, K]; program
    (pid_n, pid_k) writes one [BLOCK_N, BLOCK_K] tile (BLOCK_K within one group)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_ok = offs_n < N
    zero = tl.load(wz_ptr + (k0 // group_size) * N + offs_n, mask=n_ok, other=0).to(tl.int32)
    words, ok = word_tile(p_ptr, k0 // 32, offs_n, n_ok, KW, N, BLOCK_K // 32)
    k = k0 + tl.arange(0, BLOCK_K)
    tl.store(w8_ptr + offs_n.to(tl.int64)[:, None] * K + k[None, :],
             centred_codes(words, ok, stride_p, zero, P, BLOCK_N, BLOCK_K), mask=n_ok[:, None] & (k < K)[None, :])


@triton.jit
def _bitplane_a16_kernel(x_ptr, p_ptr, ws_ptr, wz_ptr, bias_ptr, y_ptr, M, N, K, KW, group_size, stride_xm,
                         stride_p, stride_ym, P: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    offs_m, offs_n, m_ok, n_ok = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # a step lies in one group (BLOCK_K divides group_size, or one group)
        k = k0 + offs_k
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)  # 0 past K
        at = (k0 // group_size) * N + offs_n
        zero = tl.load(wz_ptr + at, mask=n_ok, other=0).to(tl.int32)
        words, ok = word_tile(p_ptr, k0 // 32, offs_n, n_ok, KW, N, BLOCK_K // 32)
        w = centred_codes(words, ok, stride_p, zero, P, BLOCK_N, BLOCK_K).to(tl.float32)
        if P == 8:  # Z = 128: c - w_zero = c' + 128 - w_zero
            w += (128 - zero).to(tl.float32)[:, None]
        w = (w * tl.load(ws_ptr + at, mask=n_ok, other=0.0)[:, None]).to(x_ptr.dtype.element_ty)
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    store_output(acc, bias_ptr, y_ptr, offs_m, offs_n, m_ok, n_ok, stride_ym, HAS_BIAS)


# ---- configs and launchers ----

# (BLOCK_M, BLOCK_N, warps) by batch, the tiles a first tuning at 4096 -> 14336, p 2..8, kept: BLOCK_M 16 up to 32
# rows, 64 x 64 / 64 x 128 at 64, 128 x 128 beyond
TILES = {32: [(16, 64, 4), (16, 128, 4)], 64: [(64, 64, 4), (64, 128, 8)], None: [(128, 128, 8), (64, 128, 8)]}
# "dense": w8a8_gemm's large-M tiles (256 x 128 spills with this epilogue)
DENSE_TILES = [(128, 128, 8), (64, 128, 4)]
DEEP_K = 256  # small batches also try K steps this long (more bytes in flight a step; the planes are thin)
SPLITS, SPLIT_MAX_M = (2, 4, 8), 64  # split-K candidates (split_configs) and the batches that get them


def block_ks(k: int, group_size: int) -> list[int]:
    """BLOCK_K candidates: the two largest of 128 / 64 / 32 dividing group_size (any with one group per channel)."""
    return [bk for bk in (128, 64, 32) if group_size == k or group_size % bk == 0][:2]


def tile_shapes(m: int) -> list[tuple]:
    return next(shapes for bound, shapes in TILES.items() if bound is None or m <= bound)


def tiles(shapes, k: int, group_size: int, stages=(3, 4)) -> list[dict]:
    """Configs of (BLOCK_M, BLOCK_N, warps) shapes x block_ks x stages."""
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=s)
            for bm, bn, warps in shapes for bk in block_ks(k, group_size) for s in stages]


def interpreter_tile(k: int, group_size: int) -> dict:
    """The interpreter's one tile: its time goes by the number of K steps and tiles, not their size, so BLOCK_N 64
    and the largest BLOCK_K the groups allow (BLOCK_M 16: batches over 16 still take two row tiles)."""
    return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=block_ks(k, group_size)[0], GROUP_M=2, num_warps=4, num_stages=1)


def split_configs(m: int, k: int, group_size: int, shape) -> list[dict]:
    """Split-K candidates up to SPLIT_MAX_M: "rebuild" at tile shape with SPLIT_K in SPLITS where K holds at least two
    BLOCK_K steps (per channel) or two groups a split. At M <= 64 N / BLOCK_N tiles give about one program an SM
    (4096 -> 14336: 224 at 16 x 64 on 132 SMs), each walking all of K in a serial chain of steps."""
    if m > SPLIT_MAX_M:
        return []
    bm, bn, warps = shape
    bk = block_ks(k, group_size)[0]
    units = k // bk if group_size == k <= MAX_SPAN else k // group_size
    return [dict(variant="rebuild", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SPLIT_K=split, num_warps=warps,
                 num_stages=4) for split in SPLITS if units >= 2 * split]


def configs(m: int, k: int, group_size: int) -> list[dict]:
    """Candidates for batch m (rounded up to a power of two), K = k and group_size, at most 16; the first is the
    untuned default. "rebuild" at every tile of TILES (up to M = 64 also with K steps of DEEP_K where the groups allow,
    and split over K: split_configs), "planes" (p dots a step need more registers; it rarely wins) at the smaller tile with 3 stages, and from M = DENSE_MIN_M "dense" at DENSE_TILES (one decode of the
    weight pays off once the GEMM is compute-bound). The interpreter runs "rebuild" at interpreter_tile (tests launch
    the others themselves)."""
    if interpreter_on():
        return [dict(variant="rebuild", **interpreter_tile(k, group_size))]
    shapes = tile_shapes(m)
    smallest = min(shapes, key=lambda t: t[0] * t[1])
    planes = tiles([smallest], k, group_size, stages=(3,))
    deep = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=DEEP_K, GROUP_M=8, num_warps=warps, num_stages=3)
            for bm, bn, warps in shapes if m <= 64 and (group_size == k or group_size % DEEP_K == 0)]
    dense = tiles(DENSE_TILES, k, group_size, stages=(3,)) if m >= DENSE_MIN_M else []
    return ([dict(variant="rebuild", **c) for c in tiles(shapes, k, group_size) + deep]
            + split_configs(m, k, group_size, smallest)
            + [dict(variant="planes", **c) for c in planes] + [dict(variant="dense", **c) for c in dense])


def a16_configs(m: int, k: int, group_size: int) -> list[dict]:
    return [interpreter_tile(k, group_size)] if interpreter_on() else tiles(tile_shapes(m), k, group_size)


def check_config(config, k: int, group_size: int) -> None:
    """A K step lies in one group and one span: BLOCK_K a multiple of 32 dividing group_size (several groups) and
    MAX_SPAN."""
    bk = config["BLOCK_K"]
    if bk % 32 or (group_size != k and group_size % bk) or MAX_SPAN % bk:
        raise ValueError(f"BLOCK_K={bk} must be a multiple of 32 dividing group_size={group_size} (K={k} has "
                         f"several groups) and MAX_SPAN={MAX_SPAN}")


DECODE_BLOCK_N = 64


def decode_codes(planes, w_zero, bits: int, group_size: int, k: int) -> torch.Tensor:
    """c' int8 [N, K] of the planes (the "dense" variant's operand, _decode_kernel; one launch, not tuned)."""
    n = planes.shape[2]
    w8 = torch.empty(n, k, dtype=torch.int8, device=planes.device)
    block_k = block_ks(k, group_size)[0]
    grid = (triton.cdiv(n, DECODE_BLOCK_N), triton.cdiv(k, block_k))
    _decode_kernel[grid](planes, w_zero, w8, n, k, planes.shape[1], group_size, planes.stride(0), P=bits,
                         BLOCK_N=DECODE_BLOCK_N, BLOCK_K=block_k, num_warps=4)
    return w8


def decode_codes_ref(planes, w_zero, bits: int, group_size: int, k: int) -> torch.Tensor:
    """decode_codes in torch: c - w_zero of each k's group (bits <= 7) or c - 128 (bits = 8), as int8 [N, K]."""
    codes = unpack_planes(planes, k)
    centre = per_column(w_zero, group_size, k) if bits < 8 else 128
    return (codes - centre).to(torch.int8)


def launch(config, xq, x_scale, x_zero, planes, w_scale, w_zero, w_sum, bits, act_bits, group_size, bias,
           out_dtype) -> torch.Tensor:
    """One launch of the WpAq kernel with config (inputs checked and contiguous); "dense" decodes the weight first;
    SPLIT_K (default 1) splits K (in BLOCK_K steps per channel, else in whole groups) over grid axis 1."""
    (m, k), n = xq.shape, planes.shape[2]
    check_config(config, k, group_size)
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    tiles = triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"])
    one_span = group_size == k <= MAX_SPAN
    groups = k // group_size
    k_total, block = (k, config["BLOCK_K"]) if one_span else (groups, 1)  # a split: BLOCK_K steps of k, or groups
    per_split, splits, part, counters = split_args(config, k_total, block, m, n, tiles, y)
    dense = config["variant"] == "dense"
    weights = decode_codes(planes, w_zero, bits, group_size, k) if dense else planes
    _bitplane_kernel[(tiles, splits)](
        xq, x_scale, x_zero, weights, w_scale, w_zero, w_sum, bias if bias is not None else y, y, part, counters, m, n,
        k, planes.shape[1], groups, group_size, min(group_size, MAX_SPAN), per_split, splits, xq.stride(0),
        weights.stride(0), y.stride(0), P=bits, Q=act_bits, PLANES=config["variant"] == "planes", DENSE=dense,
        ONE_SPAN=one_span, HAS_BIAS=bias is not None, SPLIT=splits > 1,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return y


def wpaq_arguments(xq, x_scale, x_zero, planes, w_scale, w_zero, w_sum, bits, act_bits, group_size, bias, out_dtype):
    """The checks of a WpAq launcher (check_inputs, one device; no value checks: they would sync the GPU) and
    (launch's arguments after the config, the tuning key with M unrounded), or (None, key) for an empty result."""
    check_inputs(xq, x_scale, x_zero, planes, w_scale, w_zero, w_sum, bits, act_bits, group_size, bias, out_dtype)
    check_device(dict(xq=xq, x_scale=x_scale, x_zero=x_zero, planes=planes, w_scale=w_scale, w_zero=w_zero,
                      w_sum=w_sum, bias=bias))
    (m, k), n = xq.shape, planes.shape[2]
    key = dict(M=m, N=n, K=k, p=bits, q=act_bits, g=group_size, out=str(out_dtype).removeprefix("torch."),
               bias=int(bias is not None))
    if m == 0 or n == 0:
        return None, key
    tensors = [t.contiguous() if t is not None else None
               for t in (xq, x_scale, x_zero, planes, w_scale, w_zero, w_sum, bias)]
    return (*tensors[:7], bits, act_bits, group_size, tensors[7], out_dtype), key


def launch_a16(config, x, planes, w_scale, w_zero, bits, group_size, bias) -> torch.Tensor:
    """One launch of the A16 kernel with config (inputs checked and contiguous)."""
    (m, k), n = x.shape, planes.shape[2]
    check_config(config, k, group_size)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    _bitplane_a16_kernel[grid](
        x, planes, w_scale, w_zero, bias if bias is not None else y, y, m, n, k, planes.shape[1], group_size,
        x.stride(0), planes.stride(0), y.stride(0), P=bits, HAS_BIAS=bias is not None, BLOCK_M=config["BLOCK_M"],
        BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"], **dot_args(x.dtype), num_warps=config["num_warps"], num_stages=config["num_stages"],
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


__all__ = ["bitplane_matmul_ref", "bitplane_matmul_a16", "bitplane_matmul_a16_ref", "code_sums",
           "decode_codes", "decode_codes_ref", "quantize_weight_ref"]

"""QuIP#'s E8P lattice-codebook weights (2, 3, 4 bits): decode and matmul kernels, and their torch references.

    y[M, N] = x @ W^T (+ bias),   W[n, 8b + j] = e8p(codes[b, n])[j] + second(codes2[b, n])[j] / RESID_SCALE[bits]
    x      [M, K] fp16 / bf16 / fp32, K a multiple of 8      bias [N] in x's dtype or None
    codes  int16 [K/8, N]: E8P12 indices (tquant/e8p_codebook.py)
    codes2 None (2 bits) | uint8 [K/8, N] E81B indices (3 bits) | int16 [K/8, N] E8P12 indices (4 bits)
    y      [M, N] in x's dtype, accumulated in fp32

Decoding in registers (e8p_words): one int32 word U per code whose nibble j is u_j, point_j = u_j / 2 - 3.75.
With a = index >> 8, n_j = 2 ABS_GRID[a][j] (odd, 1..7), s_j the sign, t the shift:
    u_j = n_j ^ 8 ^ (s_j < 0 ? 0xE : 0) ^ (t = -1/4 ? 1 : 0)          (8 + n_j or 8 - n_j, bit 0 = the shift)
A 1 KB table holds PACKED_ABS ^ 0x88888888 (ODD[a] folded into nibble 7's sign) for one lookup a code. The
sign part comes from integer multiplies that spread the 7 sign bits to nibbles without carries and sum
them for the parity (SIGNS=0), or from a second 1 KB table indexed by the index's low byte (SIGNS=1).
Lookups are tl.gather from a register copy of the tables through shared memory (GATHER=1) or L1-cached
global loads (GATHER=0). E81B (3-bit residual) words come from a third table: c_j = 2 v_j + 8, point_j =
c_j / 2 - 4. A nibble becomes a float with one LOP3 and one FADD (nibble_value: masked in place, OR-ed
into a power of two whose last mantissa bit is worth 1/2, so the difference is u_j / 2).

Paths, chosen per (M rounded up to a power of two, N, K, bits, dtype) by autotune_cache (kernel "e8p_matmul"):
    gemv   M == 1, no tl.dot. Grid (N / BLOCK_N, SPLIT_K). A program walks its share of K in [BLOCK_KB,
           BLOCK_N] tiles of codes (coalesced 16-byte loads along N), loads x[8b .. 8b+7] of those rows as
           [BLOCK_KB, 8] and multiply-adds x[8b + j] * u_j / 2 into an fp32 [BLOCK_KB, BLOCK_N] accumulator:
           three instructions a value (LOP3, FADD, FFMA; 3/4 bits: two more, LOP3 and FADD, then an FFMA by
           1 / RESID_SCALE into the weight). Each value is the weight itself (weight_value, the GEMM's decode:
           the FADD takes the point's offset off; nibble 0 needs a second FADD), so the sums are of x w: sums of
           x u / 2 (up to 7.5 x), or of the two stages apart, would overflow fp32 where x w does not (bf16 x past
           4.5e37). SPLIT_K > 1 sums fp32 partials in
           the same launch (dequant_gemm.store_output).
    gemm   M >= 2 (its M = 16 tiles also candidates at M = 1): tl.dot with fp32 accumulation. Codes as
           [BLOCK_N, BLOCK_KB]; each code's 8 values (fp32, exact; 3/4 bits rounded once) are joined next to
           each other (values_tree), giving W's block [BLOCK_N, 8 BLOCK_KB] in x's dtype in the order of
           x's columns; one dot a K step. BLOCK_M <= 16 computes y^T = W x^T (BLOCK_N is the MMA's M side).
    dense  M >= 64: the decode kernel writes W^T [K, N] in x's dtype once, then cuBLAS x @ W^T.
`e8p_decode_weight` runs the decode kernel alone (bit-exact with `e8p_decode_weight_ref` in fp32).
`e8p_matmul_ref` / `e8p_decode_weight_ref` are plain torch in fp32 from tquant.formats.e8p_codebook's decoders.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..formats.e8p_codebook import (
    E81B_GRID,
    ODD,
    PACKED_ABS,
    RESID_SCALE,
    check_bits,
    e8p_decode,
    e81b_decode,
)
from . import dequant_gemm
from .autotune_cache import tune
from .dequant_gemm import MAGIC_BITS, k_range, split_args, store_output
from .runtime import DTYPES, check_device, check_tensors, dot_args, interpreter_on, next_power_of_2
from .tiling import tile_offsets

CODES2_DTYPE = {3: torch.uint8, 4: torch.int16}
E8P_OFFSET = 3.75  # point_j = u_j / 2 - E8P_OFFSET
E81B_OFFSET = 4.0  # point_j = c_j / 2 - E81B_OFFSET
DENSE = {"path": "dense"}

# ---- decoding tables --------------------------------------------------------------------------------------


def _spread_signs(neg: torch.Tensor) -> torch.Tensor:
    """int64 [..., 8] of 0/1 -> int64 words with nibble j = 0xE where neg[..., j]."""
    return (neg * (0xE << (4 * torch.arange(8)))).sum(-1)


def _int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def table_words() -> torch.Tensor:
    """int32 [768] (CPU): [0, 256) E8P abs words PACKED_ABS ^ 0x88888888 with nibble 7 ^ 0xE where ODD[a];
    [256, 512) sign words by the index's low byte: 0xE in nibble j where s_j < 0 (j = 7: the parity of
    s_0..6) and 1 in every nibble where the shift is -1/4; [512, 768) E81B words, nibble j = 2 v_j + 8."""
    abs_words = (PACKED_ABS.to(torch.int64) & 0xFFFFFFFF) ^ 0x88888888 ^ (ODD * (0xE << 28))
    low = torch.arange(256)
    neg = (low[:, None] >> torch.arange(1, 8)) & 1
    neg = torch.cat([neg, neg.sum(-1, keepdim=True) % 2], dim=-1)
    sign_words = _spread_signs(neg) ^ ((low & 1) * 0x11111111)
    e81b_words = ((2 * E81B_GRID + 8).to(torch.int64) << (4 * torch.arange(8))).sum(-1)
    return _int32(torch.cat([abs_words, sign_words, e81b_words]))


@functools.lru_cache(maxsize=16)
def tables(device: torch.device) -> torch.Tensor:
    """table_words() on a device, made once per device."""
    return table_words().to(device)


# ---- Triton helpers ---------------------------------------------------------------------------------------


@triton.jit
def load_tables(tab_ptr, BITS: tl.constexpr, GATHER: tl.constexpr):
    """The tables as register tensors for tl.gather (GATHER=1): (E8P abs + sign words [512], E81B words
    [256]); with GATHER=0 lookups read global memory (L1-cached) and these are unused placeholders."""
    e8p = tab_ptr
    e81b = tab_ptr
    if GATHER:
        e8p = tl.load(tab_ptr + tl.arange(0, 512))
        if BITS == 3:
            e81b = tl.load(tab_ptr + 512 + tl.arange(0, 256))
    return e8p, e81b


@triton.jit
def lookup(ptr, table, idx, GATHER: tl.constexpr):
    """table[idx] for an int32 index tensor: tl.gather from a register table through shared memory
    (GATHER=1, 32-bit addresses, bank conflicts only), or a global load from ptr (GATHER=0)."""
    if GATHER:
        return tl.reshape(tl.gather(table, tl.reshape(idx, [idx.numel]), 0), idx.shape)
    else:
        return tl.load(ptr + idx)


@triton.jit
def e8p_words(idx, tab_ptr, table, SIGNS: tl.constexpr, GATHER: tl.constexpr):
    """int32 E8P12 indices (sign-extended int16 is fine) -> int32 words, nibble j = u_j (point_j = u_j/2 - 3.75).

    SIGNS=0: sign bits s_j (index bit 1 + j) go to bit 1 of nibble j by two multiplies whose shifted copies
    never collide (even j: shifts 0, 6, 12, 18 of bits 1, 3, 5, 7; odd j: shifts 3, 9, 15 of bits 2, 4, 6);
    a third multiply by 0x11111111 sums the nibbles into nibble 7, whose bit 1 is then the parity of
    s_0..6 (ODD[a] is in the table). Times 7 turns each 2 into 0xE; subtracting the shift bit times
    0x11111111 clears bit 0 of every nibble (always set before). SIGNS=1: the sign word from a table."""
    if SIGNS == 1:
        if GATHER:  # one tl.gather for both words: one copy of the table to shared memory, not two
            word, sign = tl.split(lookup(tab_ptr, table, tl.join((idx >> 8) & 255, 256 + (idx & 255)), GATHER))
        else:
            word, sign = lookup(tab_ptr, table, (idx >> 8) & 255, 0), lookup(tab_ptr, table, 256 + (idx & 255), 0)
        return word ^ sign
    else:
        word = lookup(tab_ptr, table, (idx >> 8) & 255, GATHER)
        neg = (((idx & 0xAA) * 0x41041) & 0x02020202) | (((idx & 0x54) * 0x8208) & 0x00202020)
        neg = neg | ((neg * 0x11111111) & 0x20000000)
        return (word ^ (neg * 7)) - (idx & 1) * 0x11111111


@triton.jit
def nibble_value(words, J: tl.constexpr, magic, OFFSET: tl.constexpr):
    """u_J / 2 - OFFSET exactly in fp32 for nibble J of every word: the nibble, masked in place at bit P
    (nibbles 5..7 after one shift shared by them), is OR-ed into the float 2^(22-P) whose last mantissa
    bit is worth 2^-(P+1) (one LOP3: magic = 0x4B000000 in a register, 2^(22-P) = magic - (P+1) << 23),
    then one FADD takes off 2^(22-P) + OFFSET (two when that sum is not an fp32 number: P = 0, OFFSET 3.75)."""
    P: tl.constexpr = 4 * J if J < 5 else 4 * J - 12
    if J < 5:
        bits = words & (15 << P)
    else:
        bits = (words >> 12) & (15 << P)
    f = (bits | (magic - ((P + 1) << 23))).to(tl.float32, bitcast=True)
    if (OFFSET * (2 << P)) % 1 == 0:  # 2^(22-P) + OFFSET is a multiple of its ulp 2^-(P+1)
        return f - ((1 << (22 - P)) + OFFSET)
    else:
        return (f - (1 << (22 - P)) * 1.0) - OFFSET


@triton.jit
def load_words(c_ptr, c2_ptr, tab_ptr, e8p_tab, e81b_tab, offs, mask, BITS: tl.constexpr, SIGNS: tl.constexpr,
               GATHER: tl.constexpr):
    """(first-stage words, second-stage words or the first again for 2 bits) for the codes at offs."""
    words = e8p_words(tl.load(c_ptr + offs, mask=mask, other=0).to(tl.int32), tab_ptr, e8p_tab, SIGNS, GATHER)
    words2 = words
    if BITS == 3:
        words2 = lookup(tab_ptr + 512, e81b_tab, tl.load(c2_ptr + offs, mask=mask, other=0).to(tl.int32), GATHER)
    elif BITS == 4:
        words2 = e8p_words(tl.load(c2_ptr + offs, mask=mask, other=0).to(tl.int32), tab_ptr, e8p_tab, SIGNS,
                           GATHER)
    return words, words2


@triton.jit
def weight_value(words, words2, J: tl.constexpr, magic, rinv, BITS: tl.constexpr):
    """W value J (fp32) of each code: E8P point + second-stage point * rinv (rinv = 1 / RESID_SCALE)."""
    w = nibble_value(words, J, magic, 3.75)
    if BITS == 3:
        w += nibble_value(words2, J, magic, 4.0) * rinv
    elif BITS == 4:
        w += nibble_value(words2, J, magic, 3.75) * rinv
    return w


@triton.jit
def values_tree(words, words2, magic, rinv, J: tl.constexpr, STRIDE: tl.constexpr, COUNT: tl.constexpr,
                BITS: tl.constexpr):
    """Values J, J + STRIDE, ... (COUNT, a power of two) of every code in fp32, stacked on trailing dims of
    size 2 (tl.join keeps them in each thread) with the lowest stride last: flattened, trailing index i
    holds value J + STRIDE * i."""
    if COUNT == 1:
        return weight_value(words, words2, J, magic, rinv, BITS)
    else:
        return tl.join(values_tree(words, words2, magic, rinv, J, 2 * STRIDE, COUNT // 2, BITS),
                       values_tree(words, words2, magic, rinv, J + STRIDE, 2 * STRIDE, COUNT // 2, BITS))


@triton.jit
def fma_tree(acc, words, words2, xw, magic, rinv, J: tl.constexpr, STRIDE: tl.constexpr, COUNT: tl.constexpr,
             BITS: tl.constexpr):
    """acc + sum_i xw[:, i] * W_{J + STRIDE i} over the COUNT (a power of two) values whose x values xw
    [BLOCK_KB, COUNT] holds (weight_value: the point, offset taken off, plus the second stage's); acc and words
    [BLOCK_KB, BLOCK_N]. xw is split into halves (even, odd i) down to single columns [BLOCK_KB, 1] that broadcast
    over N: one FFMA a value."""
    if COUNT == 1:
        return acc + xw * weight_value(words, words2, J, magic, rinv, BITS)
    else:
        even, odd = tl.split(tl.reshape(xw, (xw.shape[0], COUNT // 2, 2)))
        acc = fma_tree(acc, words, words2, even, magic, rinv, J, 2 * STRIDE, COUNT // 2, BITS)
        return fma_tree(acc, words, words2, odd, magic, rinv, J + STRIDE, 2 * STRIDE, COUNT // 2, BITS)


# ---- kernels ----------------------------------------------------------------------------------------------


@triton.jit
def _e8p_gemv_kernel(
    x_ptr, c_ptr, c2_ptr, tab_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr,
    N, KB, stride_c, kb_per_split, splits, magic, rinv,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, SIGNS: tl.constexpr,
    GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = tl.arange(0, BLOCK_KB)
    j8 = tl.arange(0, 8)
    kb_start, kb_end = k_range(KB, kb_per_split, pid_k, SPLIT)
    e8p_tab, e81b_tab = load_tables(tab_ptr, BITS, GATHER)
    acc = tl.zeros([BLOCK_KB, BLOCK_N], dtype=tl.float32)
    for kb0 in tl.range(kb_start, kb_end, BLOCK_KB, num_stages=NUM_STAGES):
        r = kb0 + rows
        r_ok = r < KB
        words, words2 = load_words(c_ptr, c2_ptr, tab_ptr, e8p_tab, e81b_tab, r[:, None] * stride_c + offs_n[None, :],
                                   r_ok[:, None] & n_ok[None, :], BITS, SIGNS, GATHER)
        x8 = tl.load(x_ptr + (r * 8)[:, None] + j8[None, :], mask=r_ok[:, None], other=0.0).to(tl.float32)
        acc = fma_tree(acc, words, words2, x8, magic, rinv, 0, 1, 8, BITS)
    out = tl.sum(acc, axis=0)[None, :]
    store_output(y_ptr, out, tl.arange(0, 1), offs_n, 1, N, 0, bias_ptr, ws_ptr, count_ptr, pid_n, pid_k, splits,
                 HAS_BIAS, SPLIT)


@triton.jit
def _e8p_gemm_kernel(
    x_ptr, c_ptr, c2_ptr, tab_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr,
    M, N, KB, stride_xm, stride_c, stride_ym, kb_per_split, splits, magic, rinv,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr,
    GROUP_M: tl.constexpr, SIGNS: tl.constexpr, GATHER: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    BLOCK_K: tl.constexpr = 8 * BLOCK_KB
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m, offs_n, m_ok, n_ok = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tl.arange(0, BLOCK_KB)
    cols = tl.arange(0, BLOCK_K)
    kb_start, kb_end = k_range(KB, kb_per_split, pid_k, SPLIT)
    e8p_tab, e81b_tab = load_tables(tab_ptr, BITS, GATHER)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for kb0 in range(kb_start, kb_end, BLOCK_KB):
        r = kb0 + rows
        # codes as [BLOCK_N, BLOCK_KB]; each code's 8 values joined next to each other (in one thread) give
        # W's block [BLOCK_N, 8 BLOCK_KB] in the order of x's columns
        words, words2 = load_words(c_ptr, c2_ptr, tab_ptr, e8p_tab, e81b_tab, r[None, :] * stride_c + offs_n[:, None],
                                   n_ok[:, None] & (r < KB)[None, :], BITS, SIGNS, GATHER)
        w = tl.reshape(values_tree(words, words2, magic, rinv, 0, 1, 8, BITS), (BLOCK_N, BLOCK_K)).to(DOT_DTYPE)
        k = kb0 * 8 + cols
        xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k < KB * 8)[None, :],
                     other=0.0).to(DOT_DTYPE)
        if BLOCK_M <= 16:  # y^T = W x^T: BLOCK_N fills the MMA's M side, W is the operand from registers
            acc_t = tl.dot(w, tl.trans(xa), acc_t, input_precision=PRECISION)
        else:
            acc = tl.dot(xa, tl.trans(w), acc, input_precision=PRECISION)
    if BLOCK_M <= 16:
        acc = tl.trans(acc_t)
    store_output(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, bias_ptr, ws_ptr, count_ptr, pid, pid_k, splits,
                 HAS_BIAS, SPLIT)


@triton.jit
def quotient(v, d, dinv):
    """v / d correctly rounded for the second-stage points v (checked for all of them by the tests) with
    d = RESID_SCALE, dinv = fp32(1 / d): one FMA corrects the product v * dinv (3 ops, not an IEEE divide)."""
    q = v * dinv
    return tl.fma(tl.fma(-q, d, v), dinv, q)


@triton.jit
def _e8p_decode_kernel(c_ptr, c2_ptr, tab_ptr, w_ptr, N, KB, stride_c, stride_wk, magic, resid, rinv,
                       BITS: tl.constexpr, BLOCK_KB: tl.constexpr, BLOCK_N: tl.constexpr, SIGNS: tl.constexpr,
                       GATHER: tl.constexpr):
    r = tl.program_id(0) * BLOCK_KB + tl.arange(0, BLOCK_KB)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (r < KB)[:, None] & (offs_n < N)[None, :]
    e8p_tab, e81b_tab = load_tables(tab_ptr, BITS, GATHER)
    words, words2 = load_words(c_ptr, c2_ptr, tab_ptr, e8p_tab, e81b_tab, r[:, None] * stride_c + offs_n[None, :],
                               mask, BITS, SIGNS, GATHER)
    for j in tl.static_range(8):
        w = nibble_value(words, j, magic, 3.75)
        if BITS == 3:  # divided as e8p_codebook does, so that fp32 outputs match it bit for bit
            w += quotient(nibble_value(words2, j, magic, 4.0), resid, rinv)
        elif BITS == 4:
            w += quotient(nibble_value(words2, j, magic, 3.75), resid, rinv)
        tl.store(w_ptr + (r * 8 + j)[:, None] * stride_wk + offs_n[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=mask)


# ---- checks and references --------------------------------------------------------------------------------


def check_codes(codes, codes2, bits: int) -> tuple[int, int]:
    """Raise ValueError on codes / codes2 that do not fit bits; return (K / 8, N)."""
    check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D tensor [K/8, N]; got {getattr(codes, 'shape', type(codes))}")
    if codes.dtype != torch.int16:
        raise ValueError(f"codes dtype {codes.dtype} does not match: E8P12 indices are torch.int16")
    if bits == 2 and codes2 is not None:
        raise ValueError("bits=2 takes no codes2 (2-bit E8P has one stage); pass codes2=None")
    if bits > 2:
        if codes2 is None:
            raise ValueError(f"bits={bits} needs codes2 ({CODES2_DTYPE[bits]} [K/8, N], the residual stage)")
        check_tensors({"codes2": (codes2, tuple(codes.shape), (CODES2_DTYPE[bits],))},
                      f"bits={bits} with codes of shape {tuple(codes.shape)}")
    return codes.shape[0], codes.shape[1]


def check_inputs(x, codes, codes2, bits: int, bias) -> None:
    """Raise ValueError on inconsistent matmul inputs."""
    kb, n = check_codes(codes, codes2, bits)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K] (flatten leading dims first); got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not supported; use one of {DTYPES}")
    if x.shape[1] % 8:
        raise ValueError(f"x has K={x.shape[1]} columns: E8P codes need K to be a multiple of 8")
    if x.shape[1] != 8 * kb:
        raise ValueError(f"x has K={x.shape[1]} columns but codes has {kb} rows (K/8 = {kb} means K = {8 * kb})")
    check_tensors({"bias": (bias, (n,), (x.dtype,))}, f"x of {x.dtype} and N={n}")


def _decode_ref(codes, codes2, bits) -> torch.Tensor:
    """W^T [K, N] float32 from the codebook's decoders."""
    w = e8p_decode(codes)  # [K/8, N, 8]
    if bits == 3:
        w = w + e81b_decode(codes2) / RESID_SCALE[3]
    elif bits == 4:
        w = w + e8p_decode(codes2) / RESID_SCALE[4]
    return w.permute(0, 2, 1).reshape(8 * codes.shape[0], codes.shape[1])


def e8p_decode_weight_ref(codes, codes2=None, *, bits, dtype=torch.float16):
    """W^T [K, N] in dtype: row 8b + j, column n = coordinate j of code (b, n)'s value (plain torch)."""
    check_codes(codes, codes2, bits)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; use one of {DTYPES}")
    return _decode_ref(codes, codes2, bits).to(dtype)


def e8p_matmul_ref(x, codes, codes2=None, *, bits, bias=None):
    """y = x @ W^T (+ bias) in fp32 with plain torch, returned in x's dtype."""
    check_inputs(x, codes, codes2, bits, bias)
    y = x.float() @ _decode_ref(codes, codes2, bits)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


# ---- launchers --------------------------------------------------------------------------------------------


def _args(codes, codes2, bits):
    """(codes2 or codes as a dummy pointer, tables, 1 / RESID_SCALE or 1.0) for a launch."""
    return (codes2 if codes2 is not None else codes, tables(codes.device),
            1.0 / RESID_SCALE[bits] if bits > 2 else 1.0)


def gemv(x, codes, codes2, bias, *, bits: int, config: dict) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x [1, K] with x.stride(1) == 1, without tl.dot."""
    if x.shape[0] != 1:
        raise ValueError(f"the gemv path takes one row of x, not M={x.shape[0]}")
    kb, n = codes.shape
    c2, tab, rinv = _args(codes, codes2, bits)
    y = dequant_gemm.output_buffer(1, n, x.dtype, x.device)
    tiles = triton.cdiv(n, config["BLOCK_N"])
    per_split, splits, ws, counters = split_args(config, kb, config["BLOCK_KB"], 1, n, tiles, y)
    _e8p_gemv_kernel[(tiles, splits)](
        x, codes, c2, tab, bias if bias is not None else y, y, ws, counters, n, kb, codes.stride(0), per_split,
        splits, MAGIC_BITS, rinv, BITS=bits, BLOCK_N=config["BLOCK_N"],
        BLOCK_KB=config["BLOCK_KB"], SIGNS=config["SIGNS"], GATHER=config["GATHER"], HAS_BIAS=bias is not None,
        SPLIT=splits > 1, NUM_STAGES=config["num_stages"], num_warps=config["num_warps"],
    )
    return y


def gemm(x, codes, codes2, bias, *, bits: int, config: dict) -> torch.Tensor:
    """y = x @ W^T (+ bias) with tl.dot for x [M, K] with x.stride(1) == 1."""
    m = x.shape[0]
    kb, n = codes.shape
    c2, tab, rinv = _args(codes, codes2, bits)
    y = dequant_gemm.output_buffer(m, n, x.dtype, x.device)
    tiles = triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"])
    per_split, splits, ws, counters = split_args(config, kb, config["BLOCK_KB"], m, n, tiles, y)
    _e8p_gemm_kernel[(tiles, splits)](
        x, codes, c2, tab, bias if bias is not None else y, y, ws, counters, m, n, kb, x.stride(0),
        codes.stride(0), y.stride(0), per_split, splits, MAGIC_BITS, rinv,
        BITS=bits, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_KB=config["BLOCK_KB"],
        GROUP_M=config["GROUP_M"], SIGNS=config["SIGNS"], GATHER=config["GATHER"], HAS_BIAS=bias is not None,
        SPLIT=splits > 1, **dot_args(x.dtype), num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return y


def decode_weight(codes, codes2, *, bits: int, dtype: torch.dtype, signs: int = 1, gather: int = 1,
                  block: tuple[int, int] | None = None) -> torch.Tensor:
    """The Triton decode (inputs checked, contiguous): W^T [K, N] in dtype. block: (BLOCK_KB, BLOCK_N)."""
    kb, n = codes.shape
    c2, tab, rinv = _args(codes, codes2, bits)
    w = dequant_gemm.output_buffer(8 * kb, n, dtype, codes.device)
    block_kb, block_n = block or ((8, 64) if interpreter_on() else (4, 256))
    _e8p_decode_kernel[(triton.cdiv(kb, block_kb), triton.cdiv(n, block_n))](
        codes, c2, tab, w, n, kb, codes.stride(0), w.stride(0), MAGIC_BITS,
        RESID_SCALE[bits] if bits > 2 else 1.0, rinv, BITS=bits, BLOCK_KB=block_kb, BLOCK_N=block_n, SIGNS=signs,
        GATHER=gather, num_warps=4,
    )
    return w


def e8p_decode_weight(codes, codes2=None, *, bits, dtype=torch.float16):
    """W^T [K, N] in dtype decoded by a Triton kernel (bit-exact with e8p_decode_weight_ref in fp32)."""
    check_codes(codes, codes2, bits)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; use one of {DTYPES}")
    check_device({"codes": codes, "codes2": codes2})
    if codes.numel() == 0:
        return torch.empty(8 * codes.shape[0], codes.shape[1], dtype=dtype, device=codes.device)
    return decode_weight(codes.contiguous(), codes2.contiguous() if codes2 is not None else None, bits=bits,
                         dtype=dtype)


# ---- configs and dispatch ---------------------------------------------------------------------------------

INTERPRETER_CONFIGS = {  # small blocks so that tests cover several tiles, splits and masks
    "gemv": {"path": "gemv", "BLOCK_N": 32, "BLOCK_KB": 4, "SPLIT_K": 2, "SIGNS": 0, "GATHER": 1, "num_warps": 4,
             "num_stages": 1},
    "gemm": {"path": "gemm", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_KB": 4, "SPLIT_K": 2, "GROUP_M": 2, "SIGNS": 1,
             "GATHER": 0, "num_warps": 4, "num_stages": 1},
    "gemm_large": {"path": "gemm", "BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_KB": 8, "SPLIT_K": 1, "GROUP_M": 2, "SIGNS": 0,
                   "GATHER": 1, "num_warps": 4, "num_stages": 1},
}
DECODERS = ((1, 1), (0, 1), (1, 0))  # (SIGNS, GATHER) the tuner tries, the likely fastest first


def _nearest_splits(tiles_n: int, kb: int, block_kb: int, target: int, count: int = 2) -> list[int]:
    """The count split-K factors whose grid (tiles_n x splits) is nearest target programs, in octaves; a split
    keeps at least two K steps."""
    fits = [sk for sk in (1, 2, 4, 8, 16, 32, 64) if sk == 1 or kb >= 2 * sk * block_kb]
    return sorted(fits, key=lambda sk: abs(math.log2(tiles_n * sk / target)))[:count]


def gemv_configs(n: int, kb: int) -> list[dict]:
    """GEMV candidates for N = n, kb code rows, the default first. Tiles (num_warps, BLOCK_N, BLOCK_KB) give
    a thread 8 adjacent codes along N (16-byte loads) in 2 or 4 rows, each with the two split-K counts nearest
    4 programs per SM (132 SMs); the first tile also with the other decoders and 3 stages."""
    tiles = ((4, 256, 8), (4, 512, 4), (8, 512, 8), (8, 1024, 4), (4, 256, 16), (4, 1024, 4))
    out = []
    for t, (warps, block_n, bkb) in enumerate(tiles):
        variants = [(*DECODERS[0], 1)] + ([(*d, 1) for d in DECODERS[1:]] + [(*DECODERS[0], 3)] if t == 0 else [])
        for rank, sk in enumerate(_nearest_splits(-(-n // block_n), kb, bkb, 4 * 132)):
            for v, (signs, gather, stages) in enumerate(variants):
                out.append(((rank, v, t), {"path": "gemv", "BLOCK_N": block_n, "BLOCK_KB": bkb, "SPLIT_K": sk,
                                           "SIGNS": signs, "GATHER": gather, "num_warps": warps, "num_stages": stages}))
    return [c for _, c in sorted(out, key=lambda t: t[0])]


def gemm_configs(m: int, n: int, kb: int) -> list[dict]:
    """GEMM candidates for batch m >= 2 (a power of two), N = n, kb code rows; BLOCK_KB code rows are
    8 BLOCK_KB columns of x. For m <= 16, BLOCK_N is the MMA's M side (y^T = W x^T); split-K (m <= 64)
    takes the two counts nearest 2 programs per SM."""
    if m <= 16:
        tiles = [(16, 64, 16, 4), (16, 128, 8, 4), (16, 64, 8, 4), (16, 128, 16, 8)]
    elif m <= 64:
        tiles = [(64, 64, 16, 4), (64, 128, 8, 4), (32, 128, 16, 4)]
    else:
        tiles = [(128, 128, 8, 8), (128, 64, 16, 4), (64, 128, 16, 4), (128, 256, 8, 8)]
    out = []
    for bm, bn, bkb, warps in tiles:
        tiles_mn = -(-m // bm) * -(-n // bn)
        splits = _nearest_splits(tiles_mn, kb, bkb, 2 * 132) if m <= 64 else [1]
        for sk in splits:
            for signs, gather in DECODERS[:2]:
                out.append({"path": "gemm", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KB": bkb, "SPLIT_K": sk, "GROUP_M": 8,
                            "SIGNS": signs, "GATHER": gather, "num_warps": warps, "num_stages": 3})
    return out


@functools.lru_cache(maxsize=256)
def candidates(m: int, n: int, kb: int) -> list[dict]:
    """Launch configs to tune over for batch m (rounded up to a power of two), N = n, kb code rows (the
    first is the default). Cached: callers must not modify the list."""
    if interpreter_on():
        return [INTERPRETER_CONFIGS["gemv" if m == 1 else "gemm" if m <= 16 else "gemm_large"]]
    if m == 1:
        return gemv_configs(n, kb) + gemm_configs(16, n, kb)[:2]
    return gemm_configs(m, n, kb) + ([DENSE] if m >= 64 else [])


def run_path(config, x, codes, codes2, bias, *, bits):
    """One launch of the path that config names (inputs already checked and contiguous)."""
    if config["path"] == "dense":
        wt = decode_weight(codes, codes2, bits=bits, dtype=x.dtype)
        return x @ wt if bias is None else torch.addmm(bias, x, wt)
    kernel = gemv if config["path"] == "gemv" else gemm
    return kernel(x, codes, codes2, bias, bits=bits, config=config)


def e8p_matmul(x, codes, codes2=None, *, bits, bias=None):
    """y = x @ W^T (+ bias) for E8P codes (see the module docstring), in x's dtype with fp32 accumulation."""
    check_inputs(x, codes, codes2, bits, bias)
    check_device({"x": x, "codes": codes, "codes2": codes2, "bias": bias})
    m, n = x.shape[0], codes.shape[1]
    if m == 0 or n == 0 or codes.shape[0] == 0:  # nothing to launch: empty, or K = 0 (y = bias)
        y = x.new_zeros(m, n)
        return y if bias is None else y + bias
    args = [t.contiguous() if t is not None else None for t in (x, codes, codes2, bias)]
    key = {"M": next_power_of_2(m), "N": n, "K": x.shape[1], "bits": bits, "dtype": str(x.dtype).removeprefix("torch.")}
    configs = candidates(key["M"], n, codes.shape[0])
    config = tune("e8p_matmul", key, configs, lambda c: run_path(c, *args, bits=bits), x.device)
    return run_path(config, *args, bits=bits)


__all__ = ["e8p_decode_weight", "e8p_decode_weight_ref", "e8p_matmul", "e8p_matmul_ref"]

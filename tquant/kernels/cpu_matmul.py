"""Weight-only matmul on the CPU: what PackedLinear runs on CPU tensors (weight_only_matmul_ref's results up to float
rounding, computed in fp32 as the reference is, so bf16 / fp16 models get the reference's accuracy).

Two paths, chosen per layer (int4 only with USE_INT4, off: measured slower, see there):
    int4      4-bit codes whose group size is a multiple of 32, 64, 128 or 256 (per-channel too, where such a size
              divides K), N a multiple of 16, no SpQR bilevel grid: torch's own CPU int4 kernel (aten._weight_int4pack_mm_for_cpu,
              AVX2 / AVX512, dequantizing inside the matmul's tiles). It reads the codes in its own layout,
              uint8 [N, K / 2] (aten._convert_weight_to_int4pack_for_cpu), made once per layer on the first CPU
              forward and kept beside qweight (pack_int4: exactly qweight's bytes again, 0.5 byte a weight; float32
              is 4, bfloat16 2), rebuilt when qweight changes. w = (code - 8) * scale + (8 - zero) * scale: the
              kernel's grid is ours with the zero moved into the float domain (scale_zeros, per call: G x N).
    dequant   everything else (2 / 3 / 8-bit, other groups, bilevel): packed_matmul. The codes are unpacked on the
              int32 words (one shift and one and over [K, N], broadcast per code position), made floats by the
              exponent trick (code | 0x4B000000 is the float 2^23 + code, so subtracting 2^23 + zero gives code - zero
              exactly), then multiplied by the broadcast group scales in place: dequantize_packed's fp32 values bit
              for bit, in 5 passes without a byte transpose. At small M (decode) the weight is dequantized and
              multiplied in K chunks of ~CHUNK_BYTES (a few groups: the passes stay in L2) into a thread-local scratch
              that is reused, accumulated with addmm_; at larger M (prefill) in one [K, N] temporary, then one fp32
              matmul (chunking there re-reads the [M, N] output once a chunk: measured no faster). Nothing is kept
              beyond the scratch.
Optional (module.cache_weights, off by default): the dequantized weight [K, N] kept per layer, so every forward is a
plain matmul. True / "float32": fp32, the float model's memory (4 bytes a weight) on top of the packed one, the
reference's values. "bfloat16": the weight rounded to bf16 (2 bytes a weight) and the matmul in bf16 (x rounded to
bf16, bf16 output, AMX where the CPU has it): not the reference's accuracy (about 3 significant digits), faster at
large M.
Optional (module.cpu_precision = "bfloat16", off by default): bf16_packed_matmul, bf16 accuracy without a dequantized
weight kept: 4-bit layers with torch's int4 groups at small M through torch's CPU int4 kernel in bf16 (its code layout
kept beside qweight, 0.5 byte a weight), large M through the exact weight rounded to bf16 and a bf16 matmul.
"""
from __future__ import annotations

import math
import threading

import torch

from ..formats.packing import unpack_codes, values_per_word

INT4_GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu takes, largest first
# Run 4-bit layers through torch's CPU int4 kernel. Off: on the 2-core AVX512 machine (torch 2.13.0+cpu) it took
# 1.3 ms against fp32 matmul's 0.08 ms at M = 1 and 680 ms against 6.7 ms at M = 512 for K=576, N=1536 in fp32 (in
# bf16 it was on par with bf16 matmul, itself slower there than fp32): dequantize_fast + matmul is faster.
USE_INT4 = False


def has_int4() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def int4_group(bits: int, group_size: int, k: int, n: int, bilevel=None) -> int | None:
    """The group size the torch int4 kernel runs this grid with (a divisor of group_size it takes), else None (also
    where N is not a multiple of 16, which its packing needs)."""
    if bits != 4 or bilevel is not None or k % 2 or n % 16 or not has_int4():
        return None
    return next((g for g in INT4_GROUPS if group_size % g == 0), None)


def pack_int4(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """The torch CPU int4 kernel's layout (uint8 [N, K / 2]) of 4-bit qweight int32 [K / 8, N]."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_codes(qweight, 4, k).t().contiguous(), 1)


def scale_zeros(scales: torch.Tensor, zeros: torch.Tensor, group_size: int, kernel_group: int) -> torch.Tensor:
    """fp32 [K / kernel_group, N, 2] of (scale, (8 - zero) * scale): the kernel computes (code - 8) * s + z'."""
    s = scales.float()
    sz = torch.stack([s, (8 - zeros.float()) * s], dim=-1)
    return sz.repeat_interleave(group_size // kernel_group, dim=0) if group_size != kernel_group else sz.contiguous()


def int4_matmul(x, packed, scales, zeros, *, group_size, kernel_group, perm=None, bias=None):
    """y [M, N] in x's dtype of x [M, K] and pack_int4's packed codes (fp32 inside)."""
    xs = x.float() if perm is None else x.float().index_select(1, perm.long())
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xs.contiguous(), packed, kernel_group,
                                                   scale_zeros(scales, zeros, group_size, kernel_group))
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def unpack_codes_u8(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """codes uint8 [K, N] of qweight int32 [ceil(K / epw), N] (unpack_codes' values), unpacked on bytes where the
    codes fill whole bytes (8 / 4 / 2-bit: 1 / 2 / 4 codes a byte, the words' bytes little-endian)."""
    rows, n = qweight.shape
    if bits not in (2, 4, 8) or qweight.stride(-1) != 1 or qweight.stride(0) != n:
        return unpack_codes(qweight, bits, k).to(torch.uint8)
    b = qweight.view(torch.uint8).view(rows, n, 4).transpose(1, 2)  # [row, byte j, n]: codes of k = epw row + ...
    if bits == 8:
        return b.reshape(rows * 4, n)[:k]
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8).view(1, 1, per, 1)
    codes = (b.unsqueeze(2) >> shifts) & (2**bits - 1)  # [row, byte, code in byte, n]
    return codes.reshape(rows * 32 // bits, n)[:k]


MAGIC = 0x4B000000  # float bits of 2^23: MAGIC | c (0 <= c < 2^23) is the float 2^23 + c
CHUNK_BYTES = 512 << 10  # int32 scratch of a K chunk at small M (L2: 2 MB a core here; 0.5-1 MB measured best)
WHOLE_BYTES = 2 << 20  # layers whose int32 codes fit this (L2 here) go whole: chunks measured slower there
SMALL_M = 32  # rows of x up to which packed_matmul goes chunk by chunk
_scratch = threading.local()
_SHIFTS: dict[int, torch.Tensor] = {}  # bits -> int32 [1, epw, 1] shift of each code position


def unpack_codes_i32(qweight: torch.Tensor, bits: int, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """codes int32 [K, N] of qweight int32 [ceil(K / epw), N] (unpack_codes' values): one broadcast shift and one and
    over the words (the sign-extended top code is masked like the others). out: int32 [ceil(K / epw), epw, N]."""
    rows, n = qweight.shape
    epw = values_per_word(bits)
    shifts = _SHIFTS.get(bits)
    if shifts is None:
        _SHIFTS[bits] = shifts = torch.arange(0, epw * bits, bits, dtype=torch.int32).view(1, epw, 1)
    if out is None:
        out = torch.empty(rows, epw, n, dtype=torch.int32)
    torch.bitwise_right_shift(qweight.unsqueeze(1), shifts, out=out)
    out.bitwise_and_(2**bits - 1)
    return out.view(rows * epw, n)[:k]


def _magic_zeros(zeros: torch.Tensor) -> torch.Tensor | None:
    """fp32 2^23 + zeros where that is exact for every zero (integers of magnitude below 2^22), else None."""
    z = zeros.float()
    zb = z + 2.0**23
    return zb if torch.equal(zb - 2.0**23, z) and bool((z.abs() < 2.0**22).all()) else None


def _dequantize_into(out: torch.Tensor, qweight, scales, zeros, bits: int, group_size: int, k: int,
                     zb: torch.Tensor | None) -> torch.Tensor:
    """fp32 [k, N] dequantized weight written over out (int32 [ceil(k / epw), epw, N]), viewed as float32."""
    n = qweight.shape[1]
    c = unpack_codes_i32(qweight, bits, k, out=out)
    if zb is None:  # zeros off the exact range of the exponent trick: convert, then subtract the zeros as they are
        w = c.to(torch.float32)
        w.view(k // group_size, group_size, n).sub_(zeros.float().unsqueeze(1))
    else:
        w = c.bitwise_or_(MAGIC).view(torch.float32)
        w.view(k // group_size, group_size, n).sub_(zb.unsqueeze(1))
    w.view(k // group_size, group_size, n).mul_(scales.float().unsqueeze(1))
    return w


def dequantize_fast(qweight, scales, zeros, bits: int, group_size: int, k: int) -> torch.Tensor:
    """dequantize_packed's fp32 [K, N], bit for bit, in 5 passes over [K, N] (shift, and, or, subtract, multiply)."""
    rows, n = qweight.shape
    out = torch.empty(rows, values_per_word(bits), n, dtype=torch.int32)
    return _dequantize_into(out, qweight, scales, zeros, bits, group_size, k, _magic_zeros(zeros))


def chunk_rows(bits: int, group_size: int, k: int, n: int) -> int:
    """K rows per chunk of the small-M path: whole groups and whole words, about CHUNK_BYTES of int32 (k: one chunk)."""
    step = math.lcm(values_per_word(bits), group_size)
    if k % step or 4 * k * n <= WHOLE_BYTES:
        return k
    chunks = -(-4 * k * n // CHUNK_BYTES)  # as many as CHUNK_BYTES needs, of equal size in whole steps
    return max(step, -(-(k // step) // chunks) * step)


def _scratch_buffer(numel: int) -> torch.Tensor:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        _scratch.buf = buf = torch.empty(numel, dtype=torch.int32)
    return buf


def packed_matmul(x, qweight, scales, zeros, *, bits: int, group_size: int, k: int, perm=None, bias=None):
    """y [M, N] in x's dtype = x @ dequantize_packed(...) (+ bias), computed in fp32 on the exact fp32 weight.
    M <= SMALL_M: K chunks (chunk_rows) dequantized into a reused thread-local scratch (one chunk's size, kept) and
    accumulated with addmm_; larger M, or no chunking (one group, K off whole words): the whole weight dequantized
    into a temporary (freed after), then one matmul."""
    xs = x.float() if perm is None else x.float().index_select(1, perm.long())
    m, n = xs.shape[0], qweight.shape[1]
    kc = chunk_rows(bits, group_size, k, n) if m <= SMALL_M else k
    if kc >= k:
        w = dequantize_fast(qweight, scales, zeros, bits, group_size, k)
        y = xs @ w if bias is None else torch.addmm(bias.float(), xs, w)
        return y.to(x.dtype)
    zb, epw = _magic_zeros(zeros), values_per_word(bits)
    y = bias.float().expand(m, n).clone() if bias is not None else torch.zeros(m, n)
    buf = _scratch_buffer(kc * n)
    for k0 in range(0, k, kc):  # chunk ends on whole words and groups: kc and k are multiples of lcm(epw, group)
        k1 = min(k, k0 + kc)
        r0, r1, g0, g1 = k0 // epw, k1 // epw, k0 // group_size, k1 // group_size
        w = _dequantize_into(buf[:(k1 - k0) * n].view(r1 - r0, epw, n), qweight[r0:r1], scales[g0:g1],
                             zeros[g0:g1], bits, group_size, k1 - k0, None if zb is None else zb[g0:g1])
        y.addmm_(xs[:, k0:k1], w)
    return y.to(x.dtype)


def bf16_matmul(x, w, *, perm=None, bias=None):
    """y in x's dtype of x [M, K] rounded to bf16 and a bf16 weight [K, N] (bf16 matmul, bf16 output; bias added in
    fp32): cache_weights="bfloat16"."""
    xs = x.bfloat16() if perm is None else x.bfloat16().index_select(1, perm.long())
    y = (xs @ w).float()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def bf16_packed_matmul(x, qweight, scales, zeros, *, bits: int, group_size: int, k: int, perm=None, bias=None,
                       int4=None):
    """PackedLinear.cpu_precision = "bfloat16" (opt-in; bf16 accuracy, no dequantized weight kept): y in x's dtype.
    M <= SMALL_M with int4 = (kernel_group, pack_int4's codes, scale_zeros in bf16): torch's CPU int4 kernel in bf16
    (dequantizes inside its tiles); larger M: the exact weight dequantized (dequantize_fast), rounded to bf16, one bf16
    matmul (AMX where the CPU has it); small M without int4 (not 4-bit, other groups): packed_matmul (fp32)."""
    m = x.shape[0]
    if m <= SMALL_M and int4 is None:
        return packed_matmul(x, qweight, scales, zeros, bits=bits, group_size=group_size, k=k, perm=perm, bias=bias)
    if m > SMALL_M:
        return bf16_matmul(x, dequantize_fast(qweight, scales, zeros, bits, group_size, k).bfloat16(), perm=perm,
                           bias=bias)
    xs = x.bfloat16() if perm is None else x.bfloat16().index_select(1, perm.long())
    kernel_group, packed, sz = int4
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xs.contiguous(), packed, kernel_group, sz).float()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def dense_matmul(x, w, *, perm=None, bias=None):
    """y of x [M, K] and an fp32 weight [K, N], as weight_only_matmul_ref computes it after dequantizing."""
    xs = x.float() if perm is None else x.float().index_select(1, perm.long())
    y = xs @ w if bias is None else torch.addmm(bias.float(), xs, w)
    return y.to(x.dtype)


__all__ = ["CHUNK_BYTES", "INT4_GROUPS", "MAGIC", "SMALL_M", "USE_INT4", "WHOLE_BYTES", "bf16_matmul",
           "bf16_packed_matmul", "chunk_rows", "dense_matmul", "dequantize_fast", "has_int4", "int4_group",
           "int4_matmul", "pack_int4", "packed_matmul", "scale_zeros", "unpack_codes_i32", "unpack_codes_u8"]

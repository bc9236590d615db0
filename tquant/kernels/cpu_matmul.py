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
    dequant   everything else (2 / 3 / 8-bit, other groups, bilevel): dequantize_fast (codes unpacked on bytes, then
              one convert, one subtract and one multiply in place, groups by broadcasting instead of the
              reference's gathered [K, N] scale and zero copies), then one fp32 matmul. Nothing is kept.
Optional (module.cache_weights = True, off by default): the dequantized fp32 weight [K, N] kept per layer, so every
forward is a plain matmul: the float model's memory (4 bytes a weight) on top of the packed one.
"""
from __future__ import annotations

import torch

from ..formats.packing import unpack_codes

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


def dequantize_fast(qweight, scales, zeros, bits: int, group_size: int, k: int) -> torch.Tensor:
    """dequantize_packed's fp32 [K, N] in fewer passes (codes on bytes, in-place float ops, broadcast groups)."""
    n = qweight.shape[1]
    w = unpack_codes_u8(qweight, bits, k).to(torch.float32)
    w.view(k // group_size, group_size, n).sub_(zeros.float().unsqueeze(1)).mul_(scales.float().unsqueeze(1))
    return w


def dense_matmul(x, w, *, perm=None, bias=None):
    """y of x [M, K] and an fp32 weight [K, N], as weight_only_matmul_ref computes it after dequantizing."""
    xs = x.float() if perm is None else x.float().index_select(1, perm.long())
    y = xs @ w if bias is None else torch.addmm(bias.float(), xs, w)
    return y.to(x.dtype)


__all__ = ["INT4_GROUPS", "USE_INT4", "dense_matmul", "dequantize_fast", "has_int4", "int4_group", "int4_matmul",
           "pack_int4", "scale_zeros", "unpack_codes_u8"]

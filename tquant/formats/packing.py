"""The one packer: integer codes <-> int32 words, packed along the input dimension K.

Layout ("K-packed", shared by every weight-only module and kernel):
    epw = 32 // bits                     values per int32 word (1->32, 2->16, 3->10, 4->8, 8->4; 1 bit: BCQ's
                                         binary planes, one packed array each)
    qweight: int32 [ceil(K / epw), N]
    code(k, n) = (qweight[k // epw, n] >> ((k % epw) * bits)) & (2^bits - 1)
Rows past K are padded with code 0. Words are contiguous along N so a tile of words for a block of
output columns is one coalesced load; 3-bit packs 10 codes per word (2 bits unused).
"""
from __future__ import annotations

import torch

from .quantizer import check_bits


def values_per_word(bits: int) -> int:
    if bits != 1:
        check_bits(bits)
    return 32 // bits


def pack_codes(codes: torch.Tensor, bits: int, checked: bool = True) -> torch.Tensor:
    """codes: integer [N, K] in [0, 2^bits) -> qweight int32 [ceil(K/epw), N]. checked=False skips the range
    check, for codes clamped by construction (the check reads the codes back to the host, which a CUDA graph
    capture cannot)."""
    epw = values_per_word(bits)
    n, k = codes.shape
    if checked and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    rows = -(-k // epw)
    padded = torch.zeros(n, rows * epw, dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes.to(torch.int64)
    shifts = torch.arange(epw, device=codes.device, dtype=torch.int64) * bits
    words = (padded.view(n, rows, epw) << shifts).sum(dim=-1)  # [N, rows], < 2^32
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32).t().contiguous()


def unpack_codes(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """qweight int32 [ceil(K/epw), N] -> codes int32 [K, N] (note: K-major, matching the packing)."""
    epw = values_per_word(bits)
    rows, n = qweight.shape
    shifts = torch.arange(epw, device=qweight.device, dtype=torch.int32) * bits
    codes = (qweight.unsqueeze(1) >> shifts.view(1, epw, 1)) & (2**bits - 1)
    return codes.reshape(rows * epw, n)[:k]


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                      k: int) -> torch.Tensor:
    """Float32 weight [K, N] of a packed one with scales, zeros [K // group_size, N]:
    w[k, n] = (code(k, n) - zeros[k // group_size, n]) * scales[k // group_size, n]."""
    g = torch.arange(k, device=qweight.device) // group_size
    return (unpack_codes(qweight, bits, k).float() - zeros.float()[g]) * scales.float()[g]


# ---- bit planes in byte-SWAR order (the WpAq bit-plane kernels, ABQ-LLM) ----
# A p-bit code tensor [N, K] is stored as p binary planes int32 [p, ceil(K / 32), N], plane i holding bit i of every
# code. Within a word, bit j holds k = 32 * word + 4 * (j % 8) + j // 8 (bits past K are 0). So (word >> s) &
# 0x01010101 puts the bits of k = 32 * word + 4 s + 0, 1, 2, 3 in bytes 0, 1, 2, 3: a kernel ORs p planes shifted by
# i into four byte-wide codes per int32 (one shift, and, shift, or per plane and 4 codes) instead of splitting each
# plane bit by bit. The order is one fixed permutation of K inside each 32-k word (PLANE_K), applied before
# pack_codes' 1-bit packing, so any two operands packed this way (weights, activation planes) line up bit for bit.
PLANE_K = [4 * (j % 8) + j // 8 for j in range(32)]  # bit j of a plane word -> k within the word


def pack_planes(codes: torch.Tensor, bits: int, checked: bool = True) -> torch.Tensor:
    """codes: integer [N, K] in [0, 2^bits), bits 1..8 -> planes int32 [bits, ceil(K / 32), N] in the order above.
    checked=False skips the range check (it reads the codes back to the host, which a CUDA graph capture cannot)."""
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is not supported for bit planes; use an integer in 1..8")
    if codes.dim() != 2 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be a 2-D integer tensor [N, K]; got {codes.dtype} of shape {tuple(codes.shape)}")
    if checked and codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit planes: expected values in [0, {2**bits})")
    n, k = codes.shape
    words = -(-k // 32)
    padded = torch.zeros(n, words * 32, dtype=torch.int32, device=codes.device)
    padded[:, :k] = codes.to(torch.int32)
    order = torch.tensor(PLANE_K, device=codes.device)
    ordered = padded.view(n, words, 32)[:, :, order].reshape(n, words * 32)  # column 32 w + j: k of bit j
    return torch.stack([pack_codes((ordered >> i) & 1, 1, checked=False) for i in range(bits)])


def unpack_planes(planes: torch.Tensor, k: int) -> torch.Tensor:
    """codes int32 [N, K] = sum_i bit_i << i of planes int32 [p, ceil(K / 32), N] (pack_planes' inverse), decoded as
    the kernels do: OR_i ((w_i >> s) & 0x01010101) << i holds in byte b the code of k = 32 w + 4 s + b (faster
    than splitting bit by bit; the torch references call this on every forward)."""
    p, words, n = planes.shape
    shifts = torch.arange(8, dtype=torch.int32, device=planes.device).view(8, 1, 1)
    v = torch.zeros(8, words, n, dtype=torch.int32, device=planes.device)  # [s, word, n]
    for i in range(p):
        v |= ((planes[i] >> shifts) & 0x01010101) << i
    codes = v.view(torch.uint8).view(8, words, n, 4)  # [s, word, n, byte b] (little-endian)
    return codes.permute(2, 1, 0, 3).reshape(n, words * 32)[:, :k].to(torch.int32)

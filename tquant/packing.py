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

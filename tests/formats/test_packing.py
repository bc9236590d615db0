"""The packer against plain bit-by-bit references of its layouts (K-packed int32 words and byte-SWAR bit planes), on
odd shapes, every width, codes at both ends of their range; and its errors. Written to kill the mutants of
tests/mutation.py that change a result."""
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tquant.formats.packing import (PLANE_K, dequantize_packed, pack_codes, pack_planes, unpack_codes, unpack_planes,
                                    values_per_word)

SEED = st.integers(0, 2**31 - 1)


def random_codes(n, k, bits, seed):
    """Codes in [0, 2^bits) with the top code in every row (so the top bit of some words is set) and a 0 too."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    codes[:, torch.randint(0, k, (1,), generator=g)] = 2**bits - 1
    codes[0, -1] = 2**bits - 1
    return codes


def ref_pack(codes, bits):
    epw = 32 // bits
    n, k = codes.shape
    rows = -(-k // epw)
    out = [[0] * n for _ in range(rows)]
    for c in range(n):
        for kk in range(k):
            out[kk // epw][c] |= int(codes[c, kk]) << ((kk % epw) * bits)
    return torch.tensor([[v - 2**32 if v >= 2**31 else v for v in row] for row in out], dtype=torch.int32)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 8]), n=st.integers(1, 5), k=st.integers(1, 70), seed=SEED)
def test_pack_codes_is_the_documented_layout(bits, n, k, seed):
    codes = random_codes(n, k, bits, seed)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.is_contiguous()
    assert torch.equal(packed, ref_pack(codes, bits))
    assert torch.equal(pack_codes(codes.int(), bits, checked=False), packed)
    back = unpack_codes(packed, bits, k)
    assert back.dtype == torch.int32 and torch.equal(back, codes.t().int())
    # unpack reads code(k, n) = (word >> (k % epw) * bits) & (2^bits - 1), also past K (padding: code 0)
    epw = 32 // bits
    full = unpack_codes(packed, bits, packed.shape[0] * epw)
    assert full.shape == (packed.shape[0] * epw, n) and not full[k:].any()


def test_values_per_word():
    assert [values_per_word(b) for b in (1, 2, 3, 4, 8)] == [32, 16, 10, 8, 4]
    for bits in (0, 5, 16, 32):
        with pytest.raises(ValueError, match=f"bits={bits} is not supported"):
            values_per_word(bits)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_codes_range_check(bits):
    top = torch.tensor([[0, 2**bits - 1]])
    assert torch.equal(unpack_codes(pack_codes(top, bits), bits, 2), top.t().int())
    for bad in (2**bits, -1):
        with pytest.raises(ValueError, match=rf"^codes out of range for {bits}-bit packing$"):
            pack_codes(torch.tensor([[1, bad]]), bits)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), n=st.integers(1, 5), groups=st.integers(1, 4),
       group_size=st.sampled_from([1, 5, 16, 32]), seed=SEED)
def test_dequantize_packed_matches_the_formula(bits, n, groups, group_size, seed):
    k = groups * group_size
    codes = random_codes(n, k, bits, seed)
    g = torch.Generator().manual_seed(seed + 1)
    scales = torch.rand(groups, n, generator=g) + 0.1
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g).float()
    w = dequantize_packed(pack_codes(codes, bits), scales, zeros, bits, group_size, k)
    assert w.shape == (k, n) and w.dtype == torch.float32
    ref = torch.tensor([[(float(codes[c, kk]) - float(zeros[kk // group_size, c])) * float(scales[kk // group_size, c])
                         for c in range(n)] for kk in range(k)])
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=0)


def ref_planes(codes, bits):
    n, k = codes.shape
    words = -(-k // 32)
    out = torch.zeros(bits, words, n, dtype=torch.int64)
    for i in range(bits):
        for w in range(words):
            for c in range(n):
                v = 0
                for j in range(32):
                    kk = 32 * w + PLANE_K[j]
                    if kk < k:
                        v |= ((int(codes[c, kk]) >> i) & 1) << j
                out[i, w, c] = v - 2**32 if v >= 2**31 else v
    return out.to(torch.int32)


def test_plane_order():
    assert PLANE_K[:9] == [0, 4, 8, 12, 16, 20, 24, 28, 1] and sorted(PLANE_K) == list(range(32))


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 3), k=st.integers(1, 70), seed=SEED)
def test_pack_planes_is_the_documented_layout(bits, n, k, seed):
    codes = random_codes(n, k, bits, seed)
    planes = pack_planes(codes, bits)
    assert planes.dtype == torch.int32 and planes.shape == (bits, -(-k // 32), n)
    assert torch.equal(planes, ref_planes(codes, bits))
    assert torch.equal(pack_planes(codes.int(), bits, checked=False), planes)
    back = unpack_planes(planes, k)
    assert back.dtype == torch.int32 and torch.equal(back, codes.int())


def test_unpack_planes_reads_all_eight_shifts():
    """Every k of a 32-k word, each at its byte: a code pattern with a distinct value per k."""
    codes = (torch.arange(64) * 37 % 256).view(1, 64)
    assert torch.equal(unpack_planes(pack_planes(codes, 8), 64), codes.int())
    assert torch.equal(unpack_planes(pack_planes(codes[:, :40] % 4, 2), 40), codes[:, :40].int() % 4)


def test_pack_planes_errors():
    codes = torch.tensor([[0, 3]])
    for bits in (0, 9, 2.0):
        with pytest.raises(ValueError, match=rf"^bits={bits} is not supported for bit planes; use an integer in 1\.\.8$"):
            pack_planes(codes, bits)
    for bad in (codes[0], codes.float(), codes.bool(), codes.view(1, 1, 2)):
        message = f"codes must be a 2-D integer tensor [N, K]; got {bad.dtype} of shape {tuple(bad.shape)}"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            pack_planes(bad, 2)
    for bad in (4, -1):
        with pytest.raises(ValueError, match=r"^codes out of range for 2-bit planes: expected values in \[0, 4\)$"):
            pack_planes(torch.tensor([[1, bad]]), 2)
    assert pack_planes(torch.tensor([[1, 4]]), 2, checked=False).shape == (2, 1, 1)
    empty = pack_planes(torch.zeros(3, 0, dtype=torch.int32), 4)
    assert empty.shape == (4, 0, 3) and unpack_planes(empty, 0).shape == (3, 0)


def test_the_packer_stays_on_the_inputs_device():
    """Every buffer is made on the codes' device (meta stands in for CUDA here: mixing it with a CPU tensor raises)."""
    codes = torch.empty(3, 70, dtype=torch.int32, device="meta")
    planes = pack_planes(codes, 3, checked=False)
    assert planes.device.type == "meta" and planes.shape == (3, 3, 3)
    assert unpack_planes(planes, 70).device.type == "meta"
    packed = pack_codes(codes, 4, checked=False)
    assert packed.device.type == "meta" and unpack_codes(packed, 4, 70).device.type == "meta"
    scales = torch.empty(5, 3, device="meta")
    assert dequantize_packed(packed, scales, scales, 4, 14, 70).device.type == "meta"


def test_plane_range_message_names_the_bound():
    with pytest.raises(ValueError, match=r"^codes out of range for 3-bit planes: expected values in \[0, 8\)$"):
        pack_planes(torch.tensor([[8, 1]]), 3)

"""The one quantizer and the one packer."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tquant.formats.packing import pack_codes, unpack_codes, values_per_word
from tquant.formats.quantizer import (check_bits, dequantize, expand_groups, grouped_qparams, qparams, quantize,
                              resolve_group_size)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), n=st.integers(1, 40), k=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_pack_unpack_roundtrip(bits, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    packed = pack_codes(codes, bits)
    epw = values_per_word(bits)
    assert packed.dtype == torch.int32 and packed.shape == (-(-k // epw), n)
    assert torch.equal(unpack_codes(packed, bits, k), codes.t().int())


def test_pack_layout_is_k_major_little_end_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15, 9]])  # 4-bit: word 0 holds k=0..7, code k at bits 4k
    packed = pack_codes(codes, 4)
    word0 = sum(int(c) << (4 * i) for i, c in enumerate(codes[0, :8]))
    assert packed[0, 0].item() == word0 - 2**32  # top bit set: stored as a negative int32
    assert packed[1, 0].item() == 9


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([[16]]), 4)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(), seed=st.integers(0, 2**31))
def test_roundtrip_error_is_at_most_half_a_step(bits, sym, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 8, 32, generator=g) * torch.rand(16, 8, 1, generator=g) + 0.3 * torch.randn(16, 8, 1, generator=g)
    scale, zero = qparams(w, bits, sym)
    q = quantize(w, scale[..., None], zero[..., None], bits)
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    err = (dequantize(q, scale[..., None], zero[..., None]) - w).abs()
    assert (err <= scale[..., None] / 2 + 1e-6).all()
    if sym:
        assert torch.all(zero == 2 ** (bits - 1))


def test_zero_rows_get_a_valid_grid():
    scale, zero = qparams(torch.zeros(3, 8), 4, sym=False)
    assert torch.all(scale > 0)
    q = quantize(torch.zeros(3, 8), scale[:, None], zero[:, None], 4)
    assert torch.all(dequantize(q, scale[:, None], zero[:, None]) == 0)


def test_groups_are_independent():
    w = torch.randn(4, 64)
    w[:, 32:] *= 100
    scale, _ = grouped_qparams(w, 4, 32, sym=True)
    assert scale.shape == (4, 2) and torch.all(scale[:, 1] > 20 * scale[:, 0])
    assert expand_groups(scale, 32).shape == (4, 64)


def test_group_size_errors_name_the_layer():
    assert resolve_group_size(-1, 576) == 576
    assert resolve_group_size(64, 576) == 64
    with pytest.raises(ValueError, match=r"group_size=128 does not divide in_features=576 of layer 'blk.q'"):
        resolve_group_size(128, 576, "blk.q")


@pytest.mark.parametrize("bits", [0, 5, 9, 16])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match=f"bits={bits} is not supported"):
        values_per_word(bits)


def test_one_bit_planes_pack_32_to_a_word():
    """1 bit: BCQ's binary planes (not a weight width: check_bits still refuses it)."""
    codes = torch.randint(0, 2, (3, 70), generator=torch.Generator().manual_seed(0))
    assert values_per_word(1) == 32 and pack_codes(codes, 1).shape == (3, 3)
    assert torch.equal(unpack_codes(pack_codes(codes, 1), 1, 70).t(), codes.int())
    with pytest.raises(ValueError, match="bits=1 is not supported"):
        check_bits(1)


def test_protective_range_is_qoqs_119_and_120_overflows():
    """Every int8 group in [-119, 119] dequantizes within int8 on the progressive grid; some group in [-120, 120]
    does not (lo = -120 with a small positive max: the rounded-up step times the zero reaches past -128)."""
    from tquant.formats.quantizer import level_one, protective_range

    assert protective_range() == 119

    def worst(p):
        lo, hi = torch.meshgrid(torch.arange(-p, 1.0), torch.arange(0, p + 1.0), indexing="ij")
        s2, z = level_one(torch.stack([lo, hi], dim=-1))
        deq = torch.stack([(torch.round(v / s2) + z).clamp(0, 15) - z for v in (lo, hi)]) * s2
        return deq.min().item(), deq.max().item()

    assert -128 <= worst(119)[0] and worst(119)[1] <= 127
    assert worst(120)[0] < -128 or worst(120)[1] > 127


def test_progressive_quantize_levels_and_clip():
    """Codes and zeros in 0..15, scale / channel_scale an integer >= 1, (c - z) * s2 in int8, the reconstruction
    about as close as plain asymmetric RTN, and a clip ratio below 1 shrinking the groups' steps."""
    from tquant.formats.quantizer import progressive_quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g) * 3
    w[:, 7] *= 25
    codes, scale, zero, channel = progressive_quantize(w, 64)
    s2 = scale / channel[:, None]
    assert torch.allclose(s2, s2.round()) and s2.min() >= 1
    assert codes.min() >= 0 and codes.max() <= 15 and zero.min() >= 0 and zero.max() <= 15
    w8 = (codes - zero.repeat_interleave(64, 1)) * s2.round().repeat_interleave(64, 1)
    assert w8.min() >= -128 and w8.max() <= 127
    deq = (codes - zero.repeat_interleave(64, 1)) * scale.repeat_interleave(64, 1)
    rtn_scale, rtn_zero = grouped_qparams(w, 4, 64, sym=False)
    rtn = dequantize(quantize(w, expand_groups(rtn_scale, 64), expand_groups(rtn_zero, 64), 4),
                     expand_groups(rtn_scale, 64), expand_groups(rtn_zero, 64))
    assert (deq - w).norm() < 1.2 * (rtn - w).norm()
    _, clipped, _, _ = progressive_quantize(w, 64, clip=0.6)
    wide = s2 >= 4  # groups whose step can shrink by 40 % in whole int8 units
    assert (clipped <= scale).all() and wide.any() and (clipped / scale)[wide].max() <= 0.8

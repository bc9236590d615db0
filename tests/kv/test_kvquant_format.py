"""KVQuant's format (tquant.kv.kvquant_format) against plain references of its documented maths: the uniform
codebook, the outlier count, ties between centroids, constant vectors, the byte count of nested parts and the RoPE
tables' dtypes. Written to kill the mutants of tests/mutation.py that change a result (tests/methods/test_kvquant.py
holds the round trips, layouts and the cache)."""
import math

import pytest
import torch

from tquant.kv import kvquant_format as fmt

INV_FREQ = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))


@pytest.mark.parametrize("bits", fmt.KVQUANT_BITS)
def test_uniform_codebook_is_the_evenly_spaced_grid_on_minus_one_one(bits):
    levels = 2**bits
    want = torch.tensor([-1 + 2 * i / (levels - 1) for i in range(levels)])
    assert torch.allclose(fmt.uniform_codebook(bits), want, atol=1e-7, rtol=0)


@pytest.mark.parametrize("fraction, d, n", [(0.0, 64, 0), (0.05, 20, 1), (0.1, 10, 1), (0.01, 128, 2),
                                            (0.25, 16, 4), (0.26, 16, 5), (0.1, 64, 7)])
def test_value_outliers_is_the_fraction_rounded_up(fraction, d, n):
    """ceil(fraction * D), where a product that is an integer in exact arithmetic (0.05 * 20, 0.1 * 10) stays it."""
    assert fmt.value_outliers(fraction, d) == n


def test_nbytes_counts_every_tensor_of_nested_parts():
    sparse = fmt.Sparse(torch.zeros(7, dtype=torch.int32), torch.zeros(5, dtype=torch.int16),
                        torch.zeros(5, dtype=torch.float16))
    keys = fmt.PackedKeys(torch.zeros(2, 3, 4, 2, dtype=torch.int32), sparse)
    assert fmt.nbytes(keys) == 2 * 3 * 4 * 2 * 4 + 7 * 4 + 5 * 2 + 5 * 2
    assert fmt.nbytes(fmt.PackedKeys(keys.codes, None)) == 2 * 3 * 4 * 2 * 4 and fmt.nbytes(None) == 0


def test_encode_sends_a_tie_to_the_lower_centroid_and_decodes_centroids():
    """xn exactly halfway between two centroids takes the lower one; every centroid itself comes back exactly."""
    book = torch.tensor([-1.0, -0.5, 0.25, 1.0])
    mids = (book[1:] + book[:-1]) / 2
    x = torch.cat([book, mids, torch.tensor([-3.0, 3.0])])
    codes = fmt._encode(x[None, :], book, 2)
    back = fmt._decode(codes, book, 2, x.numel())[0]
    assert torch.equal(back, torch.cat([book, book[:-1], book[[0, -1]]]))


@pytest.mark.parametrize("n_outliers", [0, 1])
def test_a_constant_value_vector_comes_back_exactly(n_outliers):
    """A vector of one value (and an all-zero one): scale 0 is stored as 1, offset the value, every code the
    centroid nearest 0, so with a codebook holding 0 the vector comes back exactly (not NaN from 0 / 0)."""
    v = torch.full((1, 2, 3, 8), 0.375)
    v[0, 1] = 0
    book = torch.tensor([-1.0, -0.25, 0.0, 0.5])
    pv = fmt.quantize_values(v, book, 2, n_outliers)
    assert torch.equal(pv.scale, torch.ones_like(pv.scale)) and torch.equal(pv.offset.float(), v[..., 0])
    assert torch.equal(fmt.dequantize_values(pv, book, 2, 8), v)


def test_rope_tables_are_float32_angles_in_the_asked_dtype():
    """cos and sin come in the dtype asked for, from angles computed in float32 whatever inv_freq's dtype (as
    transformers' rotary embedding computes them)."""
    positions = torch.tensor([[0, 1, 2047, 4093]])
    cos, sin = fmt.rope_cos_sin(positions, INV_FREQ, 1.5, torch.float16)
    assert cos.dtype == sin.dtype == torch.float16
    cos64, sin64 = fmt.rope_cos_sin(positions, INV_FREQ.double(), 1.5, torch.float32)
    cos32, sin32 = fmt.rope_cos_sin(positions, INV_FREQ, 1.5, torch.float32)
    assert torch.equal(cos64, cos32) and torch.equal(sin64, sin32)
    angle = positions[0, -1].item() * INV_FREQ[1].item()
    assert math.isclose(cos32[0, -1, 1].item(), 1.5 * math.cos(angle), abs_tol=5e-4)
    assert math.isclose(sin32[0, -1, 9].item(), 1.5 * math.sin(angle), abs_tol=5e-4)


def test_keys_exactly_at_the_calibrated_edge_stay_dense():
    """Outliers are the keys with |kn| > 1: a key exactly at offset +- scale (|kn| = 1) is in the calibrated range
    and stays dense; one ulp past it goes to the CSR part."""
    h, d = 2, 8
    p = fmt.LayerParams(torch.zeros(h, d), torch.full((h, d), 2.0), fmt.uniform_codebook(2), fmt.uniform_codebook(2))
    k = torch.zeros(1, h, 3, d)
    k[0, 0, 0, :4] = torch.tensor([2.0, -2.0, 1.0, -1.5])
    k[0, 1, 2, 5] = torch.nextafter(torch.tensor(2.0), torch.tensor(3.0))
    pk = fmt.quantize_keys(k, p, 2, outliers=True)
    assert pk.sparse.index.tolist() == [5] and pk.sparse.row_ptr.diff().nonzero().flatten().tolist() == [2 * h + 1]
    assert torch.equal(fmt.dequantize_keys(pk, p, 2)[0, 0, 0, :2], torch.tensor([2.0, -2.0]))


def test_value_outliers_are_the_entries_farthest_from_their_own_vectors_median():
    """The outlier of a vector is its entry farthest from that vector's median, which need not be its largest
    |v|: [100 .. 106, 0] keeps 0 as its outlier, [0 .. 0.6, 50] keeps 50; the dense range is the rest's."""
    v = torch.stack([torch.tensor([100.0, 101, 102, 103, 104, 105, 106, 0]),
                     torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 50])]).view(1, 2, 1, 8)
    offset, scale, mask = fmt.value_ranges(v, 1)
    assert mask[0, :, 0].nonzero()[:, 1].tolist() == [7, 7]
    assert torch.equal(offset[0, :, 0], torch.tensor([103.0, 0.3]).half())
    assert torch.equal(scale[0, :, 0], torch.tensor([3.0, 0.3]).half())
    pv = fmt.quantize_values(v, fmt.uniform_codebook(3), 3, 1)
    assert pv.sparse.channel.flatten().tolist() == [7, 7] and pv.sparse.value.flatten().tolist() == [0.0, 50.0]

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

"""KIVI's KV formats (tquant.kv.uniform_format) against a plain per-group reference of the documented layout: codes
chosen against the fp16 (scale, mn), packed word by word along each group; every width, odd group sizes (a group that
does not fill its last word), empty caches, the errors. Written to kill the mutants of tests/mutation.py that change a
result."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tquant.kv import uniform_format as uf


def lively(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 10 ** (torch.rand(shape[-1], generator=g) * 3 - 1)
    x = x + 5 * torch.randn(shape[-1], generator=g)
    x[..., 0] = 0.75  # a constant channel: scale 1, codes 0
    return x


def ref_group(v, bits):
    """(codes, scale, mn) of one group of values: min-max with the parameters rounded to fp16 first."""
    lo, hi = v.min(), v.max()
    scale = (hi - lo) / (2**bits - 1)
    scale = (scale if scale > 0 else torch.tensor(1.0)).half()
    mn = lo.half()
    return torch.round((v - mn.float()) / scale.float()).clamp(0, 2**bits - 1).long(), scale, mn


def ref_words(codes, bits, wpg):
    epw = 32 // bits
    words = [0] * wpg
    for i, c in enumerate(codes.tolist()):
        words[i // epw] |= c << ((i % epw) * bits)
    return [w - 2**32 if w >= 2**31 else w for w in words]


def ref_quantize(x, bits, group, axis):
    """Keys (axis -2: groups of tokens per channel) or values (axis -1: groups of channels per token)."""
    b, h, t, d = x.shape
    wpg = uf.words_per_group(bits, group)
    y = x if axis == -1 else x.transpose(-1, -2)  # [..., rows, n]: groups along the last dim
    rows, n = y.shape[-2], y.shape[-1]
    codes = torch.zeros(b, h, rows, n // group * wpg, dtype=torch.int32)
    scale = torch.zeros(b, h, rows, n // group, dtype=torch.float16)
    mn = torch.zeros_like(scale)
    for i in range(b):
        for j in range(h):
            for r in range(rows):
                for gi in range(n // group):
                    q, s, m = ref_group(y[i, j, r, gi * group:(gi + 1) * group], bits)
                    codes[i, j, r, gi * wpg:(gi + 1) * wpg] = torch.tensor(ref_words(q, bits, wpg), dtype=torch.int32)
                    scale[i, j, r, gi], mn[i, j, r, gi] = s, m
    if axis == -2:
        codes, scale, mn = (t.transpose(-1, -2) for t in (codes, scale, mn))
    return codes, scale, mn


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from(uf.KV_BITS), group=st.sampled_from([3, 4, 12, 16, 32]), groups=st.integers(1, 2),
       heads=st.integers(1, 2), seed=st.integers(0, 2**31 - 1))
def test_kv_formats_are_the_documented_layout(bits, group, groups, heads, seed):
    for quantize, dequantize, axis in ((uf.quantize_keys, uf.dequantize_keys, -2),
                                       (uf.quantize_values, uf.dequantize_values, -1)):
        shape = (2, heads, groups * group, 5) if axis == -2 else (2, heads, 3, groups * group)
        x = lively(shape, seed)
        p = quantize(x, bits, group)
        codes, scale, mn = ref_quantize(x, bits, group, axis)
        assert p.codes.is_contiguous() and p.scale.is_contiguous() and p.mn.is_contiguous()
        assert p.codes.dtype == torch.int32 and p.scale.dtype == p.mn.dtype == torch.float16
        assert torch.equal(p.codes, codes) and torch.equal(p.scale, scale) and torch.equal(p.mn, mn)
        back = dequantize(p, bits, group)
        wide = lambda t: t.float().repeat_interleave(group, dim=axis)  # noqa: E731
        step, low = wide(scale), wide(mn)
        assert back.dtype == torch.float32 and back.shape == x.shape
        torch.testing.assert_close(back, torch.round((x - low) / step).clamp(0, 2**bits - 1) * step + low,
                                   rtol=0, atol=0)


def test_words_per_group_and_nbytes():
    assert [uf.words_per_group(b, 32) for b in uf.KV_BITS] == [2, 4, 4, 8]
    assert [uf.words_per_group(b, 12) for b in uf.KV_BITS] == [1, 2, 2, 3]
    p = uf.quantize_values(lively((1, 2, 3, 16), 0), 4, 16)
    assert p.nbytes() == 1 * 2 * 3 * 2 * 4 + 2 * (1 * 2 * 3 * 1 * 2)


@pytest.mark.parametrize("bits", uf.KV_BITS)
def test_empty_caches(bits):
    k = torch.zeros(2, 3, 0, 8)
    for quantize, dequantize, shapes in ((uf.quantize_keys, uf.dequantize_keys, [(2, 3, 0, 8)] * 3),
                                         (uf.quantize_values, uf.dequantize_values,
                                          [(2, 3, 0, 2 * uf.words_per_group(bits, 4)), (2, 3, 0, 2), (2, 3, 0, 2)])):
        p = quantize(k, bits, 4)
        assert [tuple(t.shape) for t in p] == shapes
        assert [t.dtype for t in p] == [torch.int32, torch.float16, torch.float16]
        back = dequantize(p, bits, 4)
        assert back.shape == (2, 3, 0, 8) and back.dtype == torch.float32


def test_errors_name_the_problem():
    x = lively((1, 1, 8, 8), 1)
    with pytest.raises(ValueError, match=r"^kv_bits=5 is not supported; choose one of \(2, 3, 4, 8\)$"):
        uf.quantize_keys(x, 5, 4)
    with pytest.raises(ValueError, match=r"^kv_bits=1 is not supported; choose one of \(2, 3, 4, 8\)$"):
        uf.quantize_values(x, 1, 4)
    with pytest.raises(ValueError, match=r"^keys are quantized in whole groups of 3 tokens; got 8 tokens$"):
        uf.quantize_keys(x, 4, 3)
    with pytest.raises(ValueError, match=r"^values are quantized in groups of 3 channels, which must divide "
                                         r"head_dim=8$"):
        uf.quantize_values(x[:, :, :5], 4, 3)  # 5 tokens of 8 channels: the message names the channels
    with pytest.raises(ValueError, match=r"^key_axis must be 'channel' \(KIVI\) or 'token'; got 'tokens'$"):
        uf.key_format("tokens")


def test_key_format_and_concat():
    assert uf.KEY_AXES == ("channel", "token")
    assert uf.key_format("channel") == (uf.quantize_keys, uf.dequantize_keys)
    quantize, dequantize = uf.key_format("token")  # the values' layout, errors naming the keys
    assert quantize.func is uf.quantize_values and quantize.keywords == {"what": "keys"}
    assert dequantize is uf.dequantize_values
    x = lively((2, 1, 24, 16), 2)
    for quantize in (uf.quantize_keys, uf.quantize_values):
        whole = quantize(x, 3, 8)
        parts = uf.concat([quantize(x[:, :, :8], 3, 8), quantize(x[:, :, 8:], 3, 8)], dim=-2)
        assert all(torch.equal(a, b) for a, b in zip(whole, parts))


@pytest.mark.parametrize("bits", uf.KV_BITS)
def test_a_single_group_comes_back(bits):
    """One token, one group of channels: one (scale, mn) in all (not the empty cache)."""
    v = lively((1, 1, 1, 8), 3)
    p = uf.quantize_values(v, bits, 8)
    assert p.scale.numel() == 1
    _, scale, mn = ref_quantize(v, bits, 8, -1)
    back = uf.dequantize_values(p, bits, 8)
    torch.testing.assert_close(back, torch.round((v - mn.float()) / scale.float()).clamp(0, 2**bits - 1)
                               * scale.float() + mn.float(), rtol=0, atol=0)
    assert (back - v).abs().max() <= scale.float() / 2 + 1e-3 * v.abs().max()


def test_the_range_check_is_skipped_while_a_graph_is_captured(monkeypatch):
    """check_fp16_params raises for a bf16 group past fp16's range, except while capturing (no host sync there):
    then the parameters are stored as they come (inf), for the static cache's check_range to find."""
    x = lively((1, 1, 4, 8), 4).to(torch.bfloat16)
    x[0, 0, 1, 3] = -2.0**17
    with pytest.raises(ValueError, match=r"^KIVI's cache format keeps each group's scale and minimum in fp16 \(at most "
                                         r"65504\), and a group of the torch.bfloat16 values spans \[-1.311e\+05, "):
        uf.quantize_values(x, 4, 8)
    with pytest.raises(ValueError, match=r"and a group of the torch.bfloat16 keys spans \[-1.311e\+05, "):
        uf.quantize_keys(x, 4, 4)
    assert not uf.capturing(x)  # CPU tensors: never
    monkeypatch.setattr(uf, "capturing", lambda t: True)
    p = uf.quantize_values(x, 4, 8)
    assert p.mn[0, 0, 1, 0] == float("-inf") and p.mn[0, 0, [0, 2, 3]].isfinite().all()


@pytest.mark.parametrize("bits", uf.KV_BITS)
def test_stored_params_error_names_the_first_bad_group_and_its_range(bits):
    """None while every stored scale and minimum is finite; else the error for the first group (in index order) whose
    scale or minimum is not, its place from place(index) and its range bounded by the parameters: a -inf minimum lay
    below -65504, an inf step over the finite minimum m reaches past m + 65504 (2^bits - 1), NaN is NaN."""
    scale, mn = torch.full((2, 3, 4), 0.5, dtype=torch.float16), torch.full((2, 3, 4), -1.0, dtype=torch.float16)
    place = lambda i: f"at {i}"  # noqa: E731
    assert uf.stored_params_error(scale, mn, bits, torch.bfloat16, "keys", place) is None
    scale[1, 2, 3] = float("inf")
    mn[1, 2, 3] = 3.0
    error = uf.stored_params_error(scale, mn, bits, torch.float32, "values", place)
    assert str(error) == ("KIVI's cache format keeps each group's scale and minimum in fp16 (at most 65504), and a group "
                          f"of the torch.float32 values (at (1, 2, 3)) spans [3, above {3 + 65504 * (2**bits - 1):.6g}], "
                          "past it: keep this model's KV cache in float (no kivi / qoq KV cache) or its keys and values "
                          "within fp16's range")
    mn[1, 0, 2] = float("-inf")
    error = uf.stored_params_error(scale, mn, bits, torch.bfloat16, "keys", place)
    assert "group of the torch.bfloat16 keys (at (1, 0, 2)) has a minimum below -65504, past it" in str(error)
    mn[0, 1, 0] = float("inf")
    assert "(at (0, 1, 0)) has a minimum above 65504" in str(uf.stored_params_error(scale, mn, bits, torch.float32,
                                                                                   "keys", place))
    scale[0, 0, 1] = float("nan")
    assert "(at (0, 0, 1)) holds NaN" in str(uf.stored_params_error(scale, mn, bits, torch.float32, "keys", place))

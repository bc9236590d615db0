"""The quantizer's formulas against plain per-row references (the module docstring's equations written out one row at a
time), on random shapes, every bit width and group size, and values from 1e-6 to 1e4; plus the group-size helpers and
their messages. Written to kill the mutants of tests/mutation.py that change a result."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tquant.formats import quantizer as qz

BITS = st.sampled_from(qz.SUPPORTED_BITS)
SEED = st.integers(0, 2**31 - 1)


def lively(shape, seed, *, kinds=True):
    """Random float32 values of one magnitude per row (10^-6 .. 10^4), offset per row, with (kinds) some rows all
    positive, all negative, constant or zero: each branch of the range logic."""
    g = torch.Generator().manual_seed(seed)
    rows = math.prod(shape[:-1])
    mag = 10 ** (torch.rand(rows, 1, generator=g) * 10 - 6)
    x = (torch.randn(rows, shape[-1], generator=g) + torch.randn(rows, 1, generator=g)) * mag
    if kinds and rows >= 7:
        x[0] = x[0].abs() + mag[0]  # all positive: the range is [0, max]
        x[1] = -x[1].abs() - mag[1]  # all negative: [min, 0]
        x[2] = 0.0  # flat: the [-1, 1] fallback
        x[3] = mag[3] * 3  # constant positive
        x[4] = -mag[4] * 2  # constant negative
        x[5] = torch.randn(shape[-1], generator=g) * 1e-44  # a subnormal range: flat too
        x[6] = torch.where(torch.arange(shape[-1]) % 2 == 0, 3e38, -2.9e38)  # max - min past fp32's max
    return x[torch.randperm(rows, generator=g)].reshape(shape)


def ref_qparams(w, bits, sym):
    maxq = 2**bits - 1
    rows = w.float().reshape(-1, w.shape[-1])
    scale, zero = torch.empty(len(rows)), torch.empty(len(rows))
    for i, r in enumerate(rows):
        lo, hi = torch.minimum(r.min(), torch.tensor(0.0)), torch.maximum(r.max(), torch.tensor(0.0))
        if sym:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        if hi - lo < torch.finfo(torch.float32).tiny * (maxq + 1):  # 0 or subnormal: [-1, 1]
            lo, hi = torch.tensor(-1.0), torch.tensor(1.0)
        scale[i] = (hi - lo) / maxq
        if scale[i].isinf():  # a range wider than fp32's max: the step without the overflowing difference
            scale[i] = hi / maxq - lo / maxq
        zero[i] = 2 ** (bits - 1) if sym else torch.round(-lo / scale[i])
    return scale.reshape(w.shape[:-1]), zero.reshape(w.shape[:-1])


@settings(max_examples=30, deadline=None)
@given(bits=BITS, sym=st.booleans(), lead=st.lists(st.integers(1, 5), min_size=1, max_size=2), n=st.integers(1, 40),
       seed=SEED)
def test_qparams_quantize_dequantize_match_the_formulas(bits, sym, lead, n, seed):
    w = lively((*lead, 7, n), seed)
    scale, zero = qz.qparams(w, bits, sym)
    ref_scale, ref_zero = ref_qparams(w, bits, sym)
    assert scale.shape == zero.shape == w.shape[:-1] and scale.dtype == zero.dtype == torch.float32
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
    torch.testing.assert_close(zero, ref_zero, rtol=0, atol=0)
    # the codes of a tighter grid: both clamps are reached
    s, z = scale[..., None] / 3, zero[..., None]
    q = qz.quantize(w, s, z, bits)
    ref_q = (torch.round(w / s) + z).clamp(0, 2**bits - 1)
    assert q.dtype == torch.int32 and torch.equal(q, ref_q.int())
    assert torch.equal(qz.dequantize(q, s, z), (ref_q - z) * s)


def test_quantize_clamps_at_both_ends_and_zero_rows_come_back():
    for bits in qz.SUPPORTED_BITS:
        maxq = 2**bits - 1
        w = torch.tensor([[-1e4, -3.0, 0.4, 2.6, 1e4]])
        q = qz.quantize(w, torch.tensor([[1.0]]), torch.tensor([[2.0]]), bits)
        assert q.tolist() == [[0, 0, 2, min(5, maxq), maxq]]
        scale, zero = qz.qparams(torch.zeros(2, 3), bits, sym=False)
        step = torch.tensor(2.0) / maxq  # the range [-1, 1]
        assert torch.equal(scale, step.expand(2)) and torch.equal(zero, torch.round(1 / step).expand(2))


def test_check_bits_message():
    qz.check_bits(3)
    with pytest.raises(ValueError, match=r"^bits=5 is not supported for weights; choose one of \(2, 3, 4, 8\)$"):
        qz.check_bits(5)


@settings(max_examples=30, deadline=None)
@given(bits=BITS, sym=st.booleans(), n=st.integers(1, 6), groups=st.integers(1, 4),
       group_size=st.sampled_from([1, 3, 8, 32, 128]), seed=SEED)
def test_grouped_qparams_and_expand_groups(bits, sym, n, groups, group_size, seed):
    w = lively((n, groups * group_size), seed, kinds=False)
    scale, zero = qz.grouped_qparams(w, bits, group_size, sym)
    ref_scale, ref_zero = ref_qparams(w.reshape(n, groups, group_size), bits, sym)
    assert scale.shape == (n, groups)
    torch.testing.assert_close((scale, zero), (ref_scale, ref_zero), rtol=0, atol=0)
    wide = qz.expand_groups(scale, group_size)
    assert wide.shape == (n, groups * group_size)
    assert all(torch.equal(wide[:, c], scale[:, c // group_size]) for c in range(groups * group_size))


@settings(max_examples=30, deadline=None)
@given(bits=BITS, dim=st.sampled_from([-1, -2, 0]), param_dtype=st.sampled_from([torch.float32, torch.float16]),
       shape=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 9)), seed=SEED)
def test_minmax_quantize_matches_the_formula(bits, dim, param_dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    # magnitudes 1e-2 .. 1e3 per slice, inside fp16's normal range (the stored parameters)
    x = (torch.randn(shape, generator=g) + torch.randn(shape[:-1], generator=g)[..., None]) * 10 ** (
        torch.rand(shape[:-1], generator=g)[..., None] * 5 - 2)
    x.movedim(dim, -1)[(0,) * (x.dim() - 1)].fill_(1.5)  # one slice constant along dim: scale 1, codes 0
    q, scale, mn = qz.minmax_quantize(x, bits, dim, param_dtype)
    moved = x.movedim(dim, -1)
    lo, hi = moved.amin(-1, keepdim=True), moved.amax(-1, keepdim=True)
    ref_scale = (hi - lo) / (2**bits - 1)
    ref_scale = torch.where(ref_scale > 0, ref_scale, torch.ones_like(ref_scale)).to(param_dtype)
    ref_mn = lo.to(param_dtype)
    ref_q = torch.round((moved - ref_mn.float()) / ref_scale.float()).clamp(0, 2**bits - 1)
    assert q.dtype == torch.int32 and scale.dtype == mn.dtype == param_dtype and q.shape == x.shape
    assert scale.shape == mn.shape == tuple(1 if d == dim % x.dim() else s for d, s in enumerate(x.shape))
    torch.testing.assert_close(scale.movedim(dim, -1), ref_scale, rtol=0, atol=0)
    torch.testing.assert_close(mn.movedim(dim, -1), ref_mn, rtol=0, atol=0)
    assert torch.equal(q.movedim(dim, -1), ref_q.int())
    back = qz.minmax_dequantize(q, scale, mn)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, q.float() * scale.float() + mn.float(), rtol=0, atol=0)


def test_minmax_constant_slices_come_back_exactly():
    x = torch.tensor([[2.5, 2.5, 2.5], [-7.0, -7.0, -7.0], [1.0, 3.0, 2.0]])
    q, scale, mn = qz.minmax_quantize(x, 2, dim=-1)
    assert torch.equal(scale.flatten(), torch.tensor([1.0, 1.0, 2.0]) / torch.tensor([1.0, 1.0, 3.0])) and q[:2].abs().sum() == 0 and q[2].tolist() == [0, 3, 2]
    torch.testing.assert_close(qz.minmax_dequantize(q, scale, mn)[:2], x[:2], rtol=0, atol=0)


def ref_level_one(w8, bits, clip):
    """One row at a time, in float32 like the quantizer (a clip ratio of 0.7 is not exact)."""
    maxq = 2**bits - 1
    rows = w8.float().reshape(-1, w8.shape[-1])
    clips = torch.as_tensor(clip, dtype=torch.float32).expand(w8.shape[:-1]).reshape(-1)
    s2, z = torch.empty(len(rows)), torch.empty(len(rows))
    for i, (r, c) in enumerate(zip(rows, clips)):
        lo = torch.minimum(r.min(), torch.tensor(0.0)) * c
        hi = torch.maximum(r.max(), torch.tensor(0.0)) * c
        s2[i] = torch.maximum(torch.ceil((hi - lo) / maxq - 1e-6), torch.tensor(1.0))
        z[i] = torch.round(-lo / s2[i]).clamp(0, maxq)
    return s2.reshape(w8.shape[:-1]), z.reshape(w8.shape[:-1])


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), n=st.integers(1, 40), clip=st.sampled_from([1.0, 0.5, "rows"]), seed=SEED)
def test_level_one_matches_the_formula(bits, n, clip, seed):
    g = torch.Generator().manual_seed(seed)
    w8 = torch.randint(-119, 120, (7, n), generator=g).float()
    w8[0, :2] = torch.tensor([-15.0, 15.0])[:n]  # range exactly 2 * 15: s2 = 2, not 3 (the - 1e-6)
    w8[1] = w8[1].abs() + 1  # all positive: zero 0
    w8[2] = -w8[2].abs() - 1  # all negative: zero maxq
    w8[3] = 0.0  # flat: s2 1
    w8[4] = torch.randint(-3, 4, (n,), generator=g).float()  # a narrow range: s2 = 1
    clip = torch.rand(7, generator=g) * 0.5 + 0.5 if clip == "rows" else clip
    s2, z = qz.level_one(w8, bits, clip)
    ref_s2, ref_z = ref_level_one(w8, bits, clip)
    torch.testing.assert_close(s2, ref_s2, rtol=0, atol=0)
    torch.testing.assert_close(z, ref_z, rtol=0, atol=0)
    assert s2[3] == 1 and z[1] == 0


def test_level_one_default_is_four_bits():
    w8 = torch.tensor([[-119.0, 60.0], [-30.0, 0.0]])
    torch.testing.assert_close(qz.level_one(w8), ref_level_one(w8, 4, 1.0), rtol=0, atol=0)
    assert qz.level_one(w8)[0].tolist() == [12.0, 2.0]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), groups=st.integers(1, 3), group_size=st.sampled_from([4, 16, 32]), protect=st.sampled_from(
    [None, 119, 60]), clip=st.sampled_from([1.0, 0.7]), seed=SEED)
def test_progressive_quantize_matches_the_formula(n, groups, group_size, protect, clip, seed):
    w = lively((n, groups * group_size), seed, kinds=False)
    w[0, 0] = 0.0
    if n > 1:
        w[1] = 0.0  # a zero row: s1 is the smallest normal float, codes the zero point
    codes, scale, zero, channel = qz.progressive_quantize(w, group_size, protect, clip=clip)
    p = 119 if protect is None else protect
    s1 = (w.abs().amax(1) / p).clamp_min(torch.finfo(torch.float32).tiny)
    w8 = torch.round(w / s1[:, None]).clamp(-p, p).reshape(n, groups, group_size)
    s2, z = ref_level_one(w8, 4, clip)
    ref_codes = (torch.round(w8 / s2[..., None]) + z[..., None]).clamp(0, 15).reshape(n, -1)
    assert codes.dtype == torch.int32 and torch.equal(codes, ref_codes.int())
    torch.testing.assert_close(channel, s1, rtol=0, atol=0)
    torch.testing.assert_close(zero, z, rtol=0, atol=0)
    torch.testing.assert_close(scale, s2 * s1[:, None], rtol=0, atol=0)
    assert torch.isfinite(scale).all()


def test_progressive_quantize_other_bits():
    w = lively((3, 16), 5, kinds=False)
    codes, scale, zero, channel = qz.progressive_quantize(w, 8, protect=100, bits=3)
    w8 = torch.round(w / channel[:, None]).clamp(-100, 100).reshape(3, 2, 8)
    s2, z = ref_level_one(w8, 3, 1.0)
    assert codes.max() <= 7 and torch.equal(codes, (torch.round(w8 / s2[..., None]) + z[..., None]).clamp(0, 7)
                                            .reshape(3, 16).int())


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), groups=st.integers(0, 5), max_mult=st.sampled_from([15, 7]), seed=SEED)
def test_integer_group_scales_and_channel_scale(n, groups, max_mult, seed):
    g = torch.Generator().manual_seed(seed)
    gs = 10 ** (torch.rand(n, max(groups, 1), generator=g) * 6 - 3)
    if groups == 0:
        gs = gs[:, 0]  # a per-channel scale [N]
    c = qz.channel_scale_for_groups(gs.reshape(n, -1), max_mult)
    ref_c = gs.reshape(n, -1).amax(1) / max_mult
    torch.testing.assert_close(c, ref_c, rtol=0, atol=0)
    c2 = c * torch.where(torch.arange(n) % 2 == 0, 1.0, 0.2)  # some rows whose groups exceed max_mult * c
    out = qz.integer_group_scales(gs, c2, max_mult)
    cb = c2.view(-1, *[1] * (gs.dim() - 1))
    torch.testing.assert_close(out, cb * torch.ceil(gs / cb).clamp(1, max_mult), rtol=0, atol=0)
    assert out.shape == gs.shape
    if max_mult == 15:
        assert torch.equal(qz.integer_group_scales(gs, c2), out)
        torch.testing.assert_close(qz.channel_scale_for_groups(gs.reshape(n, -1)), ref_c, rtol=0, atol=0)


def test_channel_scale_of_zero_groups_is_positive():
    c = qz.channel_scale_for_groups(torch.zeros(2, 3))
    assert (c > 0).all() and torch.equal(c, torch.full((2,), torch.finfo(torch.float32).tiny / 15))
    assert torch.equal(qz.integer_group_scales(torch.tensor([[0.3, 3.0]]), torch.tensor([1.0])),
                       torch.tensor([[1.0, 3.0]]))


def ref_fit(ks, start):
    sizes = [g for g in (128, 64, 32) if g <= start]
    chosen = next((g for g in sizes if all(k % g == 0 for k in ks)), -1)
    return chosen, sizes


@settings(max_examples=60, deadline=None)
@given(ks=st.lists(st.integers(1, 64).map(lambda m: m * 16), min_size=1, max_size=4),
       start=st.sampled_from([128, 64, 32, 100]))
def test_fit_group_size_matches_the_reference(ks, start):
    chosen, sizes = ref_fit(ks, start)
    got, line = qz.fit_group_size(ks, start)
    assert got == chosen
    listed = "/".join(map(str, sizes))
    if chosen == start:
        assert line == ""
    elif chosen == -1:
        worst = next(k for k in sorted(set(ks)) if k % sizes[-1])
        assert line == (f"group_size -1 (per channel): none of {listed} divides every layer's in_features ({worst} is "
                        f"not a multiple of {sizes[-1]})")
    else:
        bad = next((k for k in sorted(set(ks)) if k % start), None)
        why = f"{bad} is not a multiple of {start}" if bad is not None else f"{start} is not one of them"
        assert line == f"group_size {chosen}: the largest of {listed} dividing every layer's in_features ({why})"


def test_fit_group_size_default_start_and_examples():
    assert qz.fit_group_size([576, 1536]) == (64, "group_size 64: the largest of 128/64/32 dividing every layer's "
                                                  "in_features (576 is not a multiple of 128)")
    assert qz.fit_group_size((4096, 11008)) == (128, "")
    assert qz.fit_group_size([400], 100) == (-1, "group_size -1 (per channel): none of 64/32 divides every layer's "
                                                 "in_features (400 is not a multiple of 32)")
    assert qz.fit_group_size([6400], 100) == (64, "group_size 64: the largest of 64/32 dividing every layer's "
                                                  "in_features (100 is not one of them)")
    assert qz.fit_group_size([192, 128]) == (64, "group_size 64: the largest of 128/64/32 dividing every layer's "
                                                 "in_features (192 is not a multiple of 128)")
    assert qz.fit_group_size([1024, 80, 48]) == (-1, "group_size -1 (per channel): none of 128/64/32 divides every "
                                                     "layer's in_features (48 is not a multiple of 32)")


def test_resolve_group_size():
    for per_channel in (-1, 0, None, -128):
        assert qz.resolve_group_size(per_channel, 96) == 96
    assert qz.resolve_group_size(96, 96) == 96 and qz.resolve_group_size(1, 7) == 1
    with pytest.raises(ValueError) as e:
        qz.resolve_group_size(64, 96 * 5)
    assert str(e.value) == ("group_size=64 does not divide in_features=480; use per-channel (-1) or a divisor such as "
                            "[16, 32, 48, 96]")
    with pytest.raises(ValueError) as e:
        qz.resolve_group_size(100, 768, "m.proj")
    assert str(e.value) == ("group_size=100 does not divide in_features=768 of layer 'm.proj'; use per-channel (-1) or "
                            "a divisor such as [16, 32, 48, 64, 96, 128, 192, 256]")


def test_integer_group_scales_edge_cases():
    """A zero group scale still gets one multiple of c (the clamp's lower end); the result keeps the group scales'
    dtype whatever the channel scale's."""
    out = qz.integer_group_scales(torch.tensor([[0.0, 2.5, 100.0]]), torch.tensor([1.0], dtype=torch.float64))
    assert out.dtype == torch.float32 and out.tolist() == [[1.0, 3.0, 15.0]]


@pytest.mark.parametrize("bits", [2, 8])
def test_minmax_codes_clamp_when_fp16_parameters_move_the_range(bits):
    """A large offset with a small spread: the fp16 minimum lies up to half an fp16 step (0.25 at 1000) away from the
    true one, more than half a quantization step, so unclamped codes would leave [0, 2^bits) at both ends."""
    g = torch.Generator().manual_seed(bits)
    x = 1000 + torch.rand(64, 1, generator=g) * 0.5 + torch.rand(64, 16, generator=g) * 0.1
    q, scale, mn = qz.minmax_quantize(x, bits, dim=-1, param_dtype=torch.float16)
    raw = torch.round((x - mn.float()) / scale.float())
    assert raw.min() < 0 and raw.max() > 2**bits - 1  # the case is real, at both ends
    assert torch.equal(q, raw.clamp(0, 2**bits - 1).int())


def test_extreme_ranges_get_finite_grids():
    """A range below fp32's normal numbers is flat ([-1, 1]); one wider than fp32's max keeps a finite step; in
    minmax_quantize a step that is 0 in the parameter dtype becomes 1 (codes 0)."""
    for bits in qz.SUPPORTED_BITS:
        maxq = 2**bits - 1
        for sym in (False, True):
            tiny = torch.finfo(torch.float32).tiny * (maxq + 1)
            w = torch.tensor([[1e-45, -1e-45, 0.0], [tiny * 1.01, 0.0, 0.0], [tiny * 0.49, 0.0, 0.0],
                              [3e38, -3e38, 1.0], [3e38, 1.0, 0.0]])
            scale, zero = qz.qparams(w, bits, sym)
            torch.testing.assert_close((scale, zero), ref_qparams(w, bits, sym), rtol=0, atol=0)
            assert torch.isfinite(scale).all() and (scale > 0).all() and torch.isfinite(zero).all()
            assert scale[0] == scale[2] == torch.tensor(2.0) / maxq and scale[1] < 1e-30
            # exactly at the bound the step tiny * (maxq + 1) / maxq is still a normal number: not flat
            edge = torch.tensor([[tiny, 0.0]]) if not sym else torch.tensor([[tiny / 2, 0.0]])
            assert torch.equal(qz.qparams(edge, bits, sym)[0], torch.tensor([tiny]) / maxq)
            assert scale[3] == torch.tensor(3e38) / maxq * 2 or scale[3] == torch.tensor(3e38) / maxq + torch.tensor(
                3e38) / maxq
    x = torch.tensor([[1e-8, 2e-8, 3e-8], [3e38, -3e38, 0.0]])
    q, scale, mn = qz.minmax_quantize(x, 4, dim=-1, param_dtype=torch.float16)
    assert scale[0].item() == 1.0 and q[0].tolist() == [0, 0, 0]  # a step of 1.3e-9: 0 in fp16
    q, scale, mn = qz.minmax_quantize(x, 4, dim=-1)
    assert torch.isfinite(scale).all() and scale[1].item() == (torch.tensor(3e38) / 15 * 2).item()
    assert q[1].tolist() == [15, 0, 8]


def test_code_range_within_dtype_keeps_the_points_the_dtype_holds():
    """(lo, hi) against the points by hand: fp16's largest value 65504 cuts the symmetric 2-bit grid of a 6e4
    outlier (scale 4e4, zero 2: points -8e4 .. 4e4) to codes 1 .. 3, and its 3-bit one (zero 4, scale 1.2e5 / 7) to
    1 .. 7; an ordinary group, fp32, and a scale that rounds up in fp16 (21834 -> 21840: -3 steps are -65502 in
    float32 but -65520 with the stored scale) as stated. Every point inside is finite in the dtype, every one
    outside is not."""
    cases = [  # scale, zero, bits, dtype, (lo, hi)
        (4e4, 2.0, 2, torch.float16, (1, 3)), (1.2e5 / 7, 4.0, 3, torch.float16, (1, 7)),
        (0.01, 8.0, 4, torch.float16, (0, 15)), (4e4, 2.0, 2, torch.float32, (0, 3)),
        (21834.0, 3.0, 2, torch.float16, (1, 3)), (21834.0, 3.0, 2, torch.float32, (0, 3)),
        (2.3e38, 2.0, 2, torch.bfloat16, (1, 3)), (2.0e4, 0.0, 2, torch.float16, (0, 3)),
        (3e4, 3.0, 2, torch.float16, (1, 3)), (3e4, 0.0, 3, torch.float16, (0, 2)),
    ]
    for scale, zero, bits, dtype, want in cases:
        lo, hi = qz.code_range_within_dtype(torch.tensor([scale]), torch.tensor([zero]), bits, dtype)
        assert (lo.item(), hi.item()) == want, (scale, zero, bits, dtype)
        s = max(scale, torch.tensor(scale).to(dtype).double().item())
        points = [(c - zero) * s for c in range(2**bits)]
        assert all((abs(p) <= torch.finfo(dtype).max) == (want[0] <= c <= want[1]) for c, p in enumerate(points))

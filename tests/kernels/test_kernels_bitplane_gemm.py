"""Bit-plane GEMM (ABQ-LLM's arbitrary-bit WpAq): both kernel variants ("rebuild": codes decoded from the
planes by byte-SWAR, one int8 dot a step; "planes": one int8 dot per plane) against the torch reference on fresh
quantized inputs (p, q in 2..8, per-channel and per-group, K and N not multiples of 32 or of the block), the int32
accumulation and zero-point corrections exact (also over spans of long groups), the reference against plain float
math, the plane layout and w_sum, the A16 path, every GPU config, the input checks, and the kernels compiling for
Hopper without spills.

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1, set by conftest.py) with bitplane_gemm's interpreter
tile per variant (launched directly); with TRITON_INTERPRET=0 on a GPU it runs the same checks there.
"""
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tquant.kernels import bitplane_gemm as bp
from tquant.kernels import bitplane_matmul as bitplane_matmul_module
from tquant.kernels.bitplane_gemm import (bitplane_matmul_a16, bitplane_matmul_a16_ref, bitplane_matmul_ref,
                                          code_sums, dequantize_a16, quantize_weight_ref)
from tquant.kernels.bitplane_matmul import bitplane_matmul
from tquant.kernels.act_quant import quantize_activations_ref
from tquant.kernels.bitplane_gemv import bitplane_gemv
from tquant.kernels.runtime import interpreter_on, next_power_of_2
from tquant.formats.packing import PLANE_K, pack_planes, unpack_planes
from tests.kernels.bitplane_cases import (DTYPES, PAPER_COMBINATIONS, TOL, assert_close, compiled_in_subprocess, float_inputs,  # noqa: F401
                            quantized_inputs, random_codes)
from tests.kernel_device import DEVICE, needs_backend

SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def shapes(draw):
    """(m, n, k, group_size): per channel (group_size = K, any K in 1..150) or groups of 32 / 64 (K = 1-3 groups)."""
    m = draw(st.sampled_from([1, 3, 16, 17]))
    n = draw(st.integers(1, 150))
    group = draw(st.sampled_from(["channel", 32, 64]))
    k = draw(st.integers(1, 150)) if group == "channel" else group * draw(st.integers(1, 3))
    return m, n, k, (k if group == "channel" else group)


def variant_config(variant, m, k, group_size):
    """The interpreter's tile for a variant, or on a GPU the variant's first candidate."""
    if interpreter_on():
        return dict(variant=variant, **bp.interpreter_tile(k, group_size))
    m = max(next_power_of_2(m), bp.DENSE_MIN_M if variant == "dense" else 1)
    return next(c for c in bp.configs(m, k, group_size) if c["variant"] == variant)


def split_config(variant, m, k, group_size, split):
    """variant_config split over K in `split` (BLOCK_K 32, so that short per-channel K still takes several steps)."""
    return dict(variant_config(variant, m, k, group_size), BLOCK_K=32, SPLIT_K=split)


def run_variant(variant, xq, x_scale, x_zero, planes, w_scale, w_zero, w_sum, bias, *, bits, act_bits, group_size,
                out_dtype, config=None):
    config = config or variant_config(variant, xq.shape[0], xq.shape[1], group_size)
    return bp.launch(config, xq, x_scale, x_zero, planes, w_scale, w_zero, w_sum, bits, act_bits, group_size, bias,
                     out_dtype)


@needs_backend
@SLOW
@given(shape=shapes(), bits=st.integers(2, 8), act_bits=st.integers(2, 8), variant=st.sampled_from(bp.VARIANTS),
       split=st.sampled_from([1, 2, 3]), dtype=st.sampled_from(DTYPES), bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_kernels_bitplane_matmul_matches_reference(shape, bits, act_bits, variant, split, dtype, bias, seed):
    """Every variant against the reference; split > 1 splits K over split programs (K steps of 32 per channel, whole
    groups otherwise), bias and the dx term added once."""
    m, n, k, gs = shape
    *weights, b, x, w = quantized_inputs(m, n, k, gs, bits, act_bits, seed)
    b = b.to(dtype) if bias else None
    kw = dict(bits=bits, act_bits=act_bits, group_size=gs, out_dtype=dtype)
    config = split_config(variant, m, k, gs, split) if split > 1 else None
    y = run_variant(variant, *weights, b, **kw, config=config)
    magnitude = x.abs() @ w.abs().t()  # float x, w on the CPU; splits sum in another order and outputs may cancel
    assert_close(y, bitplane_matmul_ref(*weights, bias=b, **kw), dtype, magnitude=magnitude.to(y.device))


@needs_backend
@pytest.mark.parametrize("bits,act_bits", PAPER_COMBINATIONS, ids=[f"W{p}A{q}" for p, q in PAPER_COMBINATIONS])
def test_kernels_bitplane_paper_combinations(bits, act_bits):
    """ABQ-LLM's combinations at one shape (groups of 32, N and M not multiples of the block): the public launcher
    (tuned; the interpreter's "rebuild" config) and the "planes" variant against the reference in fp32, and the
    quantized layer near the float one (x @ w^T + bias), closer with more bits."""
    m, n, k, gs = 5, 40, 96, 32
    *weights, b, x, w = quantized_inputs(m, n, k, gs, bits, act_bits, seed=bits * 10 + act_bits)
    kw = dict(bits=bits, act_bits=act_bits, group_size=gs, out_dtype=torch.float32)
    ref = bitplane_matmul_ref(*weights, bias=b, **kw)
    assert_close(bitplane_matmul(*weights, bias=b, **kw), ref, torch.float32)
    assert_close(run_variant("planes", *weights, b, **kw), ref, torch.float32)
    expected = x.double() @ w.double().T + b.cpu().double()
    err = ((ref.cpu().double() - expected).norm() / expected.norm()).item()
    assert err < 2.0 ** (2 - min(bits, act_bits)), f"relative error {err:.2e} to the float layer"


def unit_scale_args(xq, codes, x_zero, w_zero, gs, bits):
    """The kernels' tensor arguments with unit scales (on DEVICE): y is then the integer sum itself."""
    (m, k), n = xq.shape, codes.shape[0]
    planes = pack_planes(codes, bits)
    return [t.to(DEVICE) for t in (xq, torch.ones(m), x_zero, planes, torch.ones(k // gs, n), w_zero,
                                   code_sums(planes, k, gs))]


def integer_product(xq, codes, x_zero, w_zero, gs, act_bits):
    """sum_k (a - x_zero) (c - w_zero) in int64 ([M, N]; unit scales sum the groups)."""
    a = xq.long() + 2 ** (act_bits - 1) - x_zero.long()[:, None]
    c = codes.long() - w_zero.long().t().repeat_interleave(gs, dim=1)
    return a @ c.t()


def assert_exact(y, expected):
    assert expected.abs().max() < 2**24  # every partial sum an fp32 integer: the kernels' result is exact
    torch.testing.assert_close(y.cpu(), expected.float(), rtol=0, atol=0)


EXACT = [(1, 1, 1, 1, 8, 8), (5, 33, 70, 70, 8, 8), (17, 40, 96, 32, 3, 5), (3, 20, 192, 64, 7, 2),
         (2, 9, 45, 45, 2, 8), (16, 17, 128, 128, 5, 3), (4, 70, 160, 32, 6, 7)]  # (m, n, k, group_size, p, q)


@needs_backend
@pytest.mark.parametrize("m,n,k,gs,bits,act_bits", EXACT)
@pytest.mark.parametrize("fn", bp.VARIANTS + ("split", "ref"))
def test_kernels_bitplane_int32_accumulation_is_exact(fn, m, n, k, gs, bits, act_bits):
    """Unit scales and fp32 out: y is the integer sum of (a - x_zero)(c - w_zero), so the byte-SWAR decode (every
    centre: w_zero for p <= 7, 128 for p = 8, 0 for "planes"; "dense" through decode_codes), every zero-point
    correction and the split-K reduction ("rebuild" in 3 splits, twice: the arrival counters are left at zero) must
    be exact."""
    xq, codes, x_zero, w_zero = random_codes(m, n, k, gs, bits, act_bits, seed=m * n * k + bits)
    args = unit_scale_args(xq, codes, x_zero, w_zero, gs, bits)
    kw = dict(bits=bits, act_bits=act_bits, group_size=gs, out_dtype=torch.float32)
    expected = integer_product(xq, codes, x_zero, w_zero, gs, act_bits)
    if fn == "split":
        for _ in range(2):
            assert_exact(run_variant("rebuild", *args, None, **kw, config=split_config("rebuild", m, k, gs, 3)),
                         expected)
        return
    y = bitplane_matmul_ref(*args, **kw) if fn == "ref" else run_variant(fn, *args, None, **kw)
    assert_exact(y, expected)


@needs_backend
@pytest.mark.parametrize("k,gs", [(300, 300), (512, 256)], ids=["channel", "groups"])
@pytest.mark.parametrize("bits", [8, 5])
@pytest.mark.parametrize("variant", bp.VARIANTS)
def test_kernels_bitplane_long_groups_walk_spans(monkeypatch, variant, bits, k, gs):
    """A group longer than MAX_SPAN (16384 k, the int32 bound) is summed in spans, each converted on its own: with
    MAX_SPAN 128 (a multiple of every BLOCK_K), K=300 per channel takes spans of 128, 128, 44 and groups of 256 two
    spans each, BLOCK_K 64 under the interpreter (two steps a span); still exact, with and without row sums."""
    monkeypatch.setattr(bp, "MAX_SPAN", 128)
    xq, codes, x_zero, w_zero = random_codes(3, 20, k, gs, bits, 8, seed=k + bits)
    config = dict(variant_config(variant, 3, k, gs), **({"BLOCK_K": 64} if interpreter_on() else {}))
    y = run_variant(variant, *unit_scale_args(xq, codes, x_zero, w_zero, gs, bits), None, bits=bits, act_bits=8,
                    group_size=gs, out_dtype=torch.float32, config=config)
    assert_exact(y, integer_product(xq, codes, x_zero, w_zero, gs, 8))


@SLOW
@given(shape=shapes(), bits=st.integers(2, 8), act_bits=st.integers(2, 8), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31 - 1))
def test_kernels_bitplane_reference_matches_float_math(shape, bits, act_bits, dtype, seed):
    """The reference against (x_scale (a - x_zero)) @ (w_scale (c - w_zero))^T + bias in fp64, from codes made
    directly (not read back from the planes)."""
    m, n, k, gs = shape
    xq, codes, x_zero, w_zero = random_codes(m, n, k, gs, bits, act_bits, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x_scale, w_scale = (torch.rand(m, generator=g) + 0.1) / 100, (torch.rand(k // gs, n, generator=g) + 0.1) / 100
    bias = torch.randn(n, generator=g).to(dtype)
    xf = x_scale.double()[:, None] * (xq.double() + 2 ** (act_bits - 1) - x_zero.double()[:, None])
    wf = w_scale.double()[:, None] * (codes.double().t().reshape(k // gs, gs, n) - w_zero.double()[:, None])
    wf = wf.reshape(k, n)
    expected = xf @ wf + bias.double()
    w_sum = codes.view(n, k // gs, gs).sum(dim=-1, dtype=torch.int32).t().contiguous()
    y = bitplane_matmul_ref(xq, x_scale, x_zero, pack_planes(codes, bits), w_scale, w_zero, w_sum, bits=bits,
                            act_bits=act_bits, group_size=gs, bias=bias, out_dtype=dtype)
    assert_close(y, expected.to(dtype), dtype, tol=1e-12 if dtype == torch.float32 else None)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 100), bits=st.integers(2, 8), seed=st.integers(0, 2**31 - 1))
def test_kernels_bitplane_plane_layout_and_code_sums(n, k, bits, seed):
    """planes int32 [bits, ceil(K / 32), N] in byte-SWAR order (bit j of word w of plane i: bit i of the code of
    k = 32 w + 4 (j % 8) + j // 8, so (word >> s) & 0x01010101 holds k = 32 w + 4 s + 0..3 in bytes 0..3), zero
    bits past K; unpack_planes inverts it, and code_sums (w_sum) sums the codes per group."""
    codes = torch.randint(0, 2**bits, (n, k), generator=torch.Generator().manual_seed(seed))
    codes[0, 0] = 2**bits - 1
    planes = pack_planes(codes, bits)
    kw = -(-k // 32)
    assert planes.dtype == torch.int32 and planes.shape == (bits, kw, n)
    padded = torch.nn.functional.pad(codes, (0, 32 * kw - k)).view(n, kw, 32)
    j = torch.arange(32)
    assert PLANE_K == (4 * (j % 8) + j // 8).tolist()
    bit = (planes.long()[..., None] >> j) & 1  # [bits, KW, N, 32]: bit j of each word
    for i in range(bits):
        assert torch.equal(bit[i].permute(1, 0, 2), (padded[:, :, PLANE_K] >> i) & 1)
    assert torch.equal(unpack_planes(planes, k), codes.int())
    for gs in {k, 32} if k % 32 == 0 else {k}:
        w_sum = code_sums(planes, k, gs)
        assert w_sum.dtype == torch.int32 and torch.equal(w_sum, codes.view(n, k // gs, gs).sum(-1).t().int())


@needs_backend
@pytest.mark.parametrize("variant", bp.VARIANTS + ("a16",))
def test_kernels_bitplane_padding_bits_past_k_are_ignored(variant):
    """Set bits past K (45: 19 in each plane's last word, bits j with 32 + PLANE_K[j] >= 45) change nothing: the
    kernels never mask the codes there, but xq (x) is 0 past K and w_sum gives the codes' sums (the format has those
    bits 0)."""
    m, n, k, bits = 3, 20, 45, 4
    xq, xs, xz, planes, ws, wz, w_sum, _, x, _ = quantized_inputs(m, n, k, k, bits, 6, seed=5)
    past_k = sum(1 << j for j in range(32) if PLANE_K[j] >= k % 32)
    dirty = planes.clone()
    dirty[:, -1] |= past_k - (1 << 32 if past_k >= 1 << 31 else 0)  # as an int32
    codes = unpack_planes(dirty.cpu(), 64)
    assert torch.equal(codes[:, :k], unpack_planes(planes.cpu(), k)) and (codes[:, k:] == 2**bits - 1).all()
    if variant == "a16":
        x = x.to(DEVICE)
        outs = [bitplane_matmul_a16(x, p, ws, wz, bits=bits, group_size=k) for p in (planes, dirty)]
    else:
        outs = [run_variant(variant, xq, xs, xz, p, ws, wz, w_sum, None, bits=bits, act_bits=6, group_size=k,
                            out_dtype=torch.float32) for p in (planes, dirty)]
    assert torch.equal(outs[0], outs[1])


@needs_backend
@SLOW
@given(shape=shapes(), bits=st.sampled_from([2, 3, 4, 8]), dtype=st.sampled_from(DTYPES), bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_kernels_bitplane_a16_matches_reference(shape, bits, dtype, bias, seed):
    """W2 / W3 / W4 A16 (centre w_zero) and W8A16 (centre 128, then + 128 - w_zero) against the reference."""
    m, n, k, gs = shape
    _, _, _, planes, ws, wz, _, b, x, _ = quantized_inputs(m, n, k, gs, bits, 8, seed)
    x, b = x.to(DEVICE, dtype), (b.to(dtype) if bias else None)
    y = bitplane_matmul_a16(x, planes, ws, wz, bits=bits, group_size=gs, bias=b)
    w16 = dequantize_a16(planes, ws, wz, gs, k, torch.float64).cpu()
    magnitude = x.cpu().double().abs() @ w16.abs().t() + (b.cpu().double().abs() if bias else 0)
    assert_close(y, bitplane_matmul_a16_ref(x, planes, ws, wz, bits=bits, group_size=gs, bias=b), dtype,
                 magnitude=magnitude)


@needs_backend
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k,gs", [(128, 32), (192, 64), (70, 70)])
def test_kernels_bitplane_a16_each_bit_width(bits, k, gs):
    """W2A16 / W3A16 / W4A16 (and W8A16) with groups of 32 and 64 and per channel (K=70), fp16, bias; the reference
    against fp64 float math on the dequantized weight, and the quantized layer near the float one."""
    _, _, _, planes, ws, wz, _, b, x, w = quantized_inputs(17, 33, k, gs, bits, 8, seed=bits * k)
    x, b = x.to(DEVICE, torch.float16), b.to(torch.float16)
    ref = bitplane_matmul_a16_ref(x, planes, ws, wz, bits=bits, group_size=gs, bias=b)
    assert_close(bitplane_matmul_a16(x, planes, ws, wz, bits=bits, group_size=gs, bias=b), ref, torch.float16)
    codes = unpack_planes(planes.cpu(), k).double()  # [N, K]
    g = torch.arange(k) // gs
    w16 = ((codes - wz.cpu().double().t()[:, g]) * ws.cpu().double().t()[:, g]).half().double()
    ref = ref.cpu()
    assert_close(ref, (x.cpu().double() @ w16.t() + b.cpu().double()).half(), torch.float16)
    expected = x.cpu().double() @ w.double().t() + b.cpu().double()
    assert ((ref.double() - expected).norm() / expected.norm()).item() < 2.4 * 2.0**-bits  # RTN's error


@pytest.mark.slow
@needs_backend
def test_kernels_bitplane_every_gpu_config_is_correct(monkeypatch):
    """Each CUDA candidate of both paths (tile shapes, every variant, masks at M, N, K not multiples of the blocks),
    through the launchers; under the interpreter each distinct tile once (warps and stages do not matter there). At
    most 14 candidates a key (the tuner's time), "rebuild" first, "dense" from DENSE_MIN_M, deep K steps where the
    groups allow them, split over K up to SPLIT_MAX_M where K holds two steps (or groups) a split."""
    monkeypatch.setattr(bp, "interpreter_on", lambda: False)
    for m, k, gs, bits in ((20, 520, 520, 5), (40, 256, 64, 8), (256, 96, 32, 3), (300, 512, 256, 8)):
        gpu, a16 = bp.configs(next_power_of_2(m), k, gs), bp.a16_configs(next_power_of_2(m), k, gs)
        variants = set(bp.VARIANTS) - (set() if m >= bp.DENSE_MIN_M else {"dense"})
        assert {c["variant"] for c in gpu} == variants and gpu[0]["variant"] == "rebuild"
        assert any(c["BLOCK_K"] == bp.DEEP_K for c in gpu) == (m <= 64 and (gs == k or gs % bp.DEEP_K == 0))
        assert {c.get("SPLIT_K", 1) for c in gpu} == ({1, 2} if m <= bp.SPLIT_MAX_M else {1})
        assert len(gpu) <= 16 and len(a16) <= 10
        assert all(c["BLOCK_K"] % 32 == 0 and (gs == k or gs % c["BLOCK_K"] == 0) for c in gpu + a16)
        if interpreter_on():
            fields = ("variant", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K")
            tile = lambda c: tuple(c.get(key) for key in fields)  # noqa: E731
            gpu, a16 = ({tile(c): c for c in cs}.values() for cs in (gpu, a16))
        *weights, b, x, _ = quantized_inputs(m, 70, k, gs, bits, 7, seed=m)
        ref = bitplane_matmul_ref(*weights, bits=bits, act_bits=7, group_size=gs, bias=b, out_dtype=torch.float32)
        for config in gpu:
            assert_close(bp.launch(config, *weights, bits, 7, gs, b, torch.float32), ref, torch.float32)
        x = x.to(DEVICE)
        planes, ws, wz = weights[3:6]
        ref = bitplane_matmul_a16_ref(x, planes, ws, wz, bits=bits, group_size=gs, bias=b)
        for config in a16:
            assert_close(bp.launch_a16(config, x, planes, ws, wz, bits, gs, b), ref, torch.float32, tol=1e-5)


@needs_backend
@SLOW
@given(n=st.integers(1, 150), bits=st.integers(2, 8), group=st.sampled_from(["channel", 32, 64]),
       k_channel=st.integers(1, 150), groups=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_kernels_bitplane_decode_codes_matches_reference(n, bits, group, k_channel, groups, seed):
    """The dense variant's decode writes c - w_zero (p <= 7) or c - 128 (p = 8) as int8 [N, K], nothing past K."""
    k, gs = (k_channel, k_channel) if group == "channel" else (group * groups, group)
    _, codes, _, w_zero = random_codes(1, n, k, gs, bits, 8, seed)
    planes = pack_planes(codes, bits).to(DEVICE)
    w_zero = w_zero.to(DEVICE)
    w8 = bp.decode_codes(planes, w_zero, bits, gs, k)
    ref = bp.decode_codes_ref(planes, w_zero, bits, gs, k)
    assert w8.dtype == ref.dtype == torch.int8 and w8.shape == (n, k)
    assert torch.equal(w8.cpu(), ref.cpu())
    assert torch.equal(ref.cpu().int() + (w_zero.cpu().t()[:, torch.arange(k) // gs] if bits < 8 else 128), codes)


def test_kernels_bitplane_config_must_fit_the_groups_and_spans(monkeypatch):
    """BLOCK_K divides group_size (several groups) and MAX_SPAN, so no K step straddles a group or a span."""
    *weights, _, _, _ = quantized_inputs(2, 8, 64, 32, 4, 8, seed=0, device="cpu")
    config = dict(variant="rebuild", **bp.interpreter_tile(64, 32))
    with pytest.raises(ValueError, match="BLOCK_K=64 must be a multiple of 32 dividing group_size=32"):
        bp.launch(dict(config, BLOCK_K=64), *weights, 4, 8, 32, None, torch.float16)
    monkeypatch.setattr(bp, "MAX_SPAN", 96)
    with pytest.raises(ValueError, match="BLOCK_K=64 must .* and MAX_SPAN=96"):
        bp.launch(dict(config, BLOCK_K=64), *weights, 4, 8, 64, None, torch.float16)


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 8), k=st.integers(1, 100), bits=st.integers(2, 8), seed=st.integers(0, 2**31 - 1))
def test_kernels_bitplane_quantize_helpers_grid(m, k, bits, seed):
    """act_quant's asymmetric per-token grid: centred int8 codes, zero in [0, 2^q), every x within one step of its
    dequantized value (min-max with a rounded zero can clip the extreme by up to a step); quantize_weight_ref alike
    per group (here per channel, and groups of 32 where they divide K), with w_sum the codes' sums (code_sums)."""
    x, w, _ = float_inputs(m, m + 3, k, seed)
    xq, x_scale, x_zero = quantize_activations_ref(x, bits=bits, zero_point=True)
    half = 2 ** (bits - 1)
    assert xq.dtype == torch.int8 and xq.shape == (m, k) and xq.int().min() >= -half and xq.int().max() < half
    assert x_scale.dtype == torch.float32 and x_zero.dtype == torch.int32 and x_scale.shape == x_zero.shape == (m,)
    assert x_zero.min() >= 0 and x_zero.max() < 2**bits
    x_hat = x_scale[:, None] * (xq.float() + half - x_zero[:, None])
    assert ((x - x_hat).abs() <= x_scale[:, None] * (1 + 1e-4)).all()
    for gs in {k, 32} if k % 32 == 0 else {k}:
        planes, w_scale, w_zero, w_sum = quantize_weight_ref(w, bits, gs)
        g_shape = (k // gs, m + 3)
        assert planes.shape == (bits, -(-k // 32), m + 3) and w_scale.shape == w_zero.shape == w_sum.shape == g_shape
        # int(): compared as a uint8 tensor, 2^8 would wrap to 0
        assert w_zero.dtype == torch.uint8 and w_sum.dtype == torch.int32 and int(w_zero.max()) < 2**bits
        assert torch.equal(w_sum, code_sums(planes, k, gs))
        g = torch.arange(k) // gs
        w_hat = w_scale.t()[:, g] * (unpack_planes(planes, k) - w_zero.t()[:, g])
        assert ((w - w_hat).abs() <= w_scale.t()[:, g] * (1 + 1e-4)).all()


@needs_backend
def test_kernels_bitplane_empty_batch():
    xq, xs, xz, planes, ws, wz, w_sum, _, x, _ = quantized_inputs(1, 8, 32, 32, 4, 8, seed=0)
    kw = dict(bits=4, act_bits=8, group_size=32)
    assert bitplane_matmul(xq[:0], xs[:0], xz[:0], planes, ws, wz, w_sum, **kw).shape == (0, 8)
    assert bitplane_matmul_a16(x[:0].to(DEVICE), planes, ws, wz, bits=4, group_size=32).shape == (0, 8)


def test_kernels_bitplane_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    *weights, _, x, _ = quantized_inputs(3, 8, 32, 32, 4, 8, seed=1, device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        bitplane_matmul(*weights, bits=4, act_bits=8, group_size=32)
    with pytest.raises(ValueError, match="CUDA"):
        bitplane_matmul_a16(x, *weights[3:6], bits=4, group_size=32)


NAMES = ("xq", "x_scale", "x_zero", "planes", "w_scale", "w_zero", "w_sum", "bias")


def _bad(t, **change):
    return dict(zip(NAMES, t[:8]), bits=4, act_bits=6, group_size=32, out_dtype=torch.float16) | change


BAD_INPUTS = {  # M=3, N=8, K=64, bits=4, act_bits=6, group_size=32
    "bits too small": (lambda t: _bad(t, bits=1), "bits=1 is not supported"),
    "bits too large": (lambda t: _bad(t, bits=9), "bits=9 is not supported"),
    "bits not an int": (lambda t: _bad(t, bits=4.0), "bits=4.0 is not supported"),
    "act_bits too small": (lambda t: _bad(t, act_bits=1), "act_bits=1 is not supported"),
    "act_bits too large": (lambda t: _bad(t, act_bits=9), "act_bits=9 is not supported"),
    "planes count": (lambda t: _bad(t, bits=5), r"planes holds 4 planes but bits=5"),
    "planes dtype": (lambda t: _bad(t, planes=t[3].long()), "planes must be a 3-D int32"),
    "planes not 3-D": (lambda t: _bad(t, planes=t[3][0]), "planes must be a 3-D int32"),
    "planes K": (lambda t: _bad(t, planes=t[3][:, :1]), r"planes shape \(4, 1, 8\) does not match.*\[4, 2, N\].*K=64"),
    "xq dtype": (lambda t: _bad(t, xq=t[0].int()), "xq must be a 2-D int8"),
    "xq not 2-D": (lambda t: _bad(t, xq=t[0][None]), "xq must be a 2-D int8"),
    "xq empty K": (lambda t: _bad(t, xq=t[0][:, :0], planes=t[3][:, :0]), r"xq must have at least one column"),
    "group_size not dividing K": (lambda t: _bad(t, group_size=48), "group_size=48 must be a positive integer divid"),
    "group_size zero": (lambda t: _bad(t, group_size=0), "group_size=0 must be a positive integer"),
    "group_size not a multiple of 32": (lambda t: _bad(t, group_size=16), "group_size=16 must be a multiple of 32"),
    "x_scale dtype": (lambda t: _bad(t, x_scale=t[1].half()), "x_scale dtype"),
    "x_scale shape": (lambda t: _bad(t, x_scale=t[1][:-1]), r"x_scale shape .* expected \(3,\)"),
    "x_zero dtype": (lambda t: _bad(t, x_zero=t[2].long()), "x_zero dtype"),
    "x_zero shape": (lambda t: _bad(t, x_zero=t[2][:-1]), r"x_zero shape .* expected \(3,\)"),
    "w_scale dtype": (lambda t: _bad(t, w_scale=t[4].half()), "w_scale dtype"),
    "w_scale shape": (lambda t: _bad(t, w_scale=t[4][:1]), r"w_scale shape \(1, 8\).*expected \(2, 8\)"),
    "w_zero dtype": (lambda t: _bad(t, w_zero=t[5].to(torch.int8)), "w_zero dtype"),
    "w_zero shape": (lambda t: _bad(t, w_zero=t[5][:, :-1]), r"w_zero shape \(2, 7\).*expected \(2, 8\)"),
    "w_sum missing": (lambda t: _bad(t, w_sum=None), "w_sum is required"),
    "w_sum dtype": (lambda t: _bad(t, w_sum=t[6].long()), "w_sum dtype"),
    "w_sum shape": (lambda t: _bad(t, w_sum=t[6][:1]), r"w_sum shape \(1, 8\).*expected \(2, 8\)"),
    "bias shape": (lambda t: _bad(t, bias=t[7][:-1]), "bias shape"),
    "bias dtype": (lambda t: _bad(t, bias=t[7].double()), "bias dtype"),
    "out_dtype": (lambda t: _bad(t, out_dtype=torch.int32), "out_dtype"),
}


def call(fn, args):
    args = dict(args)
    return fn(*[args.pop(name) for name in NAMES[:7]], **args)


@pytest.mark.parametrize("fn", [bitplane_matmul, bitplane_matmul_ref, bitplane_gemv], ids=["kernel", "ref", "gemv"])
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_kernels_bitplane_bad_input_raises(fn, case):
    """Every WpAq entry point (the tensor-core kernel, the GEMV, the reference) names the first bad argument."""
    make, message = BAD_INPUTS[case]
    args = make(quantized_inputs(3, 8, 64, 32, 4, 6, seed=1, device="cpu"))
    with pytest.raises(ValueError, match=message):
        call(fn, args)


@pytest.mark.parametrize("name,change,message", [
    ("xq", lambda v: 32, r"xq out of range: expected values in \[-32, 32\)"),
    ("x_zero", lambda v: 64, r"x_zero out of range: expected values in \[0, 64\)"),
    ("w_zero", lambda v: -1, r"w_zero out of range: expected values in \[0, 16\)"),
    ("w_sum", lambda v: v + 1, r"w_sum does not match the planes"),
], ids=["xq", "x_zero", "w_zero", "w_sum"])
def test_kernels_bitplane_reference_checks_values(name, change, message):
    """The reference (not the launcher: that would sync the GPU) rejects codes outside the format's ranges
    (act_bits=6: xq in [-32, 32), x_zero in [0, 64); bits=4: w_zero in [0, 16)) and a w_sum that is not the codes'
    sums (one group's sum off by one); the launcher runs (its shapes and dtypes are right)."""
    args = _bad(quantized_inputs(3, 8, 64, 32, 4, 6, seed=1, device="cpu"))
    args[name] = args[name].clone()
    args[name].view(-1)[0] = change(args[name].view(-1)[0])
    with pytest.raises(ValueError, match=message):
        call(bitplane_matmul_ref, args)
    if name == "w_sum" and DEVICE == "cpu":
        assert call(bitplane_matmul, args).shape == (3, 8)


A16_BAD = {  # x [3, 64], bits=4, group_size=32
    "x dtype": (dict(x=torch.ones(3, 64, dtype=torch.int8)), "x must be a 2-D fp16 / bf16 / fp32"),
    "bits": (dict(bits=9), "bits=9 is not supported"),
    "planes count": (dict(bits=3), "planes holds 4 planes but bits=3"),
    "group_size": (dict(group_size=20), "group_size=20 must be a positive integer dividing K=64"),
    "w_scale shape": (dict(w_scale=torch.ones(1, 8)), "w_scale shape"),
    "w_zero dtype": (dict(w_zero=torch.ones(2, 8)), "w_zero dtype"),
    "bias dtype": (dict(bias=torch.ones(8, dtype=torch.float16)), "bias dtype"),
}


@pytest.mark.parametrize("fn", [bitplane_matmul_a16, bitplane_matmul_a16_ref], ids=["kernel", "ref"])
@pytest.mark.parametrize("case", A16_BAD)
def test_kernels_bitplane_a16_bad_input_raises(fn, case):
    _, _, _, planes, ws, wz, _, _, x, _ = quantized_inputs(3, 8, 64, 32, 4, 8, seed=2, device="cpu")
    change, message = A16_BAD[case]
    args = dict(x=x, planes=planes, w_scale=ws, w_zero=wz, bits=4, group_size=32, bias=None) | change
    with pytest.raises(ValueError, match=message):
        fn(args.pop("x"), args.pop("planes"), args.pop("w_scale"), args.pop("w_zero"), **args)


def test_kernels_bitplane_helpers_bad_input_raises():
    with pytest.raises(ValueError, match=r"codes out of range for 3-bit planes"):
        pack_planes(torch.full((2, 5), 8), 3)
    with pytest.raises(ValueError, match=r"codes out of range for 3-bit planes"):
        pack_planes(torch.full((2, 5), -1), 3)
    with pytest.raises(ValueError, match="codes must be a 2-D integer tensor"):
        pack_planes(torch.ones(2, 5), 3)
    with pytest.raises(ValueError, match="bits=9 is not supported for bit planes"):
        pack_planes(torch.ones(2, 5, dtype=torch.int32), 9)
    with pytest.raises(ValueError, match="group_size=16 must be a multiple of 32 or equal K=48"):
        quantize_weight_ref(torch.randn(4, 48), 4, 16)
    with pytest.raises(ValueError, match="bits=1 is not supported; use an integer in 2..8"):
        quantize_weight_ref(torch.randn(4, 48), 1, 48)


# ---- the kernels compile for Hopper (sm_90) on a machine without a GPU (tquant.kernels.cross_compile) ----

# (variant, p, batch, group_size, BLOCK_K): small and large tiles, p = 2, 4 (groups of 128) and 8, each at the first
# GPU candidate of its variant (and with the values of pick, where given), K=4096 -> N=14336
COMPILED = [("rebuild", 2, 16, None, None), ("rebuild", 4, 16, 128, None), ("rebuild", 8, 16, None, None),
            ("rebuild", 2, 16, None, {"BLOCK_K": 256}), ("rebuild", 8, 64, None, {"BLOCK_K": 256}),
            ("rebuild", 2, 16, None, {"SPLIT_K": 4}), ("rebuild", 4, 64, 128, {"SPLIT_K": 8}),
            ("rebuild", 2, 1024, None, None), ("rebuild", 4, 1024, 128, None), ("rebuild", 8, 1024, None, None),
            ("planes", 4, 16, None, None), ("planes", 8, 1024, None, None), ("dense", 2, 1024, None, None),
            ("dense", 8, 4096, 128, {"BLOCK_K": 64}), ("a16", 4, 16, 128, None), ("a16", 8, 1024, None, None)]
KERNELS = {"a16": ["_bitplane_a16_kernel"], "dense": ["_decode_kernel", "_bitplane_kernel"]}  # what a case compiles


def compile_configs():
    """[(kernel name, variant, p, batch, registers, spilled bytes)] of the COMPILED cases, compiled for sm_90."""
    from unittest import mock

    from tquant.kernels.cross_compile import compiling_for

    k, n = 4096, 14336
    out = []
    for variant, bits, m, gs, pick in COMPILED:
        gs = gs or k
        planes, ws = torch.ones(bits, k // 32, n, dtype=torch.int32), torch.ones(k // gs, n)
        wz = w_sum = torch.ones(k // gs, n, dtype=torch.int32)
        with mock.patch.object(bp, "interpreter_on", lambda: False):
            gpu, a16 = bp.configs(m, k, gs), bp.a16_configs(m, k, gs)
        with compiling_for() as done:
            if variant == "a16":
                bp.launch_a16(a16[0], torch.ones(m, k, dtype=torch.float16), planes, ws, wz, bits, gs, None)
            else:
                config = next(c for c in gpu if c["variant"] == variant
                              and all(c.get(key) == v for key, v in (pick or {}).items()))
                bp.launch(config, torch.ones(m, k, dtype=torch.int8),
                          torch.ones(m), torch.ones(m, dtype=torch.int32), planes, ws, wz, w_sum, bits, 8, gs, None,
                          torch.float16)
        out += [(c.name, variant, bits, m, c.registers, c.spill_bytes) for c in done]
    return out


def test_kernels_bitplane_compile_for_hopper():
    """Each COMPILED case compiles for sm_90 within 255 registers and without spilling."""
    compiled = compiled_in_subprocess(__file__)
    expected = [(name, v, bits, m) for v, bits, m, _, _ in COMPILED for name in KERNELS.get(v, ["_bitplane_kernel"])]
    assert [(name, variant, bits, m) for name, variant, bits, m, _, _ in compiled] == expected
    assert all(0 < regs <= 255 and spills == 0 for *_, regs, spills in compiled), compiled


if __name__ == "__main__":
    print(json.dumps(compile_configs()))


def test_kernels_bitplane_gemv_joins_the_tuning_at_small_batches(monkeypatch):
    """Up to GEMV_MAX_M the tuner also times the popcount GEMV ({"path": "gemv"}, first candidate still the tensor-core
    kernel's default); run_wpaq launches the path a config names, and both give the reference."""
    from tquant.kernels import bitplane_gemv

    monkeypatch.setattr(bp, "interpreter_on", lambda: False)
    monkeypatch.setattr(bitplane_matmul_module, "interpreter_on", lambda: False)
    paths = {m: [c.get("path") for c in bitplane_matmul_module.wpaq_candidates(m, 300, 256, 128, 2, 8)]
             for m in (1, 8, 16)}
    assert paths[1][0] is None and "gemv" in paths[1] and "gemv" in paths[8] and "gemv" not in paths[16]
    monkeypatch.undo()
    xq, xs, xz, planes, ws, wz, wsum, bias, *_ = quantized_inputs(3, 40, 128, 64, 3, 6, seed=5)
    args = (xq, xs, xz, planes, ws, wz, wsum, 3, 6, 64, bias, torch.float32)
    ref = bitplane_matmul_ref(*args[:7], bits=3, act_bits=6, group_size=64, bias=bias, out_dtype=torch.float32)
    gemv = dict(path="gemv", **bitplane_gemv.configs(4, 40, 128, 64, 3, 6)[0])
    mma = bp.configs(4, 128, 64)[0]
    for config in (gemv, mma):
        assert_close(bitplane_matmul_module.run_wpaq(config, *args).cpu(), ref.cpu(), torch.float32)

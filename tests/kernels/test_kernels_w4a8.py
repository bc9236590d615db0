"""W4A8 GEMM: the kernel against the torch reference (per-channel, per-group, and per-group with QoQ's zero points),
the reference against plain float math, the int32 accumulation exact, and w4a8_quantize_weight's grids.

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1, set by conftest.py) with one fixed small
config; with TRITON_INTERPRET=0 and TQUANT_AUTOTUNE=0 on a GPU it runs the same checks there.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tquant.kernels import w4a8_gemm
from tquant.kernels.act_quant import quantize_activations_ref
from tquant.kernels.w4a8_gemm import w4a8_matmul, w4a8_matmul_ref
from tquant.formats.packing import pack_codes, unpack_codes
from tquant.modules.act_quant_linear import w4a8_quantize_weight
from tests.kernel_device import DEVICE, assert_close as kernel_close, needs_backend

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def divisors(k):
    return [d for d in range(1, k + 1) if k % d == 0]


@st.composite
def shapes(draw):
    """(m, n, k, group_size or None, zero): K any size per-channel; per-group, group_size divides K; zero: QoQ's
    zero points (per group, or one group of K per channel)."""
    m = draw(st.sampled_from([1, 2, 5, 16, 17, 40]))
    n, k = draw(st.integers(1, 200)), draw(st.integers(1, 200))
    group_size = draw(st.one_of(st.none(), st.sampled_from(divisors(k))))
    zero = draw(st.booleans())
    return m, n, k, (k if zero and group_size is None else group_size), zero


def quantized_inputs(m, n, k, group_size, seed, device=DEVICE, act_bits=8, zero=False):
    """(xq, x_scale, qweight, w_scale, group_scale, group_zero, bias) from random float x [M, K], w [N, K] (with
    outlier rows), bias [N] (act_bits=4: xq packed [M, ceil(K / 2)]; zero: QoQ's progressive grid)."""
    g = torch.Generator().manual_seed(seed)
    x, w, bias = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
    w[::7] *= 20
    xq, x_scale = quantize_activations_ref(x, bits=act_bits)
    weights = w4a8_quantize_weight(w, group_size=group_size, zero_point=zero)
    return [t.to(device) if t is not None else None for t in (xq, x_scale, *weights, bias)]


def assert_close(y, ref, dtype, magnitude=None):
    kernel_close(y, ref, dtype, TOL[dtype], magnitude)


def call(fn, xq, x_scale, qweight, w_scale, group_scale, group_zero, bias, group_size, **kw):
    return fn(xq, x_scale, qweight, w_scale, group_scale=group_scale, group_zero=group_zero, group_size=group_size,
              bias=bias, **kw)


@needs_backend
@SLOW
@given(shape=shapes(), dtype=st.sampled_from(DTYPES), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_w4a8_kernel_matches_reference(shape, dtype, bias, seed):
    m, n, k, gs, zero = shape
    xq, x_scale, qweight, w_scale, sg, sz, b = quantized_inputs(m, n, k, gs, seed, zero=zero)
    b = b.to(dtype) if bias else None
    y = call(w4a8_matmul, xq, x_scale, qweight, w_scale, sg, sz, b, gs, out_dtype=dtype)
    assert_close(y, call(w4a8_matmul_ref, xq, x_scale, qweight, w_scale, sg, sz, b, gs, out_dtype=dtype), dtype)


@needs_backend
def test_w4a8_one_group_of_k_with_zero_8_stays_per_group():
    """QoQ's grid with one group spanning K whose zeros all come out 8 (one row; int8_gemm_weight calls that
    per-channel): w4a8_quantize_weight still returns the group scales the per-group call needs (hypothesis found
    m=2, n=1, K=38, seed 0)."""
    xq, x_scale, qweight, w_scale, sg, sz, b = quantized_inputs(2, 1, 38, 38, 0, zero=True)
    assert sz is None and sg is not None and torch.equal(sg.cpu(), torch.ones(1, 1, dtype=torch.int8))
    y = call(w4a8_matmul, xq, x_scale, qweight, w_scale, sg, sz, b, 38, out_dtype=torch.float32)
    assert_close(y, call(w4a8_matmul_ref, xq, x_scale, qweight, w_scale, sg, sz, b, 38, out_dtype=torch.float32),
                 torch.float32)


def random_codes(m, n, k, group_size, seed, zero=False):
    """xq int8 [M, K] (-128 included), codes [N, K] in 0..15 (0 and 15 included), sg int8 [K // gs, N] in 1..16
    with |(c - 8) * sg| <= 127 (sg = 16 only where the group's codes lie in 1..15); zero: also sz int8 in 0..15
    (0 and 15 included) with sg in 1..8 (|(c - z) * sg| <= 120), else sz None."""
    g = torch.Generator().manual_seed(seed)
    xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    codes = torch.randint(0, 16, (n, k), generator=g)
    xq[0, 0], codes[0, 0], codes[-1, -1] = -128, 0, 15
    sg = sz = None
    if group_size is not None and zero:
        sg = torch.randint(1, 9, (k // group_size, n), generator=g, dtype=torch.int8)
        sz = torch.randint(0, 16, (k // group_size, n), generator=g, dtype=torch.int8)
        sz[0, 0], sz[-1, -1] = 15, 0
    elif group_size is not None:
        sg = torch.randint(1, 16, (k // group_size, n), generator=g, dtype=torch.int8)
        codes[:, -group_size:] = codes[:, -group_size:].clamp_min(1)
        sg[-1] = 16
    return xq, codes, sg, sz


def integer_weight(codes, sg, sz, gs):
    """w8 [K, N] = (c - z) * sg as int64 (z = 8 without sz, sg = 1 without sg)."""
    zero = 8 if sz is None else sz.long().repeat_interleave(gs, dim=0)
    w8 = codes.t().long() - zero
    return w8 if sg is None else w8 * sg.long().repeat_interleave(gs, dim=0)


@needs_backend
@pytest.mark.parametrize("m,n,k,gs,zero", [(1, 1, 1, None, False), (5, 33, 70, None, False), (40, 70, 200, None, False),
                                           (17, 40, 96, 32, False), (5, 33, 60, 12, False), (16, 20, 200, 8, False),
                                           (2, 9, 45, 45, False), (17, 40, 96, 32, True), (5, 33, 60, 12, True),
                                           (3, 20, 200, 8, True), (2, 9, 45, 45, True), (4, 24, 60, 3, True)])
@pytest.mark.parametrize("fn", [w4a8_matmul, w4a8_matmul_ref])
def test_w4a8_int32_accumulation_is_exact(fn, m, n, k, gs, zero):
    """Unit scales and fp32 out: y is the integer matmul xq @ w8 (|sums| < 2^24 here); zero points per step, per
    word and per code (groups of 3 split words)."""
    xq, codes, sg, sz = random_codes(m, n, k, gs, seed=m * n * k, zero=zero)
    dev = [t.to(DEVICE) if t is not None else None for t in (sg, sz)]
    y = fn(xq.to(DEVICE), torch.ones(m, device=DEVICE), pack_codes(codes, 4).to(DEVICE), torch.ones(n, device=DEVICE),
           group_scale=dev[0], group_zero=dev[1], group_size=gs, out_dtype=torch.float32)
    torch.testing.assert_close(y.cpu(), (xq.long() @ integer_weight(codes, sg, sz, gs)).float(), rtol=0, atol=0)


@SLOW
@given(shape=shapes(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_w4a8_reference_matches_dequantized_float_math(shape, dtype, seed):
    """The reference against (xq * x_scale) @ ((c - z) * sg * w_scale) + bias in fp64."""
    m, n, k, gs, zero = shape
    xq, x_scale, qweight, w_scale, sg, sz, bias = quantized_inputs(min(m, 8), n, k, gs, seed, device="cpu",
                                                                   zero=zero)
    bias = bias.to(dtype)
    w = integer_weight(unpack_codes(qweight, 4, k).t(), sg, sz, gs).double() * w_scale.double()  # [K, N]
    expected = (xq.double() * x_scale.double()[:, None]) @ w + bias.double()
    y = call(w4a8_matmul_ref, xq, x_scale, qweight, w_scale, sg, sz, bias, gs, out_dtype=dtype)
    assert_close(y, expected.to(dtype), dtype)


@SLOW
@given(n=st.integers(1, 64), k=st.integers(1, 200), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_w4a8_quantize_weight_grid(n, k, data, seed):
    """Every weight within half a step of its grid point; sg in 1..15, |q * sg| <= 127, codes in 0..15."""
    gs = data.draw(st.one_of(st.none(), st.sampled_from(divisors(k))))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.empty(n, 1).uniform_(0.01, 10, generator=g)
    qweight, w_scale, sg, sz = w4a8_quantize_weight(w, group_size=gs)
    assert sz is None
    assert qweight.dtype == torch.int32 and qweight.shape == (-(-k // 8), n)
    assert w_scale.dtype == torch.float32 and w_scale.shape == (n,) and (w_scale > 0).all()
    q = (unpack_codes(qweight, 4, k) - 8).t().double()  # [N, K]
    step = w_scale.double()[:, None].expand(n, k)
    if gs is None:
        assert sg is None
    else:
        assert sg.dtype == torch.int8 and sg.shape == (k // gs, n)
        assert sg.min() >= 1 and sg.max() <= 15
        step = step * sg.t().double().repeat_interleave(gs, dim=1)
        assert (q * sg.t().double().repeat_interleave(gs, dim=1)).abs().max() <= 127
    assert ((w.double() - q * step).abs() <= step * (0.5 + 1e-5)).all()


@SLOW
@given(n=st.integers(1, 64), k=st.integers(1, 200), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_w4a8_quantize_weight_progressive_grid(n, k, data, seed):
    """QoQ's grid: codes and zeros in 0..15, sg >= 1, every (c - z) * sg an int8 value, and every weight within
    w_scale * (1/2 + sg) of its dequantized value (int8 rounding, then the group step and its rounded zero)."""
    gs = data.draw(st.sampled_from(divisors(k)))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.empty(n, 1).uniform_(0.01, 10, generator=g)
    w[:, 0] += 5 * w[:, 0].sign()  # an outlier column
    qweight, w_scale, sg, sz = w4a8_quantize_weight(w, group_size=gs, zero_point=True)
    if sz is None:  # every zero came out 8: the symmetric form (test_w4a8_one_group_of_k_with_zero_8_stays_per_group)
        sz = torch.full_like(sg, 8)
    assert sg.dtype == sz.dtype == torch.int8 and sg.shape == sz.shape == (k // gs, n)
    assert sg.min() >= 1 and sz.min() >= 0 and sz.max() <= 15
    codes = unpack_codes(qweight, 4, k)
    assert codes.min() >= 0 and codes.max() <= 15
    w8 = integer_weight(codes.t(), sg, sz, gs).t()  # [N, K]
    assert w8.abs().max() <= 127 and w8.min() >= -128
    step = w_scale.double()[:, None] * sg.t().double().repeat_interleave(gs, dim=1)
    assert ((w.double() - w8 * w_scale.double()[:, None]).abs() <= w_scale.double()[:, None] / 2 + step + 1e-9).all()


@needs_backend
@pytest.mark.parametrize("gs", [None, 16])
def test_w4a8_approximates_float_linear(gs):
    """quantize x (per-token int8) and w (int4) and run the kernel against x @ w^T + bias."""
    g = torch.Generator().manual_seed(3)
    x, w, bias = torch.randn(17, 160, generator=g), torch.randn(70, 160, generator=g), torch.randn(70, generator=g)
    xq, x_scale = quantize_activations_ref(x, bits=8)
    qweight, w_scale, sg, sz = w4a8_quantize_weight(w, group_size=gs)
    y = call(w4a8_matmul, *(t.to(DEVICE) if t is not None else None
                            for t in (xq, x_scale, qweight, w_scale, sg, sz, bias)), gs, out_dtype=torch.float32)
    expected = x.double() @ w.double().T + bias.double()
    err = ((y.cpu().double() - expected).norm() / expected.norm()).item()
    assert err < 0.15, f"relative error {err:.2e}"


@needs_backend
def test_w4a8_every_gpu_config_is_correct(monkeypatch):
    """Each CUDA candidate (tile shapes, masks at N, K not multiples of the blocks), run through the launcher."""
    monkeypatch.setattr(w4a8_gemm.w8a8_gemm, "interpreter_on", lambda: False)  # the shared candidate builder
    monkeypatch.setattr(w4a8_gemm, "interpreter_on", lambda: False)
    monkeypatch.setenv("TQUANT_AUTOTUNE", "0")  # the dense path's inner W8A8 call takes its default config
    gpu_configs = w4a8_gemm.configs(1) + w4a8_gemm.configs(256)
    assert len(gpu_configs) == (2 * len(w4a8_gemm.w8a8_gemm.SMALL_M_TILES + w4a8_gemm.LARGE_M_TILES)
                                + len(w4a8_gemm.SPLIT_TILES) + 1)
    assert gpu_configs[-1] == w4a8_gemm.DENSE and w4a8_gemm.DENSE not in w4a8_gemm.configs(256, act_bits=4)
    assert all(c["BLOCK_K"] % 32 == 0 and c["BLOCK_M"] >= 16 and c["BLOCK_N"] >= 16 for c in gpu_configs[:-1])
    for gs, zero in ((None, False), (40, False), (40, True), (20, True)):
        xq, x_scale, qweight, w_scale, sg, sz, bias = quantized_inputs(20, 70, 280, gs, seed=2, zero=zero)
        ref = call(w4a8_matmul_ref, xq, x_scale, qweight, w_scale, sg, sz, bias, gs, out_dtype=torch.float32)
        for config in {tuple(c.items()): c for c in gpu_configs}.values():
            y = w4a8_gemm.launch(config, xq, x_scale, qweight, w_scale, sg, gs, bias, torch.float32, group_zero=sz)
            assert_close(y, ref, torch.float32)


def split_pair(config, split_k, *args, **kw):
    """(unsplit, split) outputs of launch at config's tile, SPLIT_K absent and split_k."""
    unsplit = {key: v for key, v in config.items() if key != "SPLIT_K"}
    return w4a8_gemm.launch(unsplit, *args, **kw), w4a8_gemm.launch(dict(config, SPLIT_K=split_k), *args, **kw)


@st.composite
def split_shapes(draw):
    """(m, n, k, group_size or None, zero) with N odd and K long enough for 2-4 splits of the interpreter's 4-word
    K steps: K odd (per-channel, or groups of an odd divisor: groups split words), or groups of 8 / 24 / 32 / 64
    (a group a word, or a K step)."""
    m, n = draw(st.sampled_from([1, 2, 5, 16, 17, 40])), 2 * draw(st.integers(0, 100)) + 1
    group_size = draw(st.sampled_from([None, 8, 24, 32, 64, "odd"]))
    if group_size is None or group_size == "odd":
        k = 2 * draw(st.integers(16, 200)) + 1
        group_size = group_size and draw(st.sampled_from(divisors(k)))
    else:
        k = group_size * draw(st.integers(-(-33 // group_size), 400 // group_size))
    zero = draw(st.booleans()) and group_size is not None
    return m, n, k, group_size, zero


@needs_backend
@SLOW
@given(shape=split_shapes(), split_k=st.sampled_from([2, 3, 4]), act_bits=st.sampled_from([8, 4]),
       dtype=st.sampled_from(DTYPES), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_w4a8_split_k_is_bit_identical_to_unsplit(shape, split_k, act_bits, dtype, bias, seed):
    """The split-K path (INTERPRETER_SPLIT_CONFIG's tile, the words over 2-4 splits of whole K steps, the last ragged;
    W4A8 and W4A4, per-channel, per-group, QoQ's zeros): int32 partials summed exactly, so y equals the unsplit
    kernel's bit for bit, and the reference; a second call agrees (the arrival counters are left at zero)."""
    m, n, k, gs, zero = shape
    xq, x_scale, qweight, w_scale, sg, sz, b = quantized_inputs(m, n, k, gs, seed, act_bits=act_bits, zero=zero)
    b = b.to(dtype) if bias else None
    args = (xq, x_scale, qweight, w_scale, sg, gs, b, dtype, act_bits, k, sz)
    config = w4a8_gemm.w8a8_gemm.INTERPRETER_SPLIT_CONFIG
    unsplit, split = split_pair(config, split_k, *args)
    assert torch.equal(split, unsplit)
    assert torch.equal(w4a8_gemm.launch(dict(config, SPLIT_K=split_k), *args), split)
    ref = call(w4a8_matmul_ref, xq, x_scale, qweight, w_scale, sg, sz, b, gs, out_dtype=dtype, act_bits=act_bits,
               in_features=k)
    assert_close(split, ref, dtype)


@needs_backend
@pytest.mark.parametrize("m", [1, 40])
def test_w4a8_every_split_k_candidate(monkeypatch, m):
    """Each GPU split-K candidate (every SPLIT_TILES entry at the BLOCK_M of M 1 / 64: unpruned), forced through
    the launcher at N 301 and K 1033 per-channel, 1024 in groups of 128 with QoQ's zeros (a group a K step, or a
    word for BLOCK_K 256), 1040 in groups of 40 (a group a word), 2-5 splits: bit for bit the same tile unsplit, and the
    reference. On a GPU (TRITON_INTERPRET=0) this is the compiled split path with its atomic counters."""
    monkeypatch.setattr(w4a8_gemm.w8a8_gemm, "interpreter_on", lambda: False)
    monkeypatch.setattr(w4a8_gemm, "interpreter_on", lambda: False)
    split_configs = [c for c in w4a8_gemm.configs(1 << (m - 1).bit_length()) if c.get("SPLIT_K", 1) > 1]
    assert len(split_configs) == len(w4a8_gemm.SPLIT_TILES)
    for k, gs, zero in ((1033, None, False), (1024, 128, True), (1040, 40, False)):
        xq, x_scale, qweight, w_scale, sg, sz, bias = quantized_inputs(m, 301, k, gs, seed=m, zero=zero)
        ref = call(w4a8_matmul_ref, xq, x_scale, qweight, w_scale, sg, sz, bias, gs, out_dtype=torch.float16)
        for config in split_configs:
            unsplit, split = split_pair(config, config["SPLIT_K"], xq, x_scale, qweight, w_scale, sg, gs, bias,
                                        torch.float16, group_zero=sz)
            assert torch.equal(split, unsplit), (k, gs, config)
            assert_close(split, ref, torch.float16)


@needs_backend
def test_w4a8_empty_batch():
    xq, x_scale, qweight, w_scale, _, _, _ = quantized_inputs(1, 8, 16, None, seed=0)
    assert w4a8_matmul(xq[:0], x_scale[:0], qweight, w_scale).shape == (0, 8)


def _bad(t, **change):
    return dict(xq=t[0], x_scale=t[1], qweight=t[2], w_scale=t[3], group_scale=t[4], group_zero=t[5], group_size=8,
                bias=t[6], out_dtype=torch.float16) | change


BAD_INPUTS = {  # M=3, N=8, K=16, group_size=8
    "xq dtype": (lambda t: _bad(t, xq=t[0].int()), "xq must be a 2-D int8"),
    "xq not 2-D": (lambda t: _bad(t, xq=t[0][None]), "xq must be a 2-D int8"),
    "qweight dtype": (lambda t: _bad(t, qweight=t[2].to(torch.int8)), "qweight must be a 2-D int32"),
    "K mismatch": (lambda t: _bad(t, qweight=t[2][:-1]), r"qweight shape \(1, 8\) does not match.*\[2, N\].*K=16"),
    "x_scale dtype": (lambda t: _bad(t, x_scale=t[1].half()), "x_scale dtype"),
    "x_scale shape": (lambda t: _bad(t, x_scale=t[1][:-1]), r"x_scale shape .* expected \(3,\)"),
    "w_scale shape": (lambda t: _bad(t, w_scale=t[3][:-1]), r"w_scale shape .* expected \(8,\)"),
    "group_scale dtype": (lambda t: _bad(t, group_scale=t[4].int()), "group_scale dtype"),
    "group_scale shape": (lambda t: _bad(t, group_scale=t[4][:1]), r"group_scale shape \(1, 8\).*expected \(2, 8\)"),
    "group_size not dividing K": (lambda t: _bad(t, group_size=6), "group_size=6 must be a positive integer dividing"),
    "group_size zero": (lambda t: _bad(t, group_size=0), "group_size=0"),
    "group_size without scale": (lambda t: _bad(t, group_scale=None, group_zero=None),
                                 "group_scale and group_size go together"),
    "group_zero dtype": (lambda t: _bad(t, group_zero=t[5].int()), "group_zero dtype"),
    "group_zero shape": (lambda t: _bad(t, group_zero=t[5][:1]), r"group_zero shape \(1, 8\).*expected \(2, 8\)"),
    "group_zero without scale": (lambda t: _bad(t, group_scale=None, group_size=None),
                                 "group_zero needs group_scale"),
    "bias shape": (lambda t: _bad(t, bias=t[6][:-1]), "bias shape"),
    "bias dtype": (lambda t: _bad(t, bias=t[6].double()), "bias dtype"),
    "out_dtype": (lambda t: _bad(t, out_dtype=torch.int32), "out_dtype"),
}


@pytest.mark.parametrize("fn", [w4a8_matmul, w4a8_matmul_ref])
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_w4a8_bad_input_raises(fn, case):
    make, message = BAD_INPUTS[case]
    args = make(quantized_inputs(3, 8, 16, 8, seed=1, device="cpu", zero=True))
    with pytest.raises(ValueError, match=message):
        fn(args.pop("xq"), args.pop("x_scale"), args.pop("qweight"), args.pop("w_scale"), **args)


def test_w4a8_quantize_weight_bad_group_size_raises():
    with pytest.raises(ValueError, match="group_size=5 must divide K=16"):
        w4a8_quantize_weight(torch.randn(4, 16), group_size=5)
    with pytest.raises(ValueError, match="zero_point=True .* needs a group_size"):
        w4a8_quantize_weight(torch.randn(4, 16), zero_point=True)


def test_w4a8_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    xq, x_scale, qweight, w_scale, _, _, _ = quantized_inputs(3, 8, 16, None, seed=1, device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        w4a8_matmul(xq, x_scale, qweight, w_scale)


# ---- W4A4: the same kernel with packed 4-bit activations (act_bits=4) ----

@needs_backend
@SLOW
@given(shape=shapes(), dtype=st.sampled_from(DTYPES), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_w4a4_kernel_matches_reference(shape, dtype, bias, seed):
    m, n, k, gs, zero = shape
    xq, x_scale, qweight, w_scale, sg, sz, b = quantized_inputs(m, n, k, gs, seed, act_bits=4, zero=zero)
    b = b.to(dtype) if bias else None
    kw = dict(out_dtype=dtype, act_bits=4, in_features=k)
    y = call(w4a8_matmul, xq, x_scale, qweight, w_scale, sg, sz, b, gs, **kw)
    assert_close(y, call(w4a8_matmul_ref, xq, x_scale, qweight, w_scale, sg, sz, b, gs, **kw), dtype)


@needs_backend
@pytest.mark.parametrize("m,n,k,gs", [(1, 1, 1, None), (5, 33, 71, None), (17, 40, 96, 32), (3, 9, 45, 15)])
@pytest.mark.parametrize("fn", [w4a8_matmul, w4a8_matmul_ref])
def test_w4a4_int32_accumulation_is_exact(fn, m, n, k, gs):
    """Unit scales: y is the integer matmul of the unpacked 4-bit codes (-8 and 7 included) and w8."""
    g = torch.Generator().manual_seed(k)
    codes_x = torch.randint(-8, 8, (m, k), generator=g)
    codes_x[0, 0] = -8
    padded = torch.nn.functional.pad(codes_x, (0, k % 2))
    xq = ((padded[:, 0::2] & 15) | (padded[:, 1::2] << 4)).to(torch.int8)
    _, codes, sg, _ = random_codes(m, n, k, gs, seed=k)
    w8 = integer_weight(codes, sg, None, gs)
    y = fn(xq.to(DEVICE), torch.ones(m, device=DEVICE), pack_codes(codes, 4).to(DEVICE), torch.ones(n, device=DEVICE),
           group_scale=sg.to(DEVICE) if sg is not None else None, group_size=gs, out_dtype=torch.float32,
           act_bits=4, in_features=k)
    torch.testing.assert_close(y.cpu(), (codes_x.long() @ w8).float(), rtol=0, atol=0)


@pytest.mark.parametrize("fn", [w4a8_matmul, w4a8_matmul_ref])
def test_w4a4_bad_in_features_and_act_bits_raise(fn):
    xq, x_scale, qweight, w_scale, _, _, _ = quantized_inputs(3, 8, 16, None, seed=1, device="cpu", act_bits=4)
    with pytest.raises(ValueError, match="in_features=13 does not match packed 4-bit xq of width 8"):
        fn(xq, x_scale, qweight, w_scale, act_bits=4, in_features=13)
    with pytest.raises(ValueError, match="act_bits=2"):
        fn(xq, x_scale, qweight, w_scale, act_bits=2)

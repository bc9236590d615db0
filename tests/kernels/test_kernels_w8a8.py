"""W8A8 GEMM: the kernel against the torch reference, the reference against plain float math, and the int32
accumulation exact.

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1, set by conftest.py) with one fixed small
config; with TRITON_INTERPRET=0 and TQUANT_AUTOTUNE=0 on a GPU it runs the same checks there.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tquant.kernels import w8a8_gemm
from tquant.kernels.act_quant import quantize_activations, quantize_activations_ref
from tquant.kernels.w8a8_gemm import w8a8_matmul, w8a8_matmul_ref
from tests.kernel_device import DEVICE, assert_close as kernel_close, needs_backend

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def float_problem(m, n, k, seed):
    """x [M, K] with outlier channels (x30..x100), w [N, K] ~ 0.05 N(0, 1), bias [N], smoothing s [K] > 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    outliers = torch.randperm(k, generator=g)[: max(1, k // 16)]
    x[:, outliers] *= torch.empty(len(outliers)).uniform_(30, 100, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    s = (x.abs().amax(dim=0) / w.abs().amax(dim=0)).sqrt()  # SmoothQuant with alpha = 0.5
    return x, w, torch.randn(n, generator=g), s


def quantize_weight(w):
    """Symmetric per-output-channel int8: (wq [N, K], w_scale fp32 [N])."""
    scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantized_inputs(m, n, k, seed, device=DEVICE):
    x, w, bias, _ = float_problem(m, n, k, seed)
    xq, x_scale = quantize_activations_ref(x, bits=8)
    wq, w_scale = quantize_weight(w)
    return [t.to(device) for t in (xq, x_scale, wq, w_scale, bias)]


def assert_close(y, ref, dtype, magnitude=None):
    kernel_close(y, ref, dtype, TOL[dtype], magnitude)


@needs_backend
@SLOW
@given(m=st.sampled_from([1, 2, 5, 16, 17, 40]), n=st.integers(1, 200), k=st.integers(1, 200),
       dtype=st.sampled_from(DTYPES), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_w8a8_kernel_matches_reference(m, n, k, dtype, bias, seed):
    xq, x_scale, wq, w_scale, b = quantized_inputs(m, n, k, seed)
    b = b.to(dtype) if bias else None
    y = w8a8_matmul(xq, x_scale, wq, w_scale, bias=b, out_dtype=dtype)
    assert_close(y, w8a8_matmul_ref(xq, x_scale, wq, w_scale, bias=b, out_dtype=dtype), dtype)


@needs_backend
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (5, 33, 70), (40, 70, 200)])
@pytest.mark.parametrize("fn", [w8a8_matmul, w8a8_matmul_ref])
def test_w8a8_int32_accumulation_is_exact(fn, m, n, k):
    """Unit scales and fp32 out: y is the integer matmul (|sums| < 2^24 here), -128 included."""
    g = torch.Generator().manual_seed(m * n * k)
    xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    xq[0, 0] = wq[0, 0] = -128
    y = fn(xq.to(DEVICE), torch.ones(m, device=DEVICE), wq.to(DEVICE), torch.ones(n, device=DEVICE),
           out_dtype=torch.float32)
    torch.testing.assert_close(y.cpu(), (xq.long() @ wq.long().T).float(), rtol=0, atol=0)


@SLOW
@given(m=st.integers(1, 8), n=st.integers(1, 100), k=st.integers(1, 200), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31 - 1))
def test_w8a8_reference_matches_dequantized_float_math(m, n, k, dtype, seed):
    """The reference against (xq * x_scale) @ (wq * w_scale)^T + bias in fp64."""
    xq, x_scale, wq, w_scale, bias = quantized_inputs(m, n, k, seed, device="cpu")
    bias = bias.to(dtype)
    x, w = xq.double() * x_scale.double()[:, None], wq.double() * w_scale.double()[:, None]
    expected = x @ w.T + bias.double()
    y = w8a8_matmul_ref(xq, x_scale, wq, w_scale, bias=bias, out_dtype=dtype)
    assert y.dtype == dtype and y.shape == expected.shape
    # relative to the size of the terms summed (a single output can cancel far below them)
    terms = (x.abs() @ w.abs().T + bias.double().abs()).norm()
    assert (y.double() - expected).norm() / terms < TOL[dtype]


@needs_backend
@pytest.mark.parametrize("smooth", [False, True])
def test_w8a8_with_act_quant_approximates_float_linear(smooth):
    """quantize_activations + w8a8_matmul against x @ w^T + bias; with smoothing, x / s against w * s."""
    x, w, bias, s = float_problem(17, 70, 150, seed=5)
    s = s if smooth else None
    wq, w_scale = quantize_weight(w * s if smooth else w)
    xq, x_scale = quantize_activations(x.to(DEVICE), bits=8, smooth=s.to(DEVICE) if smooth else None)
    y = w8a8_matmul(xq, x_scale, wq.to(DEVICE), w_scale.to(DEVICE), bias=bias.to(DEVICE), out_dtype=torch.float32)
    expected = x.double() @ w.double().T + bias.double()
    err = ((y.cpu().double() - expected).norm() / expected.norm()).item()
    assert err < 0.05, f"relative error {err:.2e}"


@needs_backend
def test_w8a8_every_gpu_config_is_correct(monkeypatch):
    """Each CUDA candidate (tile shapes, masks at N, K not multiples of the blocks), run through the launcher."""
    monkeypatch.setattr(w8a8_gemm, "interpreter_on", lambda: False)
    gpu_configs = w8a8_gemm.configs(1) + w8a8_gemm.configs(64)
    assert gpu_configs and all(c["BLOCK_M"] >= 16 and c["BLOCK_N"] >= 16 and c["BLOCK_K"] >= 16 for c in gpu_configs)
    xq, x_scale, wq, w_scale, bias = quantized_inputs(20, 70, 150, seed=2)
    ref = w8a8_matmul_ref(xq, x_scale, wq, w_scale, bias=bias, out_dtype=torch.float32)
    for config in {tuple(c.items()): c for c in gpu_configs}.values():
        y = w8a8_gemm.launch(config, xq, x_scale, wq, w_scale, bias, torch.float32)
        assert_close(y, ref, torch.float32)


ODD = st.integers(0, 100).map(lambda i: 2 * i + 1)


def split_pair(config, split_k, *args):
    """(unsplit, split) outputs of launch at config's tile, SPLIT_K absent and split_k."""
    unsplit = {key: v for key, v in config.items() if key != "SPLIT_K"}
    return w8a8_gemm.launch(unsplit, *args), w8a8_gemm.launch(dict(config, SPLIT_K=split_k), *args)


@needs_backend
@SLOW
@given(m=st.sampled_from([1, 2, 5, 16, 17, 40]), n=ODD, k=st.integers(16, 200).map(lambda i: 2 * i + 1),
       split_k=st.sampled_from([2, 3, 4]), dtype=st.sampled_from(DTYPES), bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_w8a8_split_k_is_bit_identical_to_unsplit(m, n, k, split_k, dtype, bias, seed):
    """The split-K path (INTERPRETER_SPLIT_CONFIG's tile, K over 2-4 splits of BLOCK_K steps, the last ragged):
    int32 partials summed exactly, so y equals the unsplit kernel's bit for bit, and the reference; a second call
    agrees (the arrival counters are left at zero)."""
    xq, x_scale, wq, w_scale, b = quantized_inputs(m, n, k, seed)
    b = b.to(dtype) if bias else None
    args = (xq, x_scale, wq, w_scale, b, dtype)
    unsplit, split = split_pair(w8a8_gemm.INTERPRETER_SPLIT_CONFIG, split_k, *args)
    assert torch.equal(split, unsplit)
    assert torch.equal(w8a8_gemm.launch(dict(w8a8_gemm.INTERPRETER_SPLIT_CONFIG, SPLIT_K=split_k), *args), split)
    assert_close(split, w8a8_matmul_ref(xq, x_scale, wq, w_scale, bias=b, out_dtype=dtype), dtype)


@needs_backend
@pytest.mark.parametrize("m", [1, 17])
def test_w8a8_split_k_int32_sum_is_exact(m):
    """-128 * -128 over K = 2049 sums to 2^14 * 2049 > 2^24 (a split's share alone is below it): the int32 partials
    add up exactly, and y (unit scales, fp32) is that sum rounded once, as the unsplit kernel's."""
    k, n = 2049, 33
    g = torch.Generator().manual_seed(m)
    xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    xq[0], wq[0] = -128, -128
    args = (xq.to(DEVICE), torch.ones(m, device=DEVICE), wq.to(DEVICE), torch.ones(n, device=DEVICE), None,
            torch.float32)
    unsplit, split = split_pair(w8a8_gemm.INTERPRETER_SPLIT_CONFIG, 4, *args)
    expected = (xq.long() @ wq.long().T).float()
    assert expected[0, 0] == 2**14 * k
    assert torch.equal(split.cpu(), expected) and torch.equal(unsplit.cpu(), expected)


@needs_backend
@pytest.mark.parametrize("m", [1, 17, 40])
def test_w8a8_every_split_k_candidate(monkeypatch, m):
    """Each GPU split-K candidate (every SPLIT_TILES entry, at the BLOCK_M of M 1 / 32 / 64: unpruned), forced through
    the launcher at N 301, K 2049 (2-8 splits, the last ragged): bit for bit the same tile unsplit, and the
    reference. On a GPU (TRITON_INTERPRET=0) this is the compiled split path with its atomic counters."""
    monkeypatch.setattr(w8a8_gemm, "interpreter_on", lambda: False)
    xq, x_scale, wq, w_scale, bias = quantized_inputs(m, 301, 2049, seed=m)
    ref = w8a8_matmul_ref(xq, x_scale, wq, w_scale, bias=bias, out_dtype=torch.float16)
    split_configs = [c for c in w8a8_gemm.configs(1 << (m - 1).bit_length()) if c.get("SPLIT_K", 1) > 1]
    assert len(split_configs) == len(w8a8_gemm.SPLIT_TILES)
    for config in split_configs:
        unsplit, split = split_pair(config, config["SPLIT_K"], xq, x_scale, wq, w_scale, bias, torch.float16)
        assert torch.equal(split, unsplit), config
        assert_close(split, ref, torch.float16)


def test_w8a8_split_k_candidates_pruned_by_shape(monkeypatch):
    """Split-K joins the candidates up to M = 64 only, after the unsplit ones (the untuned default stays unsplit);
    given N, K, no candidate leaves a split under 2 K steps or makes over 4 waves of 132 programs."""
    monkeypatch.setattr(w8a8_gemm, "interpreter_on", lambda: False)
    assert "SPLIT_K" not in w8a8_gemm.configs(1)[0]
    assert not any("SPLIT_K" in c for c in w8a8_gemm.configs(128))
    for n, k in ((4096, 14336), (14336, 4096), (6144, 4096), (4096, 4096), (28672, 4096), (300, 700)):
        split = [c for c in w8a8_gemm.configs(16, n=n, k=k) if "SPLIT_K" in c]
        assert all(k >= 2 * c["SPLIT_K"] * c["BLOCK_K"] and -(-n // c["BLOCK_N"]) * c["SPLIT_K"] <= 4 * 132
                   for c in split)
        assert len(split) >= (2 if n <= 28672 and k >= 4096 else 0)


@needs_backend
def test_w8a8_empty_batch():
    xq, x_scale, wq, w_scale, _ = quantized_inputs(1, 8, 16, seed=0)
    assert w8a8_matmul(xq[:0], x_scale[:0], wq, w_scale).shape == (0, 8)


def _bad(t, **change):
    return dict(xq=t[0], x_scale=t[1], wq=t[2], w_scale=t[3], bias=t[4], out_dtype=torch.float16) | change


BAD_INPUTS = {
    "xq dtype": (lambda t: _bad(t, xq=t[0].int()), "xq must be a 2-D int8"),
    "xq not 2-D": (lambda t: _bad(t, xq=t[0][None]), "xq must be a 2-D int8"),
    "wq dtype": (lambda t: _bad(t, wq=t[2].float()), "wq must be a 2-D int8"),
    "K mismatch": (lambda t: _bad(t, wq=t[2][:, :-1]), r"wq shape \(8, 15\) does not match.*K=16"),
    "x_scale dtype": (lambda t: _bad(t, x_scale=t[1].half()), "x_scale dtype"),
    "x_scale shape": (lambda t: _bad(t, x_scale=t[1][:-1]), "x_scale shape"),
    "w_scale shape": (lambda t: _bad(t, w_scale=t[3][:-1]), "w_scale shape"),
    "bias shape": (lambda t: _bad(t, bias=t[4][:-1]), "bias shape"),
    "bias dtype": (lambda t: _bad(t, bias=t[4].double()), "bias dtype"),
    "out_dtype": (lambda t: _bad(t, out_dtype=torch.int32), "out_dtype"),
}


@pytest.mark.parametrize("fn", [w8a8_matmul, w8a8_matmul_ref])
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_w8a8_bad_input_raises(fn, case):
    make, message = BAD_INPUTS[case]
    args = make(quantized_inputs(3, 8, 16, seed=1, device="cpu"))
    with pytest.raises(ValueError, match=message):
        fn(args.pop("xq"), args.pop("x_scale"), args.pop("wq"), args.pop("w_scale"), **args)


def test_w8a8_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    xq, x_scale, wq, w_scale, _ = quantized_inputs(3, 8, 16, seed=1, device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        w8a8_matmul(xq, x_scale, wq, w_scale)

"""FP8 kernels (tquant.kernels.fp8_gemm): the e4m3 activation quantization bit for bit against its torch reference
(torch.float8_e4m3fn's cast), every e4m3 value and tie, extreme and zero rows; the W8A8 and weight-only GEMMs against
their references and the references against plain float maths; the GEMM that quantizes x itself (fp8_linear's fused
path, its division-free quotient against IEEE division) bit for bit against quantize_fp8 + the W8A8 GEMM.

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1, set by conftest.py) with one fixed small config; with
TRITON_INTERPRET=0 on a GPU (TQUANT_AUTOTUNE=0: the first candidate) it runs the same checks there, where the fp8
tl.dot of an H100 accumulates with fewer bits than fp32 (GPU_ACC below).
"""
import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tquant.kernels import fp8_gemm, w8a8_gemm
from tquant.kernels.dequant_gemm import split_k_grid
from tquant.kernels.fp8_gemm import (E4M3_MAX, FP8, fake_quantize_fp8, fp8_linear, fp8_matmul, fp8_matmul_ref,
                                     fp8_weight_only_matmul, fp8_weight_only_matmul_ref, quantize_fp8, quantize_fp8_ref)
from tests.kernel_device import DEVICE, needs_backend

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [FP16, BF16, FP32]
# Relative to the magnitude |x| @ |w|^T + |bias| of each output element: both sides sum exact e4m3 products in fp32
# (K <= 200 terms, ~K 2^-24 of the magnitude) and round once to the output dtype (kernel and reference may then differ
# by one ulp: 2^-10 fp16, 2^-7 bf16); doubled for slack. The weight-only GEMM multiplies x in its own dtype, exactly
# as the reference's fp64 does (e4m3 weights are fp16 / bf16 values).
TOL = {FP16: 2e-3, BF16: 1.6e-2, FP32: 3e-5}
# On an H100 Triton's fp8 tl.dot does not promote its accumulator to fp32 (max_num_imprecise_acc 2^30): the tensor
# core keeps about 14 significant bits while accumulating (DeepSeek-V3's report; not measured here yet), i.e. up to
# about 2^-13 of the magnitude; the fp32 bound there is that, doubled.
GPU_ACC = 2.5e-4
BIG = {FP16: 6e4, BF16: 1e30, FP32: 1e30}  # outlier magnitudes per activation dtype
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bits(q):
    return q.view(torch.uint8)


def activations(m, k, dtype, seed, big=None, tiny=False, zero_row=None, device=DEVICE):
    """x [M, K] ~ N(0, 1) with a few outlier channels (x30..x100, or up to `big`), or all tiny (1e-30 fp32 / bf16,
    1e-6 fp16: subnormal e4m3 codes after scaling are not the point, fp16 subnormal inputs are), and row zero_row
    all zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    outliers = torch.randperm(k, generator=g)[: max(1, k // 16)]
    x[:, outliers] *= torch.empty(len(outliers)).uniform_(30, 100, generator=g) if big is None else big
    if big is not None:
        x[:, outliers] = x[:, outliers].clamp(-big, big)
    if tiny:
        x = x * (1e-6 if dtype == FP16 else 1e-30)
    if zero_row is not None:
        x[zero_row % m] = 0
    return x.to(dtype).to(device)


def weights(n, k, seed, device=DEVICE):
    """(wq e4m3 [N, K], w_scale fp32 [N]) of w ~ 0.05 N(0, 1), per output channel: a row quantized as a token."""
    g = torch.Generator().manual_seed(seed + 1)
    wq, w_scale = quantize_fp8_ref(torch.randn(n, k, generator=g) * 0.05)
    return wq.to(device), w_scale.to(device)


def check(y, ref, magnitude, dtype, tol):
    """y against ref element by element: same dtype and shape, no NaN, and |y - ref| <= tol * magnitude (+ the dtype's
    smallest subnormal, twice) wherever ref plus that bound stays below the dtype's largest value; past it rounding
    alone decides whether an element overflows (fp16 outputs of 6e4 activations), so both may differ there."""
    assert y.dtype == ref.dtype == dtype and y.shape == ref.shape
    y, ref, magnitude = (t.double().cpu() for t in (y, ref, magnitude))
    assert not y.isnan().any(), "NaN outputs"
    bound = tol * magnitude + 2 * torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    decided = ref.abs() + bound <= torch.finfo(dtype).max
    err = (y - ref).abs()[decided]
    assert (err <= bound[decided]).all(), f"largest error over bound {(err / bound[decided]).max().item():.3g}"


def gemm_tol(dtype, weight_only=False):
    return max(TOL[dtype], GPU_ACC if DEVICE == "cuda" and not weight_only else 0.0)


# --- activation quantization ----------------------------------------------------------------------------------------

@needs_backend
@pytest.mark.parametrize("fn", [quantize_fp8, quantize_fp8_ref])
def test_fp8_quant_every_e4m3_value_and_tie(fn):
    """Static scale 1: every finite e4m3 value maps to itself; every midpoint between neighbours to the even one, and
    the fp32 values just above / below it to the upper / lower neighbour; past 448 saturates. Checked against the
    values themselves, not against torch's cast."""
    v = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    v = v[~v.isnan()].unique()  # sorted; -0 and 0 are one
    lo, hi = v[:-1], v[1:]
    mid = (lo + hi) / 2  # exact in fp32
    even = torch.where(bits(lo.to(FP8)) % 2 == 0, lo, hi)
    x = torch.cat([v, mid, mid.nextafter(hi), mid.nextafter(lo), torch.tensor([449.0, 1e4, -500.0, -1e30])])
    expected = torch.cat([v, even, hi, lo, torch.tensor([448.0, 448.0, -448.0, -448.0])])
    q, scale = fn(x[None].to(DEVICE), scale=torch.ones(1, device=DEVICE))
    assert q.dtype == FP8 and scale.tolist() == [1.0]
    assert torch.equal(q.float().cpu()[0], expected)


@needs_backend
@pytest.mark.parametrize("fn", [quantize_fp8, quantize_fp8_ref])
def test_fp8_quant_hand_rounded_cases(fn):
    """Ties to even in the normal and subnormal ranges, underflow to a signed zero (as torch's cast)."""
    x = torch.tensor([[1.0625, 1.1875, -2.125, 3 * 2.0**-10, 2.0**-10, -2.0**-11, 0.015625 - 2.0**-11, 440.0]])
    q, _ = fn(x.to(DEVICE), scale=torch.ones(1, device=DEVICE))
    assert q.float().cpu().tolist() == [[1.0, 1.25, -2.0, 2.0**-8, 0.0, -0.0, 0.015625, 448.0]]
    assert bits(q).cpu()[0, 5].item() == 0x80  # -0


@needs_backend
@SLOW
@given(m=st.sampled_from([1, 2, 5, 33]), k=st.integers(1, 200), dtype=st.sampled_from(DTYPES),
       mode=st.sampled_from(["normal", "big", "tiny"]), static=st.sampled_from([None, 0.05, 1.0, 20.0]),
       zero_row=st.none() | st.integers(0, 40), seed=st.integers(0, 2**31 - 1))
@example(m=5, k=77, dtype=FP16, mode="big", static=None, zero_row=3, seed=0)
@example(m=2, k=1, dtype=FP32, mode="tiny", static=None, zero_row=None, seed=1)
def test_fp8_quant_kernel_matches_reference(m, k, dtype, mode, static, zero_row, seed):
    """Identical codes (bit for bit, signed zeros included) and scales. static: a fixed scale at that multiple of
    max |x| / 448 (0.05: most of the row saturates at +-448; 20: most codes subnormal or zero)."""
    x = activations(m, k, dtype, seed, BIG[dtype] if mode == "big" else None, mode == "tiny", zero_row)
    scale = None
    if static is not None:
        amax = x.float().abs().max().clamp_min(1e-30)
        scale = (amax / E4M3_MAX * static).reshape(1)
    q, s = quantize_fp8(x, scale=scale)
    q_ref, s_ref = quantize_fp8_ref(x, scale=scale)
    assert q.dtype == FP8 and q.shape == (m, k) and s.dtype == FP32 and s.shape == (m,)
    assert torch.equal(s, s_ref)
    assert torch.equal(bits(q), bits(q_ref))



@needs_backend
@pytest.mark.parametrize("k,dtype,static", [(3001, FP16, False), (4096, BF16, True), (8193, FP32, False),
                                            (14336, BF16, False)])
def test_fp8_quant_long_rows(k, dtype, static):
    """Rows past 2048 (BLOCK_K 4096: 8 warps) and past 8192 (BLOCK_K 16384: 16 warps), the launch widths the GPU
    takes for Llama-sized rows (4096, 14336), which the hypothesis test (K <= 200: 4 warps) does not reach; codes bit
    for bit and scales equal to the reference's."""
    x = activations(3, k, dtype, seed=k)
    scale = (x.float().abs().max() / E4M3_MAX * 0.5).reshape(1) if static else None  # static: outliers saturate
    q, s = quantize_fp8(x, scale=scale)
    q_ref, s_ref = quantize_fp8_ref(x, scale=scale)
    assert torch.equal(s, s_ref) and torch.equal(bits(q), bits(q_ref))

@SLOW
@given(m=st.integers(1, 6), k=st.integers(1, 200), dtype=st.sampled_from(DTYPES), big=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_fp8_quant_reference_matches_float_math(m, k, dtype, big, seed):
    """scale = max |x| / 448 per row, the row maximum at +-448, and every code within half an e4m3 step of x / scale:
    2^-4 of |x / scale| for normals (3 mantissa bits), 2^-10 below 2^-6 (subnormal steps of 2^-9)."""
    x = activations(m, k, dtype, seed, BIG[dtype] if big else None, device="cpu")
    q, scale = quantize_fp8_ref(x)
    xs = x.double()
    torch.testing.assert_close(scale.double(), xs.abs().amax(dim=1) / E4M3_MAX, rtol=1e-6, atol=0)
    assert (q.float().abs().amax(dim=1) == E4M3_MAX).all()
    y = xs / scale.double()[:, None]
    bound = torch.where(y.abs() >= 2.0**-6, y.abs() * 2.0**-4, torch.full_like(y, 2.0**-10))
    assert ((q.double() - y).abs() <= bound * (1 + 1e-6)).all()


@needs_backend
@pytest.mark.parametrize("fn", [quantize_fp8, quantize_fp8_ref])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_quant_zero_and_denormal_rows_give_scale_one(fn, dtype):
    """A row of zeros (and a row whose max |x| / 448 is below fp32's smallest normal) gets scale 1 and zero codes: no
    0 / 0 = NaN; the other rows are unaffected."""
    x = torch.zeros(3, 9, dtype=dtype)
    x[1, 4] = -3.0
    x[2, 0] = 1e-38 if dtype != FP16 else 0.0
    q, scale = fn(x.to(DEVICE))
    assert torch.equal(scale.cpu(), torch.tensor([1.0, 3.0, 1.0]) / torch.tensor([1.0, 448.0, 1.0]))
    assert not q.float().isnan().any()
    assert q.float().cpu()[[0, 2]].abs().max() == 0 and q.float().cpu()[1, 4] == -448


def test_fp8_fake_quantize_is_codes_times_scale():
    x = activations(4, 30, BF16, seed=3, device="cpu").reshape(2, 2, 30)
    q, scale = quantize_fp8_ref(x.reshape(4, 30))
    fake = fake_quantize_fp8(x)
    assert fake.dtype == FP32 and fake.shape == x.shape
    assert torch.equal(fake.reshape(4, 30), q.float() * scale[:, None])


# --- GEMMs ----------------------------------------------------------------------------------------------------------

def gemm_problem(m, n, k, dtype, seed, big=False, zero_row=None, device=DEVICE):
    x = activations(m, k, dtype, seed, BIG[dtype] if big else None, zero_row=zero_row, device=device)
    wq, w_scale = weights(n, k, seed, device)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(seed + 2)).to(dtype).to(device)
    return x, wq, w_scale, bias


def magnitude(a, a_scale, wq, w_scale, bias):
    """|a| @ |wq|^T * scales + |bias| in fp64 (a_scale None: a is float)."""
    mag = a.double().abs() @ wq.double().abs().T * w_scale.double()[None, :]
    if a_scale is not None:
        mag = mag * a_scale.double()[:, None]
    return mag + (bias.double().abs() if bias is not None else 0)


@needs_backend
@SLOW
@given(m=st.sampled_from([1, 2, 5, 16, 17, 40]), n=st.integers(1, 150), k=st.integers(1, 200),
       dtype=st.sampled_from(DTYPES), bias=st.booleans(), big=st.booleans(), zero_row=st.none() | st.integers(0, 40),
       seed=st.integers(0, 2**31 - 1))
@example(m=17, n=33, k=77, dtype=FP16, bias=True, big=True, zero_row=2, seed=0)  # 6e4 outliers: overflow to inf
def test_fp8_kernel_matches_reference(m, n, k, dtype, bias, big, zero_row, seed):
    x, wq, w_scale, b = gemm_problem(m, n, k, dtype, seed, big, zero_row)
    b = b if bias else None
    xq, x_scale = quantize_fp8(x)
    y = fp8_matmul(xq, x_scale, wq, w_scale, bias=b, out_dtype=dtype)
    ref = fp8_matmul_ref(xq, x_scale, wq, w_scale, bias=b, out_dtype=dtype)
    check(y, ref, magnitude(xq, x_scale, wq, w_scale, b), dtype, gemm_tol(dtype))
    if zero_row is not None:  # a zero row's output is the bias alone
        expected = b if b is not None else torch.zeros(n, dtype=dtype, device=DEVICE)
        assert torch.equal(y[zero_row % m], expected)


@needs_backend
@SLOW
@given(m=st.sampled_from([1, 3, 16, 19]), n=st.integers(1, 150), k=st.integers(1, 200),
       dtype=st.sampled_from(DTYPES), bias=st.booleans(), big=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fp8_weight_only_kernel_matches_reference(m, n, k, dtype, bias, big, seed):
    x, wq, w_scale, b = gemm_problem(m, n, k, dtype, seed, big)
    b = b if bias else None
    y = fp8_weight_only_matmul(x, wq, w_scale, bias=b)
    ref = fp8_weight_only_matmul_ref(x, wq, w_scale, bias=b)
    check(y, ref, magnitude(x, None, wq, w_scale, b), dtype, gemm_tol(dtype, weight_only=True))


@SLOW
@given(m=st.integers(1, 8), n=st.integers(1, 100), k=st.integers(1, 200), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31 - 1))
def test_fp8_references_match_dequantized_float_math(m, n, k, dtype, seed):
    """Both references against (xq * x_scale) @ (wq * w_scale)^T + bias (and x @ (wq * w_scale)^T + bias) in fp64."""
    x, wq, w_scale, bias = gemm_problem(m, n, k, dtype, seed, device="cpu")
    w = wq.double() * w_scale.double()[:, None]
    xq, x_scale = quantize_fp8_ref(x)
    for a, got in ((xq.double() * x_scale.double()[:, None], fp8_matmul_ref(xq, x_scale, wq, w_scale, bias=bias,
                                                                          out_dtype=dtype)),
                   (x.double(), fp8_weight_only_matmul_ref(x, wq, w_scale, bias=bias))):
        expected = a @ w.T + bias.double()
        assert got.dtype == dtype and got.shape == expected.shape
        check(got, expected.to(dtype), a.abs() @ w.abs().T + bias.double().abs(), dtype, TOL[dtype])


@needs_backend
@pytest.mark.parametrize("static", [False, True])
def test_fp8_w8a8_approximates_float_linear(static):
    """quantize_fp8 + fp8_matmul against x @ w^T + bias in fp64: e4m3 keeps 3 mantissa bits (a step of 2^-3 .. 2^-4
    of each value), measured 2.0 % (dynamic) / 2.1 % (static) here (fp32 under the interpreter); bound 3 %."""
    g = torch.Generator().manual_seed(5)
    x, w, bias = torch.randn(17, 150, generator=g), torch.randn(70, 150, generator=g) * 0.05, torch.randn(70, generator=g)
    wq, w_scale = quantize_fp8_ref(w)
    scale = (x.abs().max() / E4M3_MAX).reshape(1).to(DEVICE) if static else None
    xq, x_scale = quantize_fp8(x.to(DEVICE), scale=scale)
    y = fp8_matmul(xq, x_scale, wq.to(DEVICE), w_scale.to(DEVICE), bias=bias.to(DEVICE), out_dtype=FP32)
    expected = x.double() @ w.double().T + bias.double()
    err = ((y.cpu().double() - expected).norm() / expected.norm()).item()
    assert err < 0.03, f"relative error {err:.2e}"


@needs_backend
@pytest.mark.parametrize("weight_only", [False, True])
def test_fp8_every_gpu_config_is_correct(monkeypatch, weight_only):
    """Each CUDA candidate (tile shapes, masks at M, N, K not multiples of the blocks), run through the launcher."""
    monkeypatch.setattr(w8a8_gemm, "interpreter_on", lambda: False)
    gpu_configs = w8a8_gemm.configs(1) + w8a8_gemm.configs(64)
    x, wq, w_scale, bias = gemm_problem(20, 70, 150, FP16, seed=2)
    xq, x_scale = quantize_fp8(x)
    a, a_scale = (x, None) if weight_only else (xq, x_scale)
    ref = (fp8_weight_only_matmul_ref(x, wq, w_scale, bias=bias) if weight_only else
           fp8_matmul_ref(xq, x_scale, wq, w_scale, bias=bias, out_dtype=FP16))
    for config in {tuple(c.items()): c for c in gpu_configs}.values():
        y = fp8_gemm.launch(config, "w8a16" if weight_only else "w8a8", a, a_scale, wq, w_scale, bias, FP16)
        check(y, ref, magnitude(a, a_scale, wq, w_scale, bias), FP16, gemm_tol(FP16, weight_only))


# --- split-K -------------------------------------------------------------------------------------------------------

def gemm_operands(mode, m, n, k, dtype, seed, big=False):
    """(a, a_scale, wq, w_scale, bias) of a problem: w8a8 the e4m3 codes of x and their scales, w8a16 x itself."""
    x, wq, w_scale, bias = gemm_problem(m, n, k, dtype, seed, big)
    a, a_scale = quantize_fp8(x) if mode == "w8a8" else (x, None)
    return a, a_scale, wq, w_scale, bias


def reference(mode, a, a_scale, wq, w_scale, bias, dtype):
    return (fp8_matmul_ref(a, a_scale, wq, w_scale, bias=bias, out_dtype=dtype) if mode == "w8a8" else
            fp8_weight_only_matmul_ref(a, wq, w_scale, bias=bias).to(dtype))


@needs_backend
@SLOW
@given(m=st.sampled_from([1, 2, 5, 16, 17, 40]), n=st.integers(0, 75).map(lambda i: 2 * i + 1),
       k=st.integers(16, 200).map(lambda i: 2 * i + 1), split_k=st.sampled_from([2, 3, 4]),
       mode=st.sampled_from(["w8a8", "w8a16"]), dtype=st.sampled_from(DTYPES), bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_fp8_split_k_sums_the_splits_in_order(m, n, k, split_k, mode, dtype, bias, seed):
    """The split-K path (INTERPRETER_SPLIT_CONFIG's tile, K over 2-4 splits of BLOCK_K steps, the last ragged) gives
    y = (((0 + acc_0) + acc_1) + ...) * x_scale * w_scale in fp32 bit for bit, acc_s the unsplit kernel's fp32
    accumulator over split s's K range (run with unit scales on that slice): the docstring's formula. With bias and
    out dtype, the reference within tolerance, and a second call the same (the arrival counters are left at zero)."""
    a, a_scale, wq, w_scale, b = gemm_operands(mode, m, n, k, dtype, seed)
    config = dict(w8a8_gemm.INTERPRETER_SPLIT_CONFIG, SPLIT_K=split_k)
    unsplit = {key: v for key, v in config.items() if key != "SPLIT_K"}
    per_split, splits = split_k_grid(k, config["BLOCK_K"], split_k)
    assert splits > 1
    ones = None if a_scale is None else torch.ones_like(a_scale)
    acc = torch.zeros(m, n, device=DEVICE)
    for lo in range(0, k, per_split):
        part = slice(lo, min(lo + per_split, k))
        acc += fp8_gemm.launch(unsplit, mode, a[:, part].contiguous(), ones, wq[:, part].contiguous(),
                               torch.ones_like(w_scale), None, FP32)
    expected = (acc if a_scale is None else acc * a_scale[:, None]) * w_scale[None, :]
    assert torch.equal(fp8_gemm.launch(config, mode, a, a_scale, wq, w_scale, None, FP32), expected)
    b = b if bias else None
    y = fp8_gemm.launch(config, mode, a, a_scale, wq, w_scale, b, dtype)
    assert torch.equal(fp8_gemm.launch(config, mode, a, a_scale, wq, w_scale, b, dtype), y)
    check(y, reference(mode, a, a_scale, wq, w_scale, b, dtype), magnitude(a, a_scale, wq, w_scale, b), dtype,
          gemm_tol(dtype, mode == "w8a16"))


@needs_backend
@pytest.mark.parametrize("m", [1, 17, 40])
def test_fp8_every_split_k_candidate(monkeypatch, m):
    """Each GPU split-K candidate (every w8a8_gemm.SPLIT_TILES entry at the BLOCK_M of M 1 / 32 / 64: unpruned), forced
    through the launcher at N 301, K 2049 (2-8 splits, the last ragged), W8A8 and weight-only: the reference and the
    same tile unsplit within tolerance; up to M 16 the fused kernel at the tile, bit for bit the W8A8 split. On a GPU
    (TRITON_INTERPRET=0) this is the compiled split path (fp8 wgmma partials) with its atomic counters."""
    monkeypatch.setattr(w8a8_gemm, "interpreter_on", lambda: False)
    split_configs = [c for c in w8a8_gemm.configs(1 << (m - 1).bit_length()) if c.get("SPLIT_K", 1) > 1]
    assert len(split_configs) == len(w8a8_gemm.SPLIT_TILES)
    for mode in ("w8a8", "w8a16"):
        a, a_scale, wq, w_scale, bias = gemm_operands(mode, m, 301, 2049, FP16, seed=m)
        ref, mag = reference(mode, a, a_scale, wq, w_scale, bias, FP16), magnitude(a, a_scale, wq, w_scale, bias)
        tol = gemm_tol(FP16, mode == "w8a16")
        for config in split_configs:
            y = fp8_gemm.launch(config, mode, a, a_scale, wq, w_scale, bias, FP16)
            unsplit = {key: v for key, v in config.items() if key != "SPLIT_K"}
            check(y, ref, mag, FP16, tol)
            check(y, fp8_gemm.launch(unsplit, mode, a, a_scale, wq, w_scale, bias, FP16), mag, FP16, tol)
            if mode == "w8a8" and config["BLOCK_M"] == 16:
                x = gemm_problem(m, 301, 2049, FP16, seed=m)[0]
                assert torch.equal(fp8_gemm.launch(config, "fused", x, None, wq, w_scale, bias, FP16), y), config


# --- the fused path: activation quantization inside the GEMM -------------------------------------------------------

@triton.jit
def _divide_kernel(x_ptr, s_ptr, q_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    m, r, p = fp8_gemm.divisor(tl.load(s_ptr + offs, mask=ok, other=1.0))
    tl.store(q_ptr + offs, fp8_gemm.divide(tl.load(x_ptr + offs, mask=ok, other=0.0), m, r, p), mask=ok)


@needs_backend
def test_fp8_divide_is_ieee_division():
    """divide(x, *divisor(s)) against torch's x / s (IEEE) bit for bit wherever |x / s| >= 2^-103, and below (an e4m3
    zero either way) with x's sign and below 2^-102: 2^18 random scales from fp32's smallest normal to 2^119 (the
    per-token scales of any fp16 / bf16 / fp32 row), quotients from 2^-140 to 448 (the codes' range) and 448.0001 (a
    row's maximum over its rounded-down scale), either sign, 0 and -0, and subnormal x."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 18
    s = torch.exp2(torch.empty(n).uniform_(-126, 119, generator=g)) * torch.empty(n).uniform_(1, 2, generator=g)
    s = s.clamp(torch.finfo(FP32).tiny, 2.0**119)
    q = torch.exp2(torch.empty(n).uniform_(-140, 8.807, generator=g)).clamp_max(448.0)
    x = (q * s) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x[:64] = torch.tensor([0.0, -0.0, 448.0001, -448.0001] * 16) * s[:64]
    x[64:128] = torch.finfo(FP32).tiny * torch.empty(64).uniform_(-1, 1, generator=g)  # subnormal x
    x, s = x.to(DEVICE), s.to(DEVICE)
    out = torch.empty_like(x)
    _divide_kernel[(triton.cdiv(n, 4096),)](x, s, out, n, BLOCK=4096)
    ieee = x / s
    exact = ieee.abs() >= 2.0**-103
    assert exact.float().mean() > 0.6
    assert torch.equal(out[exact].view(torch.int32), ieee[exact].view(torch.int32))
    assert torch.equal(out.signbit(), x.signbit()) and (out[~exact].abs() < 2.0**-102).all()


def fused_config():
    """The first fused candidate: the interpreter's config, or on a GPU the first fused GPU tile."""
    return next(c for c in fp8_gemm.linear_configs(1, static=False) if c["path"] == "fused")


@needs_backend
@SLOW
@given(m=st.integers(1, 40), n=st.integers(1, 150), k=st.integers(1, 200), dtype=st.sampled_from(DTYPES),
       bias=st.booleans(), mode=st.sampled_from(["normal", "big", "tiny"]), zero_rows=st.lists(st.integers(0, 40),
       max_size=3), split_k=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31 - 1))
@example(m=17, n=33, k=77, dtype=FP16, bias=True, mode="big", zero_rows=[2, 16], split_k=1, seed=0)  # 6e4: fp16 inf
@example(m=17, n=33, k=77, dtype=FP16, bias=True, mode="big", zero_rows=[2, 16], split_k=3, seed=0)
@example(m=1, n=1, k=1, dtype=BF16, bias=False, mode="tiny", zero_rows=[], split_k=1, seed=1)
def test_fp8_fused_matches_two_launches(m, n, k, dtype, bias, mode, zero_rows, split_k, seed):
    """The fused kernel (x in its dtype, quantized per token inside the GEMM) gives what quantize_fp8 + the W8A8 GEMM
    at the same tile give, bit for bit (the same e4m3 codes and scales), and so the reference within its tolerance:
    odd M, N, K, outlier channels up to 6e4 (fp16) / 1e30, rows all tiny, rows of zeros among the others; unsplit and
    split-K (split_k > 1: the same splits in both, each fused split taking the rows' scales over all of K)."""
    x, wq, w_scale, b = gemm_problem(m, n, k, dtype, seed, mode == "big")
    if mode == "tiny":
        x = activations(m, k, dtype, seed, tiny=True)
    x[[r % m for r in zero_rows]] = 0
    b = b if bias else None
    config = fused_config() if split_k == 1 else dict(fused_config(), SPLIT_K=split_k)
    y = fp8_gemm.launch(config, "fused", x, None, wq, w_scale, b, dtype)
    xq, x_scale = quantize_fp8(x)
    two = fp8_gemm.launch(config, "w8a8", xq, x_scale, wq, w_scale, b, dtype)
    assert torch.equal(y, two)
    ref = fp8_matmul_ref(xq, x_scale, wq, w_scale, bias=b, out_dtype=dtype)
    check(y, ref, magnitude(xq, x_scale, wq, w_scale, b), dtype, gemm_tol(dtype))


@needs_backend
@pytest.mark.parametrize("m,static", [(1, False), (3, True), (16, False), (17, False)])
def test_fp8_linear_is_quantize_then_gemm(m, static):
    """fp8_linear (FP8Linear's W8A8 forward) equals quantize_fp8 + the W8A8 GEMM whichever path it takes: the fused
    kernel up to FUSED_MAX_M with per-token scales (the interpreter's one candidate there; on a GPU where the tuner
    picks it) against the GEMM at its tile, else the two launches themselves."""
    x, wq, w_scale, bias = gemm_problem(m, 70, 150, BF16, seed=m, big=True)
    scale = (x.float().abs().max() / E4M3_MAX * 0.5).reshape(1) if static else None
    y = fp8_linear(x, wq, w_scale, scale=scale, bias=bias)
    xq, x_scale = quantize_fp8(x, scale=scale)
    config = fp8_gemm.linear_config(x, scale, wq, w_scale, bias)
    two = (fp8_gemm.launch(config, "w8a8", xq, x_scale, wq, w_scale, bias, BF16) if config["path"] == "fused" else
           fp8_matmul(xq, x_scale, wq, w_scale, bias=bias, out_dtype=BF16))
    assert torch.equal(y, two)
    fused = m <= fp8_gemm.FUSED_MAX_M and not static
    assert ("fused" in {c["path"] for c in fp8_gemm.linear_configs(m, static)}) == fused
    if DEVICE == "cpu":
        assert config["path"] == ("fused" if fused else "two_launch")
    assert fp8_linear(x[:0], wq, w_scale, bias=bias).shape == (0, 70)


@pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(),
                    reason="the GPU candidates run on a CUDA GPU (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("m,dtype", [(1, FP16), (5, BF16), (16, FP16)])
def test_fp8_linear_every_gpu_candidate(monkeypatch, m, dtype):
    """Every GPU candidate of fp8_linear (the two launches, the fused kernel at each 16-row tile and stage count), run
    through run_path on 6e4 outliers and a zero row, K 1000 and N 200 not multiples of the tiles: each equals
    quantize_fp8 + the W8A8 GEMM at its tile (the two launches: fp8_matmul's own tile) bit for bit. GPU only: the
    interpreter runs its own config."""
    monkeypatch.setattr(fp8_gemm, "interpreter_on", lambda: False)
    monkeypatch.setattr(w8a8_gemm, "interpreter_on", lambda: False)
    x, wq, w_scale, bias = gemm_problem(m, 200, 1000, dtype, seed=m, big=True, zero_row=m - 1)
    xq, x_scale = quantize_fp8(x)
    two = fp8_matmul(xq, x_scale, wq, w_scale, bias=bias, out_dtype=dtype)
    configs = fp8_gemm.linear_configs(m, static=False)
    # 2 tiles of BLOCK_M 16 x 2 stage counts, and the split-K tiles
    assert configs[0] == fp8_gemm.TWO_LAUNCH and len(configs) == 5 + len(w8a8_gemm.SPLIT_TILES)
    for config in configs:
        y = fp8_gemm.run_path(config, x, None, wq, w_scale, bias)
        expected = two if config == fp8_gemm.TWO_LAUNCH else fp8_gemm.launch(config, "w8a8", xq, x_scale, wq, w_scale,
                                                                             bias, dtype)
        assert torch.equal(y, expected), config


@needs_backend
def test_fp8_empty_batch():
    x, wq, w_scale, _ = gemm_problem(1, 8, 16, FP16, seed=0)
    xq, x_scale = quantize_fp8(x[:0])
    assert xq.shape == (0, 16) and x_scale.shape == (0,)
    assert fp8_matmul(xq, x_scale, wq, w_scale).shape == (0, 8)
    assert fp8_weight_only_matmul(x[:0], wq, w_scale).shape == (0, 8)


def _bad(t, **change):
    return dict(xq=t[0], x_scale=t[1], wq=t[2], w_scale=t[3], bias=t[4], out_dtype=FP16) | change


BAD_INPUTS = {
    "xq dtype": (lambda t: _bad(t, xq=t[0].float()), "xq must be a 2-D float8_e4m3fn"),
    "xq e5m2": (lambda t: _bad(t, xq=t[0].to(torch.float8_e5m2)), "xq must be a 2-D float8_e4m3fn"),
    "xq not 2-D": (lambda t: _bad(t, xq=t[0][None]), "xq must be a 2-D float8_e4m3fn"),
    "wq dtype": (lambda t: _bad(t, wq=t[2].half()), "wq must be a 2-D float8_e4m3fn"),
    "K mismatch": (lambda t: _bad(t, wq=t[2][:, :-1]), r"wq shape \(8, 15\) does not match.*K=16"),
    "x_scale dtype": (lambda t: _bad(t, x_scale=t[1].half()), "x_scale dtype"),
    "x_scale shape": (lambda t: _bad(t, x_scale=t[1][:-1]), "x_scale shape"),
    "w_scale shape": (lambda t: _bad(t, w_scale=t[3][:-1]), "w_scale shape"),
    "bias shape": (lambda t: _bad(t, bias=t[4][:-1]), "bias shape"),
    "bias dtype": (lambda t: _bad(t, bias=t[4].double()), "bias dtype"),
    "out_dtype": (lambda t: _bad(t, out_dtype=torch.int32), "out_dtype"),
}


def _inputs(device="cpu"):
    x, wq, w_scale, bias = gemm_problem(3, 8, 16, FP16, seed=1, device=device)
    return (*quantize_fp8_ref(x), wq, w_scale, bias)


@pytest.mark.parametrize("fn", [fp8_matmul, fp8_matmul_ref])
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_fp8_gemm_bad_input_raises(fn, case):
    make, message = BAD_INPUTS[case]
    args = make(_inputs())
    with pytest.raises(ValueError, match=message):
        fn(args.pop("xq"), args.pop("x_scale"), args.pop("wq"), args.pop("w_scale"), **args)


@pytest.mark.parametrize("fn", [fp8_weight_only_matmul, fp8_weight_only_matmul_ref])
def test_fp8_weight_only_bad_input_raises(fn):
    x, wq, w_scale, _ = gemm_problem(3, 8, 16, FP16, seed=1, device="cpu")
    with pytest.raises(ValueError, match="x must be a 2-D"):
        fn(x.double(), wq, w_scale)
    with pytest.raises(ValueError, match="wq must be a 2-D float8_e4m3fn"):
        fn(x, wq.half(), w_scale)


@pytest.mark.parametrize("fn", [quantize_fp8, quantize_fp8_ref])
def test_fp8_quant_bad_input_raises(fn):
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="x must be a 2-D"):
        fn(x[None])
    with pytest.raises(ValueError, match="x must be a 2-D"):
        fn(x.int())
    with pytest.raises(ValueError, match="static scale must be one float32"):
        fn(x, scale=torch.ones(2))


def test_fp8_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    xq, x_scale, wq, w_scale, _ = _inputs()
    with pytest.raises(ValueError, match="CUDA"):
        fp8_matmul(xq, x_scale, wq, w_scale)
    with pytest.raises(ValueError, match="CUDA"):
        quantize_fp8(torch.randn(2, 4))


def test_fp8_kernels_refuse_a_gpu_without_fp8(monkeypatch):
    """Compute capability below 8.9 (an A100: sm_80) has no e4m3 in Triton: refused naming the GPU and the fallback."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"compute capability 8.9 or newer.*A100-SXM4-80GB is sm_80.*backend='torch'"):
        fp8_gemm.check_fp8_device(torch.device("cuda", 0))
    fp8_gemm.check_fp8_device(torch.device("cpu"))  # the interpreter takes float8

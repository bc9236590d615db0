"""Per-token activation quantization: the kernel against the torch reference (identical codes and scales),
and the reference against plain float math.

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1, set by conftest.py); with
TRITON_INTERPRET=0 on a GPU it runs the same checks there.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tquant.kernels.act_quant import fake_quantize_activations, quantize_activations, quantize_activations_ref
from tests.kernel_device import DEVICE, needs_backend

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def activations(m, k, dtype, seed, smooth=False, device=DEVICE):
    """Random x [M, K] with a few outlier channels (x30..x100), and a smoothing vector in [0.1, 10]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    outliers = torch.randperm(k, generator=g)[: max(1, k // 16)]
    x[:, outliers] *= torch.empty(len(outliers)).uniform_(30, 100, generator=g)
    s = 10 ** (torch.rand(k, generator=g) * 2 - 1) if smooth else None
    return x.to(dtype).to(device), s.to(device) if s is not None else None


def unpack(q, bits, k):
    """int8 codes [M, K] from quantize_activations' output (4-bit: sign-extended nibbles, low = even k)."""
    if bits == 8:
        return q.int()
    lo, hi = (q << 4) >> 4, q >> 4  # int8 arithmetic shifts sign-extend each nibble
    return torch.stack([lo, hi], dim=-1).reshape(q.shape[0], -1)[:, :k].int()


@needs_backend
@SLOW
@given(m=st.sampled_from([1, 2, 5, 33]), k=st.integers(1, 200), bits=st.sampled_from([4, 8]),
       dtype=st.sampled_from(DTYPES), smooth=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_act_quant_kernel_matches_reference(m, k, bits, dtype, smooth, seed):
    x, s = activations(m, k, dtype, seed, smooth)
    q, scale = quantize_activations(x, bits=bits, smooth=s)
    q_ref, scale_ref = quantize_activations_ref(x, bits=bits, smooth=s)
    assert q.dtype == torch.int8 and q.shape == (m, -(-k // (8 // bits)))
    assert scale.dtype == torch.float32 and scale.shape == (m,)
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)



@needs_backend
@pytest.mark.parametrize("k,bits,dtype,mode", [(1025, 8, torch.float16, "smooth"), (4097, 4, torch.bfloat16, "plain"),
                                               (8193, 8, torch.float32, "static"), (5001, 4, torch.float16, "asym")])
def test_act_quant_long_rows(k, bits, dtype, mode):
    """Rows past 1024 (the GPU's BLOCK_K 2048 and up: 8 warps) and past 4096 (BLOCK_K 4096 walked 2 or 3 times per
    pass), the launch widths of Llama-sized rows that the hypothesis tests (K <= 200: one block of 128 or 256, 4 warps
    on the GPU) do not reach; identical codes, scales (and zeros) to the reference."""
    x, s = activations(2, k, dtype, seed=k, smooth=mode == "smooth")
    kw = dict(bits=bits, smooth=s, zero_point=mode == "asym")
    if mode == "static":
        kw["scale"] = (x.float().abs().max() / 127 * 0.5).reshape(1)  # half the rows' range: outliers clip
    out = quantize_activations(x, **kw)
    ref = quantize_activations_ref(x, **kw)
    for a, b in zip(out, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)

@SLOW
@given(m=st.integers(1, 6), k=st.integers(1, 200), bits=st.sampled_from([4, 8]), dtype=st.sampled_from(DTYPES),
       smooth=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_act_quant_reference_matches_float_math(m, k, bits, dtype, smooth, seed):
    """Codes in range, the row maximum at +-qmax, and codes * scale within half a step of x / smooth."""
    x, s = activations(m, k, dtype, seed, smooth, device="cpu")
    q, scale = quantize_activations_ref(x, bits=bits, smooth=s)
    codes = unpack(q, bits, k)
    qmax = 2 ** (bits - 1) - 1
    xs = x.double() / (s.double() if s is not None else 1.0)
    torch.testing.assert_close(scale.double(), xs.abs().amax(dim=1) / qmax, rtol=1e-6, atol=0)
    assert codes.abs().max() <= qmax and (codes.abs().amax(dim=1) == qmax).all()
    err = (xs - codes.double() * scale.double()[:, None]).abs()
    assert (err <= scale.double()[:, None] * (0.5 + 1e-4)).all()


@needs_backend
@pytest.mark.parametrize("fn", [quantize_activations, quantize_activations_ref])
def test_act_quant_rounds_half_to_even(fn):
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 63.5, -126.5]], device=DEVICE)  # scale 1
    q, scale = fn(x, bits=8)
    assert scale.tolist() == [1.0]
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, 64, -126]]


@needs_backend
@pytest.mark.parametrize("fn", [quantize_activations, quantize_activations_ref])
def test_act_quant_packs_nibbles_low_even(fn):
    x = torch.tensor([[7.0, -7.0, 1.0, -1.0, 3.0]], device=DEVICE)  # scale 1, codes = x
    q, _ = fn(x, bits=4)
    assert q.tolist() == [[7 - 7 * 16, 1 - 1 * 16, 3]]  # byte = code(2j) & 15 | code(2j + 1) << 4
    assert unpack(q.cpu(), 4, 5).tolist() == [[7, -7, 1, -1, 3]]


@needs_backend
@pytest.mark.parametrize("fn", [quantize_activations, quantize_activations_ref])
@pytest.mark.parametrize("bits", [4, 8])
def test_act_quant_zero_and_tiny_rows_get_scale_one(fn, bits):
    x = torch.zeros(3, 40, device=DEVICE)
    x[1, 5] = 1e-38  # max / qmax is subnormal
    x[2] = torch.linspace(-1, 1, 40)
    q, scale = fn(x, bits=bits)
    assert scale[:2].tolist() == [1.0, 1.0] and not q[:2].any()
    assert scale[2].item() == pytest.approx(1 / (2 ** (bits - 1) - 1))


@needs_backend
def test_act_quant_empty_batch():
    q, scale = quantize_activations(torch.randn(0, 9, device=DEVICE), bits=4)
    assert q.shape == (0, 5) and scale.shape == (0,)


BAD_INPUTS = {
    "bits": (dict(bits=3), "bits=3"),
    "x not 2-D": (dict(x=torch.randn(2, 3, 8)), "2-D"),
    "x dtype": (dict(x=torch.randn(3, 8).double()), "x dtype"),
    "empty K": (dict(x=torch.randn(3, 0)), "K >= 1"),
    "smooth shape": (dict(smooth=torch.ones(7)), "smooth shape"),
    "smooth dtype": (dict(smooth=torch.ones(8, dtype=torch.int32)), "smooth dtype"),
}


@pytest.mark.parametrize("fn", [quantize_activations, quantize_activations_ref])
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_act_quant_bad_input_raises(fn, case):
    change, message = BAD_INPUTS[case]
    args = dict(x=torch.randn(3, 8, dtype=torch.float16), bits=8, smooth=torch.ones(8)) | change
    with pytest.raises(ValueError, match=message):
        fn(**args)


def test_act_quant_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        quantize_activations(torch.randn(3, 8))


@needs_backend
@SLOW
@given(m=st.sampled_from([1, 4, 33]), k=st.integers(1, 150), bits=st.sampled_from([4, 8]),
       smooth=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_act_quant_static_scale_matches_reference(m, k, bits, smooth, seed):
    """Static per-tensor scale (half the dynamic row maxima, so codes clip at +-qmax): kernel == reference."""
    x, s = activations(m, k, torch.float16, seed, smooth)
    static = (x.float().abs().max() / (2 ** (bits - 1) - 1) / 2).reshape(1).to(DEVICE)
    q, scale = quantize_activations(x, bits=bits, smooth=s, scale=static)
    q_ref, scale_ref = quantize_activations_ref(x, bits=bits, smooth=s, scale=static)
    assert (scale == static).all() and scale.shape == (m,)
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)


def test_act_quant_static_scale_clips_and_fake_quant_matches_codes():
    x = torch.tensor([[1.0, -3.0, 0.26, 10.0]])
    static = torch.tensor([0.5])
    q, scale = quantize_activations_ref(x, bits=4, scale=static)
    assert unpack(q, 4, 4).tolist() == [[2, -6, 1, 7]] and scale.tolist() == [0.5]  # 10 / 0.5 = 20 clips to 7
    fake = fake_quantize_activations(x, bits=4, scale=static)
    assert fake.tolist() == [[1.0, -3.0, 0.5, 3.5]]
    x = torch.randn(2, 3, 40)
    q, scale = quantize_activations_ref(x.reshape(-1, 40), bits=8)
    torch.testing.assert_close(fake_quantize_activations(x, bits=8), (q.float() * scale[:, None]).reshape(2, 3, 40))


def test_act_quant_static_scale_must_be_one_float32():
    with pytest.raises(ValueError, match="static scale must be one float32"):
        quantize_activations_ref(torch.randn(2, 8), scale=torch.ones(2))


@needs_backend
@pytest.mark.parametrize("fn", [quantize_activations, quantize_activations_ref])
def test_act_quant_unpacked_4bit_codes_are_the_packed_ones(fn):
    x, _ = activations(5, 37, torch.float16, seed=4)
    packed, scale = fn(x, bits=4)
    codes, scale_unpacked = fn(x, bits=4, pack=False)
    assert codes.dtype == torch.int8 and codes.shape == (5, 37) and codes.abs().max() <= 7
    torch.testing.assert_close(codes.cpu().int(), unpack(packed.cpu(), 4, 37), rtol=0, atol=0)
    torch.testing.assert_close(scale_unpacked, scale, rtol=0, atol=0)


@needs_backend
@SLOW
@given(m=st.sampled_from([1, 2, 5]), k=st.integers(1, 150), bits=st.integers(2, 8), dtype=st.sampled_from(DTYPES),
       smooth=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_act_quant_asymmetric_kernel_matches_reference(m, k, bits, dtype, smooth, seed):
    """zero_point=True (ABQ-LLM's per-token activations, bits 2..8): identical centred codes, scales and zeros; a row
    of zeros and a constant row included."""
    x, s = activations(m, k, dtype, seed, smooth)
    x[0] = 0
    if m > 1:
        x[1] = 3.0
    out = quantize_activations(x, bits=bits, smooth=s, zero_point=True)
    ref = quantize_activations_ref(x, bits=bits, smooth=s, zero_point=True)
    for a, b in zip(out, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)


@given(m=st.sampled_from([1, 3]), k=st.integers(1, 150), bits=st.integers(2, 8), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=25, deadline=None)
def test_act_quant_asymmetric_reference_is_the_quantizers_grid(m, k, bits, seed):
    """The reference gives tquant.formats.quantizer's asymmetric min-max codes (qparams(sym=False), quantize) per row."""
    from tquant.formats.quantizer import qparams, quantize

    x, _ = activations(m, k, torch.float32, seed, device="cpu")
    q, scale, zero = quantize_activations_ref(x, bits=bits, zero_point=True)
    s_ref, z_ref = qparams(x, bits, sym=False)
    assert torch.equal(scale, s_ref) and torch.equal(zero, z_ref.to(torch.int32))
    assert torch.equal(q.int() + 2 ** (bits - 1), quantize(x, s_ref[:, None], z_ref[:, None], bits))


def test_act_quant_asymmetric_bad_input_raises():
    x = torch.randn(2, 8).to(DEVICE)
    with pytest.raises(ValueError, match=r"bits=9 is not supported; use one of \(2, 3, 4, 5, 6, 7, 8\)"):
        quantize_activations_ref(x, bits=9, zero_point=True)
    with pytest.raises(ValueError, match=r"bits=3 is not supported; use one of \(4, 8\) \(2..8 with zero_point"):
        quantize_activations_ref(x, bits=3)
    with pytest.raises(ValueError, match="a static scale is not supported"):
        quantize_activations_ref(x, bits=8, zero_point=True, scale=torch.ones(1))

"""The FP8 (e4m3) KV-cache format (tquant.kv.fp8_format): every element stored as the e4m3 value nearest to x / s_h
(ties to the even code, saturating at +-448), checked against a table of all 254 finite e4m3 values built from their
bit fields (not torch's cast); the round trip's error bounds; the scales from absmax; bad input refused by name."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tquant.kv.fp8_format import absmax_scale, dequantize_fp8_kv, quantize_fp8_kv


def e4m3_table() -> tuple[torch.Tensor, torch.Tensor]:
    """(values float64 [254], codes int [254]): every finite e4m3 value from its bits (sign, 4 exponent bits with
    bias 7, 3 mantissa bits; exponent 0: subnormal m / 8 * 2^-6; 0x7F / 0xFF are NaN)."""
    values, codes = [], []
    for code in range(256):
        if code & 0x7F == 0x7F:
            continue
        sign, e, m = code >> 7, (code >> 3) & 15, code & 7
        magnitude = m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        values.append(-magnitude if sign else magnitude)
        codes.append(code)
    return torch.tensor(values, dtype=torch.float64), torch.tensor(codes)


TABLE, CODES = e4m3_table()
MIDPOINTS = (TABLE.unique()[1:] + TABLE.unique()[:-1]) / 2  # ties: each lies halfway between two e4m3 values


def nearest_e4m3(y: torch.Tensor) -> torch.Tensor:
    """The e4m3 value nearest to each y (float64, |y| <= 448), ties to the even code (lsb 0); +-0 compare equal."""
    dist = (y.reshape(-1, 1) - TABLE[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    tied = dist == best
    even = tied & (CODES[None, :] % 2 == 0)
    pick = torch.where(even.any(dim=1, keepdim=True), even, tied).float().argmax(dim=1)
    return TABLE[pick].reshape(y.shape)


def data(shape, seed, magnitude, specials):
    """Random keys / values [B, H, T, D] of about 10^magnitude, with special values (ties, the range's edges, past it)
    put in at random places of head 0 (as many as fit)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 10.0**magnitude
    head = x[:, 0].clone().view(-1)
    n = min(len(specials), head.numel())
    head[torch.randperm(head.numel(), generator=g)[:n]] = torch.tensor(specials[:n], dtype=torch.float64)
    x[:, 0] = head.view_as(x[:, 0])
    return x


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 2), heads=st.integers(1, 3), t=st.integers(1, 9), d=st.sampled_from([1, 5, 16]),
       magnitude=st.integers(-12, 5), scales=st.lists(st.sampled_from([1.0, 2.0**-20, 3e-7, 0.013, 0.75, 7.5, 1e3]),
                                                       min_size=3, max_size=3),
       tie=st.integers(0, len(MIDPOINTS) - 1), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_fp8_codes_are_the_nearest_e4m3_values_of_x_over_the_heads_scale(b, heads, t, d, magnitude, scales, tie,
                                                                         dtype, seed):
    scale = torch.tensor(scales[:heads], dtype=torch.float32)
    s0 = scale[0].item()
    specials = [MIDPOINTS[tie].item() * s0, -MIDPOINTS[tie].item() * s0, 448 * s0, -448 * s0, 465 * s0, -1e4 * s0,
                2.0**-9 * s0 * 1.5, 2.0**-10 * s0]
    x = data((b, heads, t, d), seed, magnitude, specials).to(dtype)
    if not x.isfinite().all():  # an fp16 cast past 65504
        x = x.clamp(-60000, 60000)
    codes = quantize_fp8_kv(x, scale, "keys")
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape
    y = (x.float() / scale[:, None, None]).double().clamp(-448, 448)  # the fp32 division, then the table
    assert torch.equal(codes.double(), nearest_e4m3(y))
    back = dequantize_fp8_kv(codes, scale)
    assert back.dtype == torch.float32 and torch.equal(back, codes.float() * scale[:, None, None])
    # the round trip's bounds: 2^-4 relative (normals), 2^-10 s absolute (subnormals), saturation at 448 s
    x64, s = x.double(), scale.double()[:, None, None]
    inside = x64.abs() <= 448 * s
    err = (back.double() - x64).abs()
    assert (err <= torch.maximum(x64.abs() * 2.0**-4, 2.0**-10 * s) * (1 + 1e-6))[inside].all()
    assert torch.equal(back.double()[~inside], (x64.sign() * 448 * s.expand_as(x64))[~inside].float().double())


def test_fp8_keeps_nan_and_saturates_inf():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, 3.0]).view(1, 1, 1, 5)
    back = dequantize_fp8_kv(quantize_fp8_kv(x, torch.tensor([0.5])), torch.tensor([0.5]))
    assert back[0, 0, 0, 0].isnan() and back[0, 0, 0, 1:].tolist() == [224.0, -224.0, 224.0, 3.0]


def test_absmax_scale_puts_the_largest_value_on_448():
    absmax = torch.tensor([4.48, 1e-3, 0.0, 1e-44, 6e4])
    scale = absmax_scale(absmax)
    assert scale.dtype == torch.float32
    assert torch.equal(scale[[0, 1, 4]], absmax[[0, 1, 4]] / 448) and scale[2:4].tolist() == [1.0, 1.0]
    x = absmax[[0, 1, 4]].view(1, 3, 1, 1)
    assert torch.equal(quantize_fp8_kv(x, scale[[0, 1, 4]]).float().view(-1), torch.full((3,), 448.0))


@pytest.mark.parametrize("case, match", [
    ("scale heads", r"keys scale must be fp32 \[Hkv=2\]"),
    ("scale dtype", r"keys scale must be fp32"),
    ("rank", r"fp8 KV cache's keys must be a float \[B, Hkv, T, D\]"),
    ("fp8 input", r"fp8 KV cache's keys must be a float"),
])
def test_fp8_format_bad_input_raises(case, match):
    x, scale = torch.randn(1, 2, 3, 4), torch.ones(2)
    x, scale = {"scale heads": (x, torch.ones(3)), "scale dtype": (x, scale.half()), "rank": (x[0], scale),
                "fp8 input": (x.to(torch.float8_e4m3fn), scale)}[case]
    with pytest.raises(ValueError, match=match):
        quantize_fp8_kv(x, scale, "keys")

"""The decode step's small fused kernels against their torch references on fresh random inputs: RMSNorm with and
without the residual add (tquant.kernels.rms_norm), RoPE with the cache write (rope), silu(gate) * up (swiglu), the
float-cache decode attention (kv_attention.float_decode_attention); odd widths and strided views; bad input."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.kernel_device import DEVICE, needs_backend

from tquant.kv.attention import float_decode_attention, reference_attention
from tquant.kernels.rms_norm import rms_norm, rms_norm_ref
from tquant.kernels.rope import rope_qkv, rope_qkv_ref
from tquant.kernels.swiglu import silu_mul, silu_mul_ref

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ULP = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}  # one rounding of the output
FEW = settings(max_examples=12, deadline=None)


def randn(*shape, dtype, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, dtype)


def close(y, ref, dtype, tol_ulps=2):
    """Elementwise: within tol_ulps roundings of dtype of the reference (the same ops, rounded the same way, up to
    fp32 reassociation and exp / rsqrt implementations)."""
    assert y.dtype == ref.dtype and y.shape == ref.shape and y.isfinite().all()
    assert (y != ref).any() or y.abs().max() > 0, "an all-zero output compares to nothing"
    err = (y.double() - ref.double()).abs()
    assert (err <= tol_ulps * ULP[dtype] * ref.double().abs() + 1e-6).all(), err.max().item()


@needs_backend
@FEW
@given(rows=st.integers(1, 5), h=st.integers(1, 300), dtype=st.sampled_from(DTYPES), residual=st.booleans(),
       w_fp32=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kernels_rms_norm_matches_reference(rows, h, dtype, residual, w_fp32, seed):
    x = randn(rows, 2, h, dtype=dtype, seed=seed, scale=3.0)
    r = randn(rows, 2, h, dtype=dtype, seed=seed + 1) if residual else None
    w = randn(h, dtype=torch.float32 if w_fp32 else dtype, seed=seed + 2) + 1
    y, hidden = rms_norm(x, w, 1e-5, r)
    y_ref, h_ref = rms_norm_ref(x, w, 1e-5, r)
    close(hidden, h_ref, dtype, tol_ulps=1)  # the add: one rounding in either
    close(y, y_ref, dtype, tol_ulps=4)  # the normed row is rounded to x's dtype before w (fp32 or not) scales it



@needs_backend
@pytest.mark.parametrize("h,dtype,residual", [(4096, torch.float16, True), (5120, torch.bfloat16, False),
                                              (14336, torch.float32, True)])
def test_kernels_rms_norm_long_rows(h, dtype, residual):
    """Llama-sized rows (BLOCK 4096 to 16384: 16 warps on the GPU), which the hypothesis test (H <= 300: 1 or 2 warps)
    does not reach."""
    x = randn(3, h, dtype=dtype, seed=h, scale=3.0)
    r = randn(3, h, dtype=dtype, seed=h + 1) if residual else None
    w = randn(h, dtype=dtype, seed=h + 2) + 1
    y, hidden = rms_norm(x, w, 1e-5, r)
    y_ref, h_ref = rms_norm_ref(x, w, 1e-5, r)
    close(hidden, h_ref, dtype, tol_ulps=1)
    close(y, y_ref, dtype, tol_ulps=4)

@needs_backend
def test_kernels_rms_norm_strided_rows_and_bad_input():
    x = randn(3, 40, dtype=torch.float16, seed=1)[:, :33]  # rows 40 apart
    w = randn(33, dtype=torch.float16, seed=2)
    close(rms_norm(x, w, 1e-6)[0], rms_norm_ref(x, w, 1e-6)[0], torch.float16, tol_ulps=4)
    with pytest.raises(ValueError, match="w must be"):
        rms_norm(x, w[:5], 1e-6)
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(x, w, 1e-6, x.float())
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(x.t(), w[:3], 1e-6)


def rope_case(b, t, hq, hkv, d, dtype, seed, big_t):
    """Projection-like views q [B, t, Hq, D], k, v (slices of one [B, t, (Hq + 2 Hkv) D] output), HF-style cos / sin
    and NaN-filled outputs: a cache layer of big_t rows written at shuffled rows."""
    qkv = randn(b, t, (hq + 2 * hkv) * d, dtype=dtype, seed=seed)
    q = qkv[..., : hq * d].view(b, t, hq, d)
    k = qkv[..., hq * d : (hq + hkv) * d].view(b, t, hkv, d)
    v = qkv[..., (hq + hkv) * d :].view(b, t, hkv, d)
    g = torch.Generator().manual_seed(seed + 1)
    pos = torch.randint(0, 1000, (b, t), generator=g).float()
    freqs = pos[..., None] / 10000 ** (torch.arange(0, d, 2) / d)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)
    rows = torch.randperm(big_t, generator=g)[:t].to(DEVICE)
    outs = [torch.full((b, hq, t, d), float("nan"), dtype=dtype, device=DEVICE),
            torch.full((b, hkv, big_t, d), float("nan"), dtype=dtype, device=DEVICE),
            torch.full((b, hkv, big_t, d), float("nan"), dtype=dtype, device=DEVICE)]
    return (q, k, v, cos, sin), outs, rows


@needs_backend
@FEW
@given(b=st.integers(1, 3), t=st.integers(1, 5), hkv=st.integers(1, 2), rep=st.sampled_from([1, 3]),
       d=st.sampled_from([16, 64]), dtype=st.sampled_from(DTYPES), extra=st.integers(0, 4),
       seed=st.integers(0, 2**31 - 1))
def test_kernels_rope_qkv_matches_reference(b, t, hkv, rep, d, dtype, extra, seed):
    args, outs, rows = rope_case(b, t, hkv * rep, hkv, d, dtype, seed, t + extra)
    refs = [o.clone() for o in outs]
    rope_qkv(*args, *outs, rows)
    rope_qkv_ref(*args, *refs, rows)
    for out, ref in zip(outs, refs):
        assert torch.equal(out.isnan(), ref.isnan())  # the same rows written, the rest untouched
        out, ref = out.nan_to_num(), ref.nan_to_num()  # sums of two rounded products may cancel: over the norm
        assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < ULP[dtype]



@needs_backend
@pytest.mark.parametrize("d,dtype", [(128, torch.float16), (256, torch.bfloat16), (256, torch.float32)])
def test_kernels_rope_qkv_wide_heads(d, dtype):
    """Head sizes 128 (Llama) and 256 (Gemma: 4 warps on the GPU), which the hypothesis test (D 16 / 64: 1 warp) does
    not reach."""
    args, outs, rows = rope_case(2, 3, 4, 2, d, dtype, d, 9)
    refs = [o.clone() for o in outs]
    rope_qkv(*args, *outs, rows)
    rope_qkv_ref(*args, *refs, rows)
    for out, ref in zip(outs, refs):
        assert torch.equal(out.isnan(), ref.isnan())
        out, ref = out.nan_to_num(), ref.nan_to_num()
        assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < ULP[dtype]

@needs_backend
def test_kernels_rope_qkv_bad_input():
    args, outs, rows = rope_case(1, 2, 4, 2, 16, torch.float16, 0, 4)
    q, k, v, cos, sin = args
    with pytest.raises(ValueError, match="k must be"):
        rope_qkv(q, k[:, :1], v, cos, sin, *outs, rows)
    with pytest.raises(ValueError, match="rows must be int64"):
        rope_qkv(*args, *outs, rows.int())
    with pytest.raises(ValueError, match="cos must be in q's dtype"):
        rope_qkv(q, k, v, cos.float(), sin, *outs, rows)
    with pytest.raises(ValueError, match="even power of two"):
        rope_qkv(q[..., :12], k[..., :12], v[..., :12], cos[..., :12], sin[..., :12], *(o[..., :12] for o in outs),
                 rows)


@needs_backend
@FEW
@given(rows=st.integers(1, 4), width=st.integers(1, 700), dtype=st.sampled_from(DTYPES), fused=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_kernels_silu_mul_matches_reference(rows, width, dtype, fused, seed):
    """gate and up as separate tensors, or as the two halves of one fused projection's output (strided rows)."""
    both = randn(rows, 2 * width, dtype=dtype, seed=seed, scale=4.0)
    gate, up = (both[:, :width], both[:, width:]) if fused else (both[:, :width].clone(), both[:, width:].clone())
    close(silu_mul(gate, up), silu_mul_ref(gate, up), dtype, tol_ulps=2)


@needs_backend
def test_kernels_silu_mul_bad_input():
    g = randn(2, 8, dtype=torch.float16, seed=0)
    with pytest.raises(ValueError, match="one shape and dtype"):
        silu_mul(g, g.float())
    with pytest.raises(ValueError, match="one shape and dtype"):
        silu_mul(g, g[:, :4])


@needs_backend
@FEW
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), rep=st.sampled_from([1, 4]), d=st.sampled_from([16, 64]),
       t=st.integers(1, 90), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_kernels_float_decode_attention_matches_reference(b, hkv, rep, d, t, dtype, seed):
    """A static cache of t rows filled up to length[b] (garbage past it: large values that would show)."""
    k = randn(b, hkv, t, d, dtype=dtype, seed=seed, scale=2.0)
    v = randn(b, hkv, t, d, dtype=dtype, seed=seed + 1)
    q = randn(b, hkv * rep, d, dtype=dtype, seed=seed + 2)
    length = torch.randint(1, t + 1, (b,), generator=torch.Generator().manual_seed(seed + 3)).to(DEVICE, torch.int32)
    unread = torch.arange(t, device=DEVICE)[None, :] >= length[:, None]
    k = k.masked_fill(unread[:, None, :, None], 1e3)
    v = v.masked_fill(unread[:, None, :, None], 1e3)
    out = float_decode_attention(q, k, v, length=length, sm_scale=0.3)
    ref = reference_attention(q, k.float(), v.float(), 0.3, unread=unread)
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    assert out.shape == q.shape and out.dtype == dtype and out.isfinite().all()
    assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < tol


@needs_backend
def test_kernels_float_decode_attention_bad_input():
    k = randn(1, 2, 8, 16, dtype=torch.float16, seed=0)
    q = randn(1, 4, 16, dtype=torch.float16, seed=1)
    length = torch.full((1,), 3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="v shape"):
        float_decode_attention(q, k, k[:, :, :4], length=length)
    with pytest.raises(ValueError, match="k dtype"):
        float_decode_attention(q, k.float(), k.float(), length=length)
    with pytest.raises(ValueError, match="length shape"):
        float_decode_attention(q, k, k, length=length.expand(2))

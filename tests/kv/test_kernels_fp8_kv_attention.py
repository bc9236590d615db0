"""Decode attention over the fp8 KV cache (tquant.kv.attention.fp8_decode_attention): the Triton kernel's FP8 store
shares against the torch reference (torch's float8 cast, fp32) on random caches: GQA, every query dtype, per-head
scales from tiny to large, left padding, a static store filled up to length[b] (garbage past it unread), a growing
store's view read in place, an empty store or window; the input checks; and a model decoding through the kernel
path gives the torch path's logits."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.kernel_device import DEVICE, decode_both_paths, needs_backend
from tests.kv.test_kernels_kv_attention import TOL, grown

from tquant.kv.attention import fp8_decode_attention, fp8_decode_attention_ref
from tquant.kv.fp8_format import absmax_scale, quantize_fp8_kv


def fp8_cache(b, hkv, d, tq, tr, dtype, magnitudes, seed):
    """An fp8 store of tq tokens (KV head h's keys about 10^magnitudes[h], scales from their absmax) and a window
    of tr tokens in dtype."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.tensor([10.0**m for m in magnitudes[:hkv]])[None, :, None, None]
    k = (torch.randn(b, hkv, tq + tr, d, generator=g) * 2 + torch.randn(d, generator=g)) * mag
    v = torch.randn(b, hkv, tq + tr, d, generator=g) * mag
    scales = [absmax_scale(x[..., :tq, :].abs().amax(dim=(0, 2, 3))) if tq else torch.ones(hkv) for x in (k, v)]
    k8, v8 = (quantize_fp8_kv(x[..., :tq, :], s) for x, s in zip((k, v), scales))
    move = lambda t: t.to(DEVICE)  # noqa: E731
    return (move(k8), move(v8), *map(move, scales), k[..., tq:, :].to(DEVICE, dtype),
            v[..., tq:, :].to(DEVICE, dtype))


@needs_backend
@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), rep=st.sampled_from([1, 3, 4]), d=st.sampled_from([16, 32, 64]),
       tq=st.integers(0, 45), tr=st.integers(0, 2),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       magnitudes=st.lists(st.integers(-3, 3), min_size=2, max_size=2), ragged=st.booleans(),
       static=st.booleans(), spare=st.sampled_from([0, 0, 5]), seed=st.integers(0, 2**31 - 1))
def test_kernels_fp8_attention_matches_reference(b, hkv, rep, d, tq, tr, dtype, magnitudes, ragged, static, spare,
                                                 seed):
    if tq + tr == 0:
        tr = 1
    k8, v8, ks, vs, rk, rv = fp8_cache(b, hkv, d, tq, tr, dtype, magnitudes, seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(b, hkv * rep, d, generator=g).to(DEVICE, dtype)
    length = start = None
    if static and tq:  # a static store filled up to length[b]: the rows past it hold other tokens, never read
        length = torch.randint(0 if tr else 1, tq + 1, (b,), generator=g, dtype=torch.int32).to(DEVICE)
    if ragged:  # left padding: row i starts at start[i], at least one token left
        read = tq if length is None else int(length.min())
        start = torch.randint(0, read + tr, (b,), generator=g).to(DEVICE)
    args = dict(start=start, length=length)
    ref = fp8_decode_attention_ref(q, k8, v8, ks, vs, rk, rv, sm_scale=d**-0.5, **args)
    if spare:
        k8, v8, rk, rv = (grown(t, spare) for t in (k8, v8, rk, rv))
    out = fp8_decode_attention(q, k8, v8, ks, vs, rk, rv, **args)
    assert out.shape == q.shape and out.dtype == dtype and out.isfinite().all()
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < TOL[dtype], err
    if length is not None:  # garbage past length changes nothing
        unread = torch.arange(tq, device=DEVICE)[None, :] >= length[:, None].long()
        noisy = [torch.where(unread[:, None, :, None], x.flip(2), x) for x in (k8, v8)]
        torch.testing.assert_close(fp8_decode_attention(q, *noisy, ks, vs, rk, rv, **args), out, rtol=0, atol=0)


@needs_backend
def test_kernels_fp8_attention_applies_each_heads_scale():
    """Doubling KV head 1's value scale doubles its query heads' outputs and leaves head 0's; doubling its key
    scale changes only its query heads."""
    k8, v8, ks, vs, rk, rv = fp8_cache(2, 2, 32, 24, 1, torch.float32, [0, 1], seed=3)
    q = torch.randn(2, 4, 32).to(DEVICE)
    rk, rv = rk[:, :, :0], rv[:, :, :0]
    out = fp8_decode_attention(q, k8, v8, ks, vs, rk, rv)
    twice = torch.tensor([1.0, 2.0], device=DEVICE)
    torch.testing.assert_close(fp8_decode_attention(q, k8, v8, ks, vs * twice, rk, rv),
                               out * torch.tensor([1.0, 1.0, 2.0, 2.0], device=DEVICE)[:, None], rtol=1e-6, atol=1e-6)
    keys = fp8_decode_attention(q, k8, v8, ks * twice, vs, rk, rv)
    assert torch.equal(keys[:, :2], out[:, :2]) and (keys[:, 2:] - out[:, 2:]).abs().max() > 1e-3


@needs_backend
def test_kernels_fp8_attention_bad_input_raises():
    k8, v8, ks, vs, rk, rv = fp8_cache(1, 2, 32, 8, 1, torch.float16, [0, 0], seed=1)
    q = torch.randn(1, 4, 32).to(DEVICE, torch.float16)
    cases = {
        r"k dtype torch.float16 does not match: expected torch.float8_e4m3fn": dict(k=k8.half()),
        r"v shape \(1, 2, 7, 32\) does not match": dict(v=v8[:, :, :7]),
        r"k_scale shape \(1,\) does not match: expected \(2,\)": dict(k_scale=ks[:1]),
        r"v_scale dtype torch.float16": dict(v_scale=vs.half()),
        "res_v dtype": dict(res_v=rv.float()),
        "res_k must be in q's dtype": dict(res_k=rk.float()),
        "head size 24 must be a power of two": dict(q=q[..., :24], k=k8[..., :24], v=v8[..., :24], res_k=rk[..., :24],
                                                    res_v=rv[..., :24]),
        "length must be an integer tensor": dict(length=torch.zeros(2, dtype=torch.int32, device=DEVICE)),
        "the cache is empty": dict(k=k8[:, :, :0], v=v8[:, :, :0], res_k=rk[:, :, :0], res_v=rv[:, :, :0]),
    }
    for message, change in cases.items():
        args = dict(q=q, k=k8, v=v8, k_scale=ks, v_scale=vs, res_k=rk, res_v=rv, length=None) | change
        with pytest.raises(ValueError, match=message):
            fp8_decode_attention(*list(args.values())[:7], length=args["length"])


@needs_backend
@pytest.mark.parametrize("options", [dict(), dict(prefill_with_quant=True, scale="none")])
def test_kernels_fp8_decode_inside_the_model(monkeypatch, options):
    """A calibrated GQA Llama decoding through the kernel path (one-token steps read the fp8 store in the kernel,
    the step's own token exact beside its skipped stored copy, or read as stored with prefill_with_quant) gives the
    torch path's logits, with and without left padding."""
    import tquant
    from tests.tiny_models import tiny_model, token_batch
    from tquant.kv import attention as kv_attention

    calls = []
    monkeypatch.setattr(kv_attention, "fp8_decode_attention",
                        lambda *a, **k: calls.append(1) or fp8_decode_attention(*a, **k))
    model = tiny_model("llama").to(DEVICE)  # head size 16, 6 query heads on 2 KV heads
    tquant.quantize(model, "fp8_kv", calib=token_batch(4, 32, seed=2).to(DEVICE), **options)
    ids = torch.randint(0, 250, (2, 30), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    for kernel_logits, torch_logits, cache, _ in decode_both_paths(model, ids, 20, calls):
        assert cache.layers[0].quantized_length() == 30 and cache.layers[0].packed_keys.dtype == torch.float8_e4m3fn
        err = ((kernel_logits - torch_logits).norm() / torch_logits.norm()).item()
        assert err < 1e-5, err

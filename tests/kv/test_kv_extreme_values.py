"""KV caches and their decode attention on values near the limits of their dtypes (issue 26, section 4), beside the
hypothesis properties of tests/kernels/test_kernels_extreme_values.py, whose element-wise check and attention bound
they reuse:

- bf16 / fp32 values near fp32's largest (3e38) in the full-precision parts the flash-decoding kernels read (the
  float cache, KIVI's residual window, KVQuant's sink): the online softmax's accumulator must not overflow where
  the output does not. Several tokens of equal score with v = 3e38 sum to 3 x 3e38 = inf in fp32, while their
  softmax average is 3e38; split_kv keeps the accumulator normalized (the output so far), so |acc| <= max |v|.
- KIVI's fp16 scales and minima under a bf16 / fp32 cache: a group the format cannot hold is refused by name, not
  stored as inf.
"""
import pytest
import torch

from tests.kernel_device import DEVICE, needs_backend, poisoned_outputs  # noqa: F401  (autouse fixture)
from tests.kernels.test_kernels_extreme_values import attention_bound, check
from tquant.kv import kvquant_format as kvq
from tquant.kv import uniform_format as kv_format
from tquant.kv.attention import float_decode_attention, kivi_decode_attention, kivi_decode_attention_ref
from tquant.kv.kvquant_attention import kvquant_decode_attention, kvquant_decode_attention_ref
from tquant.kv.split_kv import reference_attention

BF16, FP32 = torch.bfloat16, torch.float32


def huge_values(b, h, t, d, dtype, seed):
    """(keys, values) [B, H, T, D] in dtype: ordinary keys, values N(0, 1) with channel 0 at 3e38 and channel 1 at
    -2e38 in every token (their average is as large; their sum over two tokens is not an fp32 value)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, t, d, generator=g)
    v = torch.randn(b, h, t, d, generator=g)
    v[..., 0], v[..., 1] = 3e38, -2e38
    return k.to(dtype), v.to(dtype)


def small_q(b, hq, d, dtype, seed):
    """q [B, Hq, D] of 1e-3 x N(0, 1): every score within a few 1e-3 of the others, so each token's weight is about
    1 / T and the output's channel 0 about 3e38."""
    return (torch.randn(b, hq, d, generator=torch.Generator().manual_seed(seed)) * 1e-3).to(dtype)


@needs_backend
@pytest.mark.parametrize("dtype", [BF16, FP32])
@pytest.mark.parametrize("t", [3, 40])
def test_float_cache_attention_of_values_near_fp32_max(dtype, t):
    """The float cache (the static decoder's): 3 tokens (one split) and 40 (several splits merged by
    combine_kernel) of values 3e38: the output's 3e38 comes back, not inf."""
    b, hkv, rep, d = 2, 2, 2, 16
    k, v = huge_values(b, hkv, t, d, dtype, t)
    q = small_q(b, hkv * rep, d, dtype, t + 1)
    length = torch.tensor([t, max(1, t - 5)], dtype=torch.int32)
    unread = torch.arange(t)[None, :] >= length[:, None]
    ref = reference_attention(q, k.float(), v.float(), d**-0.5, None, unread)
    assert ref.isfinite().all() and ref[..., 0].min() > 2.9e38
    out = float_decode_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), length=length.to(DEVICE))
    mag, tol = attention_bound(q, k.float(), v.float() * (~unread)[:, None, :, None], d**-0.5, dtype)
    check(out, ref, mag, dtype, tol=tol, what=f"float cache T={t}")


@needs_backend
@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_kivi_window_attention_of_values_near_fp32_max(dtype):
    """KIVI's store (fp16 scales: ordinary values) and a residual window of 20 bf16 / fp32 tokens with values 3e38."""
    b, hkv, rep, d, bits, group, tq, tr = 1, 2, 2, 16, 2, 8, 16, 20
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(b, hkv, tq, d, generator=g), torch.randn(b, hkv, tq, d, generator=g)
    pk = kv_format.key_format("channel")[0](k, bits, group)
    pv = kv_format.quantize_values(v, bits, group)
    rk, rv = huge_values(b, hkv, tr, d, dtype, 4)
    q = small_q(b, hkv * rep, d, dtype, 5)
    ref = kivi_decode_attention_ref(q, pk, pv, rk, rv, bits=bits, group=group, sm_scale=d**-0.5)
    assert ref.isfinite().all() and ref[..., 0].min() > 1e38
    move = lambda p: kv_format.PackedKV(*(t.to(DEVICE) for t in p))  # noqa: E731
    out = kivi_decode_attention(q.to(DEVICE), move(pk), move(pv), rk.to(DEVICE), rv.to(DEVICE), bits=bits,
                                group=group)
    keys = torch.cat([kv_format.key_format("channel")[1](pk, bits, group), rk.float()], dim=-2)
    vals = torch.cat([kv_format.dequantize_values(pv, bits, group), rv.float()], dim=-2)
    mag, tol = attention_bound(q, keys, vals, d**-0.5, dtype)
    check(out, ref, mag, dtype, tol=tol, what="kivi window")


@needs_backend
@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_kvquant_sink_attention_of_values_near_fp32_max(dtype):
    """KVQuant's store (ordinary values) behind a sink of 4 bf16 / fp32 tokens with values 3e38."""
    b, hkv, rep, d, bits, t, s = 1, 2, 2, 16, 3, 12, 4
    g = torch.Generator().manual_seed(6)
    book = lambda: torch.sort(torch.rand(2**bits, generator=g) * 2 - 1).values  # noqa: E731
    params = kvq.LayerParams(torch.randn(hkv, d, generator=g), 0.5 + torch.rand(hkv, d, generator=g), book(), book())
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    keys = kvq.quantize_keys(k, params, bits, True)
    values = kvq.quantize_values(v, params.value_codebook, bits, kvq.value_outliers(0.1, d))
    sink_k, sink_v = huge_values(b, hkv, s, d, dtype, 7)
    empty = torch.zeros(b, hkv, 0, d, dtype=dtype)
    q = small_q(b, hkv * rep, d, dtype, 8)
    cache = dict(keys=keys, values=values, params=params, sink_k=sink_k, sink_v=sink_v, res_k=empty, res_v=empty,
                 bits=bits, rope=None, positions=None)
    ref = kvquant_decode_attention_ref(q, **cache, sm_scale=d**-0.5)
    assert ref.isfinite().all() and ref[..., 0].min() > 1e37

    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(DEVICE)
        if isinstance(x, tuple):
            return type(x)(*(move(y) for y in x))
        return x

    out = kvquant_decode_attention(q.to(DEVICE), **{n: move(x) for n, x in cache.items()})
    all_k = torch.cat([sink_k.float(), kvq.dequantize_keys(keys, params, bits)], dim=-2)
    all_v = torch.cat([sink_v.float(), kvq.dequantize_values(values, params.value_codebook, bits, d)], dim=-2)
    mag, tol = attention_bound(q, all_k, all_v, d**-0.5, dtype)
    check(out, ref, mag, dtype, tol=tol, what="kvquant sink")


# ---------------------------------------------------------------------------------------------------------------
# KIVI's fp16 scales and minima under a bf16 / fp32 cache


@pytest.mark.parametrize("dtype", [BF16, FP32])
@pytest.mark.parametrize("part", ["keys", "values"])
@pytest.mark.parametrize("key_axis, write_kernel", [("channel", False), ("token", False), ("token", True)])
def test_kivi_refuses_a_bf16_group_past_fp16s_range(dtype, part, key_axis, write_kernel):
    """A bf16 / fp32 KIVI cache stores fp16 scales and minima (uniform_format): a group whose minimum is -1.3e5 would
    get an inf minimum and NaN values, so the flush that quantizes it raises, naming the keys or values and fp16's
    range (the torch quantizer; and the per-token write kernel's path, checked after the write). A group up to +1e5
    over a small minimum has finite parameters (a step of 6.7e3, dequantized in fp32) and comes back within half a
    step: the check refuses exactly what the format cannot hold."""
    from tquant.kv.cache import KiviLayer

    b, h, t, d, bits = 1, 2, 8, 16, 4
    group = 8 if key_axis == "channel" else d
    g = torch.Generator().manual_seed(9)
    k, v = torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)
    big = k if part == "keys" else v
    big[0, 1, 3, 2] = 1e5
    layer = KiviLayer(bits, group, 0, True, kernel=False, key_axis=key_axis, write_kernel=write_kernel)
    keys, values = layer.update(k.to(DEVICE, dtype), v.to(DEVICE, dtype))
    assert layer.quantized_length() == t
    got = (keys if part == "keys" else values).cpu()
    step = (1e5 - big.min().item()) / (2**bits - 1)  # the largest group's step
    assert got.isfinite().all() and (got.float() - big.to(dtype).float()).abs().max() <= step / 2 * (1 + 2**-8)
    big[0, 1, 3, 2] = -2.0**17  # exact in bf16
    layer = KiviLayer(bits, group, 0, True, kernel=False, key_axis=key_axis, write_kernel=write_kernel)
    with pytest.raises(ValueError, match=rf"fp16 \(at most 65504\), and a group of the {dtype} {part} spans "
                                         r"\[-1.311e\+05, .*\], past it: keep this model's KV cache in float"):
        layer.update(k.to(DEVICE, dtype), v.to(DEVICE, dtype))

"""KIVI's KV-cache formats (tquant.kv.uniform_format), the quantized cache (QuantizedKVCache) inside a model's forward and
generate(), the `kivi` method, save/load, and perplexity through a cache (decode_from)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.tiny_models import tiny_model
from transformers import DynamicCache

import tquant
from tquant.models import cache_kwarg
from tquant.kv import uniform_format as kv_quant
from tquant.tools.eval import perplexity
from tquant.kv.cache import KiviLayer


def lively(shape, seed, dtype=torch.float32):
    """Random K/V-like data: normal entries, a per-channel offset and scale (keys have outlier channels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * (0.5 + 3 * torch.rand(shape[-1], generator=g))
    return (x + 4 * torch.randn(shape[-1], generator=g)).to(dtype)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(kv_quant.KV_BITS), group=st.sampled_from([8, 16, 32]), groups=st.integers(1, 3),
       heads=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_kv_formats_round_trip_within_half_a_step(bits, group, groups, heads, seed):
    """Every element comes back within half a quantization step of its own group (plus the fp16 rounding of the
    group's minimum), keys grouped per channel over tokens, values per token over channels."""
    d = 2 * group
    x = lively((2, heads, groups * group, d), seed)
    for quantize, dequantize, axis in ((kv_quant.quantize_keys, kv_quant.dequantize_keys, -2),
                                       (kv_quant.quantize_values, kv_quant.dequantize_values, -1)):
        p = quantize(x, bits, group)
        back = dequantize(p, bits, group)
        assert back.shape == x.shape and back.dtype == torch.float32
        assert p.codes.dtype == torch.int32 and p.scale.dtype == p.mn.dtype == torch.float16
        words = kv_quant.words_per_group(bits, group)
        if axis == -2:
            assert p.codes.shape == (2, heads, groups * words, d) and p.scale.shape == (2, heads, groups, d)
            step = p.scale.float().repeat_interleave(group, dim=-2)
            mn = p.mn.float().repeat_interleave(group, dim=-2)
        else:
            assert p.codes.shape == (2, heads, groups * group, 2 * words) and p.scale.shape == (2, heads, groups * group, 2)
            step = p.scale.float().repeat_interleave(group, dim=-1)
            mn = p.mn.float().repeat_interleave(group, dim=-1)
        slack = 1e-3 * mn.abs() + 1e-6  # fp16 rounding of mn may clip the group's minimum by that much
        assert ((back - x).abs() <= step / 2 + slack).all()
        assert (back >= mn - slack).all() and (back <= mn + step * (2**bits - 1) + slack).all()


def test_kv_keys_are_grouped_per_channel_values_per_token():
    """A channel with a large constant offset costs keys nothing (per-channel ranges) but would cost values
    their precision if they were grouped over channels; a token's values are grouped over its channels."""
    k = lively((1, 1, 32, 16), seed=1)
    k[..., 3] += 1000.0
    err = (kv_quant.dequantize_keys(kv_quant.quantize_keys(k, 4, 32), 4, 32) - k).abs()
    assert err[..., [i for i in range(16) if i != 3]].max() < 1.0
    constant = torch.full((1, 1, 4, 16), 2.5)
    for q, dq in ((kv_quant.quantize_keys, kv_quant.dequantize_keys), (kv_quant.quantize_values, kv_quant.dequantize_values)):
        assert torch.equal(dq(q(constant, 2, 4), 2, 4), constant)


@pytest.mark.parametrize("case", ["keys tokens", "values channels", "bits"])
def test_kv_formats_bad_input_raises(case):
    x = torch.randn(1, 1, 24, 20)
    with pytest.raises(ValueError, match={"keys tokens": "whole groups of 16 tokens", "values channels":
                                          "groups of 16 channels", "bits": "kv_bits=5"}[case]):
        if case == "keys tokens":
            kv_quant.quantize_keys(x, 2, 16)
        elif case == "values channels":
            kv_quant.quantize_values(x, 2, 16)
        else:
            kv_quant.quantize_keys(x, 5, 8)


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 4]), residual=st.sampled_from([0, 8, 20]), pwq=st.booleans(),
       chunks=st.lists(st.integers(1, 23), min_size=1, max_size=6), seed=st.integers(0, 2**31 - 1))
def test_kivi_layer_streams_like_offline_quantization(bits, residual, pwq, chunks, seed):
    """Fed in chunks, the layer holds the oldest whole groups quantized (exactly as quantizing them at once)
    and between residual and residual + group - 1 newest tokens exact; update() returns that view, with the
    call's own tokens exact unless prefill_with_quant."""
    group = 8
    k_all, v_all = lively((2, 2, sum(chunks), 16), seed), lively((2, 2, sum(chunks), 16), seed + 1)
    layer = KiviLayer(bits, group, residual, pwq)
    seen = 0
    for t in chunks:
        k, v = k_all[..., seen : seen + t, :], v_all[..., seen : seen + t, :]
        keys, values = layer.update(k, v)
        seen += t
        q = max(0, seen - residual) // group * group
        assert layer.get_seq_length() == seen and layer.quantized_length() == q
        assert layer.keys.shape[-2] == seen - q and (seen < residual + group or residual <= seen - q < residual + group)
        stored_k = torch.cat([kv_quant.dequantize_keys(kv_quant.quantize_keys(k_all[..., :q, :], bits, group), bits, group),
                              k_all[..., q:seen, :]], dim=-2)
        stored_v = torch.cat([kv_quant.dequantize_values(kv_quant.quantize_values(v_all[..., :q, :], bits, group), bits,
                                                         group), v_all[..., q:seen, :]], dim=-2)
        if not pwq:
            stored_k[..., seen - t : seen, :], stored_v[..., seen - t : seen, :] = k, v
        assert torch.equal(keys, stored_k) and torch.equal(values, stored_v)
    assert layer.nbytes() == sum(p.nbytes() for p in (layer.packed_keys, layer.packed_values) if p is not None) \
        + 2 * layer.keys.numel() * 4


def decoded_logits(model, ids, prefill, cache):
    out = [model(ids[:, :prefill], **{cache_kwarg(model): cache}, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t : t + 1], **{cache_kwarg(model): cache}, use_cache=True).logits)
    return torch.cat(out, dim=1)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def generate_through_its_cache(monkeypatch, model, ids, new=20):
    """(model.generate's greedy output of `new` tokens, the one cache tquant.kv.hook built for it)."""
    import tquant.kv.hook

    built, real = [], tquant.kv.hook.kv_cache
    monkeypatch.setattr(tquant.kv.hook, "kv_cache", lambda m: built.append(real(m)) or built[-1])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    (cache,) = built
    return out, cache


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_kivi_inside_a_gqa_model(arch):
    """8-bit KIVI decodes within 1 % of the float model and 2-bit KIVI further off but close; the prefill alone
    is exact without prefill_with_quant and quantized with it."""
    model = tiny_model(arch)
    ids = torch.randint(0, 250, (2, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        errors = {}
        for bits in (8, 2):
            tquant.quantize(model, "kivi", kv_bits=bits, group_size=16, residual=16)
            errors[bits] = rel(decoded_logits(model, ids, 40, tquant.kv_cache(model)), ref)
        assert errors[8] < 1e-2 < errors[2] < 0.5, errors
        assert torch.equal(model(ids, **{cache_kwarg(model): tquant.kv_cache(model)}, use_cache=True).logits, ref)
        tquant.quantize(model, "kivi", kv_bits=2, group_size=16, residual=16, prefill_with_quant=True)
        assert rel(model(ids, **{cache_kwarg(model): tquant.kv_cache(model)}, use_cache=True).logits, ref) > 1e-3


def test_generate_uses_the_quantized_cache_unless_given_one():
    model = tiny_model("llama")
    ids = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(2))
    tquant.quantize(model, "kivi", kv_bits=2, group_size=8, residual=0)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False, min_new_tokens=40)
        float_cache = model.generate(ids, max_new_tokens=40, do_sample=False, min_new_tokens=40,
                                     **{cache_kwarg(model): DynamicCache()})
        # the same greedy tokens by hand through a quantized cache
        cache, seq = tquant.kv_cache(model), ids
        logits = model(seq, **{cache_kwarg(model): cache}, use_cache=True).logits
        for _ in range(40):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            logits = model(nxt, **{cache_kwarg(model): cache}, use_cache=True).logits
    assert torch.equal(out, seq)
    assert not torch.equal(out, float_cache)  # 2 bits with no residual changes some greedy token of 40


def test_kivi_method_options_and_errors():
    model = tiny_model("llama")  # head_dim 16
    assert set(tquant.methods()["kivi"]) == {"kv_bits", "group_size", "residual", "prefill_with_quant"}
    with pytest.raises(ValueError, match="give kv_bits= instead of bits="):
        tquant.quantize(model, "kivi", bits=2)
    with pytest.raises(ValueError, match="group_size=32 must divide the head size 16"):
        tquant.quantize(model, "kivi", kv_bits=2)
    with pytest.raises(ValueError, match="kv_bits=5 is not supported"):
        tquant.quantize(model, "kivi", kv_bits=5, group_size=16)
    with pytest.raises(ValueError, match="unknown option"):
        tquant.quantize(model, "kivi", kv_bit=2, group_size=16)
    with pytest.raises(ValueError, match="no quantized KV cache"):
        tquant.kv_cache(tiny_model("llama"))


def test_kivi_combines_with_a_weight_method_and_survives_save_load(tmp_path):
    model = tiny_model("llama")
    tquant.quantize(model, "kivi", kv_bits=4, group_size=8, residual=8)
    tquant.quantize(model, "rtn", bits=4, group_size=32)  # the weight method keeps the KV spec
    qc = model.config.quantization_config
    assert qc["method"] == "rtn" and qc["kv_cache"]["kv_bits"] == 4 and qc["layers"]
    tquant.save(model, str(tmp_path / "m"))
    loaded = tquant.load(str(tmp_path / "m"))
    assert loaded.config.quantization_config["kv_cache"] == qc["kv_cache"]
    ids = torch.randint(0, 250, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=30, do_sample=False)
        b = loaded.generate(ids, max_new_tokens=30, do_sample=False)
    assert torch.equal(a, b)
    assert isinstance(tquant.kv_cache(loaded), tquant.modules.QuantizedKVCache)
    kv_only = tiny_model("llama")
    tquant.quantize(kv_only, "kivi", kv_bits=2, group_size=8)  # no weight method: a KV-only config saves too
    tquant.save(kv_only, str(tmp_path / "kv"))
    assert tquant.load(str(tmp_path / "kv")).config.quantization_config["kv_cache"]["kv_bits"] == 2


@pytest.mark.slow
def test_perplexity_through_a_cache():
    """decode_from with a float cache gives the ordinary perplexity; with 2-bit KIVI a higher one."""
    model = tiny_model("llama")
    ids = torch.randint(0, 250, (600,), generator=torch.Generator().manual_seed(4))
    plain = perplexity(model, ids, seqlen=100, progress=False)
    assert perplexity(model, ids, seqlen=100, progress=False, decode_from=30, batch_size=3) == pytest.approx(plain, rel=1e-5)
    tquant.quantize(model, "kivi", kv_bits=2, group_size=8, residual=8)
    assert perplexity(model, ids, seqlen=100, progress=False, decode_from=30) != pytest.approx(plain, rel=1e-4)
    with pytest.raises(ValueError, match="decode_from must be in"):
        perplexity(model, ids, seqlen=100, decode_from=100)

"""fp8_kv: calibrated per-(layer, KV head) scales (max |K|, max |V| / 448 over the calibration set), the e4m3 cache
layer streaming like quantizing at once, a tiny Llama through tquant.quantize / generate close to the float model
(pinned), the static decoder's cache giving the dynamic cache's logits, save / load, and every refusal."""
import json

import pytest
import torch
from tests.kernel_device import DEVICE
from tests.kv.test_kv_cache import decoded_logits, generate_through_its_cache, lively, rel
from tests.tiny_models import tiny_model, token_batch
from transformers import DynamicCache

import tquant
from tquant.decode import StaticDecoder
from tquant.kv.fp8_cache import FP8Layer
from tquant.kv.fp8_format import dequantize_fp8_kv, quantize_fp8_kv
from tquant.models import cache_kwarg

HKV = 2  # the tiny llama's KV heads (head size 16, 6 query heads)


def calib():
    return token_batch(8, 32, seed=11)


def cached(model, ids):
    """(keys, values) [B, Hkv, T, D] per layer as the model hands transformers' float cache on ids."""
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, **{cache_kwarg(model): cache}, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def test_scales_are_the_calibration_absmax_over_448_per_layer_and_head():
    model = tiny_model("llama")
    with torch.no_grad():  # KV head 1's keys 3x larger, head 0's values 5x: per-head scales must follow
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.view(HKV, 16, -1)[1] *= 3
            layer.self_attn.v_proj.weight.view(HKV, 16, -1)[0] *= 5
    ids = calib()
    kv = cached(model, ids)
    tquant.quantize(model, "fp8_kv", calib=ids, batch_size=3)  # batches of 3, 3, 2: the max over all of them
    spec = json.loads(json.dumps(model.config.quantization_config["kv_cache"]))
    assert spec["method"] == "fp8_kv" and spec["scale"] == "calibrated"
    for field, which in (("k_scales", 0), ("v_scales", 1)):
        scales = torch.tensor(spec[field], dtype=torch.float32)
        assert scales.shape == (2, HKV)
        expected = torch.stack([x[which].abs().amax(dim=(0, 2, 3)) / 448 for x in kv])
        assert torch.equal(scales, expected)
        big, small = (1, 0) if field == "k_scales" else (0, 1)
        assert (scales[:, big] > 2 * scales[:, small]).all()


@pytest.mark.parametrize("pwq", [False, True])
def test_layer_streams_like_quantizing_at_once(pwq):
    """Fed in chunks, the layer stores every token in e4m3 (exactly the codes of quantizing all at once with the
    head's scale) and returns the dequantized store, the call's own tokens exact unless prefill_with_quant; nbytes
    counts a byte an element and the scales."""
    k_all, v_all = lively((2, HKV, 23, 16), seed=1), lively((2, HKV, 23, 16), seed=2) * 30
    ks, vs = torch.tensor([0.02, 0.05]), torch.tensor([0.3, 0.1])
    layer = FP8Layer(ks, vs, pwq, kernel=False)
    seen = 0
    for t in (7, 1, 1, 9, 1, 4):
        k, v = k_all[..., seen:seen + t, :], v_all[..., seen:seen + t, :]
        keys, values = layer.update(k, v)
        seen += t
        assert layer.get_seq_length() == layer.quantized_length() == seen
        stored = [dequantize_fp8_kv(quantize_fp8_kv(x[..., :seen, :], s), s) for x, s in ((k_all, ks), (v_all, vs))]
        assert torch.equal(layer.packed_keys.float(), quantize_fp8_kv(k_all[..., :seen, :], ks).float())
        if not pwq:
            stored[0][..., seen - t:, :], stored[1][..., seen - t:, :] = k, v
        assert torch.equal(keys, stored[0]) and torch.equal(values, stored[1])
    assert rel(layer.stored()[1], v_all) > 1e-3  # values past 448 s saturate or round: the test sees the format
    assert layer.nbytes() == 2 * 2 * HKV * 23 * 16 + 2 * HKV * 4


def test_decoding_stays_close_to_the_float_model():
    """Measured on this tiny model (seed fixed): 2.9 % (calibrated), 2.8 % (scale='none'), 5.0 %
    (prefill_with_quant) relative logit error over 40 decode steps after a 40-token prefill; e4m3 keeps 3 mantissa
    bits, a relative error of up to 2^-4 an element. The prefill alone is exact unless prefill_with_quant."""
    ids = token_batch(2, 80, seed=7)
    with torch.no_grad():
        ref = tiny_model("llama")(ids).logits
        errors = {}
        for name, options in (("calibrated", {}), ("none", dict(scale="none")), ("pwq", dict(prefill_with_quant=True))):
            model = tiny_model("llama")
            tquant.quantize(model, "fp8_kv", calib=calib(), **options)
            errors[name] = rel(decoded_logits(model, ids, 40, tquant.kv_cache(model)), ref)
            prefill = rel(model(ids, **{cache_kwarg(model): tquant.kv_cache(model)}, use_cache=True).logits, ref)
            assert (prefill > 1e-2) if name == "pwq" else (prefill == 0)
    assert 1e-2 < errors["calibrated"] < 0.035 and 1e-2 < errors["none"] < 0.035, errors
    assert errors["calibrated"] < errors["pwq"] < 0.06, errors


def test_generate_reads_the_fp8_cache(monkeypatch):
    model = tiny_model("llama")
    tquant.quantize(model, "fp8_kv", calib=calib())
    ids = token_batch(1, 12, seed=6)
    out, cache = generate_through_its_cache(monkeypatch, model, ids)
    with torch.no_grad():
        float_out = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                   **{cache_kwarg(model): DynamicCache()})
    for layer in cache.layers:
        assert isinstance(layer, FP8Layer) and layer.packed_keys.dtype == torch.float8_e4m3fn
        assert layer.quantized_length() == out.shape[1] - 1  # every token but the last generated one, in e4m3
    assert out.shape == float_out.shape == (1, 32)
    assert cache.nbytes() == 2 * (2 * HKV * 31 * 16 + 2 * HKV * 4)


@pytest.mark.parametrize("options", [dict(), dict(scale="none", prefill_with_quant=True)])
def test_static_decoder_gives_the_dynamic_caches_logits(options):
    """StaticFP8Cache holds the codes FP8Layer holds and attends the same way (the step's own token exact unless
    prefill_with_quant), so the StaticDecoder's logits match decoding through tquant.kv_cache; the kernel path
    (interpreter) matches the torch path."""
    from tests.test_decode import PREFILL, TOTAL, static_logits

    model = tiny_model("llama")
    ids = token_batch(2, TOTAL, seed=4)
    tquant.quantize(model, "fp8_kv", calib=calib(), **options)
    with torch.no_grad():
        ref = decoded_logits(model, ids, PREFILL, tquant.kv_cache(model))[:, PREFILL - 1:]
        exact = model(ids, use_cache=False).logits[:, PREFILL - 1:]
    out = static_logits(model, ids)
    assert rel(out, ref) < 1e-5 and rel(out, exact) > 1e-3
    assert rel(static_logits(model.to(DEVICE), ids.to(DEVICE), kernel=True).cpu(), out) < 1e-5
    dec = StaticDecoder(model, batch=2, max_len=32)
    assert dec.cache.bytes_per_token() == 2 * 2 * HKV * 16 and dec.cache.k.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("weights", [None, "rtn"])
def test_save_load_round_trip(tmp_path, weights):
    """The spec with its scales comes back, and the reloaded model decodes through its fp8 cache bit-identically."""
    model = tiny_model("llama")
    tquant.quantize(model, "fp8_kv", calib=calib())
    if weights:
        tquant.quantize(model, weights, bits=4, group_size=32)  # keeps the KV spec
    tquant.save(model, str(tmp_path / "m"))
    loaded = tquant.load(str(tmp_path / "m"))
    qc = model.config.quantization_config
    assert loaded.config.quantization_config["kv_cache"] == qc["kv_cache"] and qc["kv_cache"]["k_scales"]
    ids = token_batch(1, 20, seed=9)
    with torch.no_grad():
        assert torch.equal(decoded_logits(loaded, ids, 8, tquant.kv_cache(loaded)),
                           decoded_logits(model, ids, 8, tquant.kv_cache(model)))
        a = model.generate(ids, max_new_tokens=12, do_sample=False)
        b = loaded.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("field, value, match", [
    ("k_scales", [[1.0, 1.0]], r"k_scales has shape \(1, 2\), the model needs \(2, 2\)"),
    ("v_scales", [[1.0, 0.0], [1.0, 1.0]], "v_scales holds values that are not finite and positive"),
    ("k_scales", [[1e39, 1.0], [1.0, 1.0]], "k_scales holds values that are not finite"),  # past fp32's range
    ("scale", "fp16", "scale='fp16' is not supported"),
])
def test_a_damaged_checkpoint_is_refused_on_load(tmp_path, field, value, match):
    model = tiny_model("llama")
    tquant.quantize(model, "fp8_kv", calib=calib())
    tquant.save(model, str(tmp_path / "m"))
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["kv_cache"][field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"quantization_config.kv_cache: .*{match}"):
        tquant.load(str(tmp_path / "m"))


@pytest.mark.parametrize("options, match", [
    (dict(scale="per_token"), r"fp8_kv: scale='per_token' is not supported; choose one of \('calibrated', 'none'\)"),
    (dict(prefill_with_quant=1), "prefill_with_quant must be True or False"),
    (dict(k_scales=[[1.0, 1.0]] * 2), "k_scales and v_scales come together"),
    (dict(scale="none", k_scales=[[1.0]], v_scales=[[1.0]]), "scale='none' uses 1.0 for every head"),
    (dict(bits=8), "give kv_bits= instead of bits="),
    (dict(kv_bits=8), r"unknown option\(s\) \['kv_bits'\] for method 'fp8_kv'"),
    (dict(calib=None), "method 'fp8_kv' needs calibration data"),
])
def test_bad_options_are_refused_by_name(options, match):
    options = {"calib": calib(), **options}
    with pytest.raises(ValueError, match=match):
        tquant.quantize(tiny_model("llama"), "fp8_kv", **options)


def test_an_uncalibrated_spec_builds_no_cache():
    from tquant.methods.fp8_kv import FP8KV

    with pytest.raises(ValueError, match="fp8_kv is not calibrated: run tquant.quantize"):
        FP8KV().make_layer(0, kernel=False)
    with pytest.raises(ValueError, match="fp8_kv was calibrated with k_scale for \\(3,\\) KV heads"):
        FP8Layer(torch.ones(3), torch.ones(3), False, kernel=False).update(torch.ones(1, 2, 1, 16),
                                                                            torch.ones(1, 2, 1, 16))

"""qoq_kv4: SmoothAttention's fold (the float model unchanged, λ tied over RoPE pairs, recorded and folded as
recorded), the per-token-per-head KV4 / KV8 cache inside a model and generate(), the gain from smoothing on a
model with outlier key channels, save / load (alone and under a weight method), and every refusal."""
import copy
import json

import pytest
import torch
import transformers
from tests.kv.test_kv_cache import decoded_logits, generate_through_its_cache, lively, rel
from tests.tiny_models import ARCHS, VOCAB, tiny_model, token_batch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import tquant
from tquant.models import cache_kwarg
from tquant.kv import uniform_format as kv_quant
from tquant.methods.qoq_kv import QoQKV4
from tquant.kv.cache import KiviLayer

D, HKV, REP = 16, 2, 3  # the tiny llama's head size, KV heads and query heads per KV head


def calib():
    return token_batch(8, 32, seed=11)


def attention(model, i):
    return model.model.layers[i].self_attn


def cached_keys(model, ids):
    """The post-RoPE keys [B, Hkv, T, D] each layer hands transformers' float cache on ids."""
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, **{cache_kwarg(model): cache}, use_cache=True)
    return [layer.keys for layer in cache.layers]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "opt"])
def test_fold_leaves_the_float_models_logits_unchanged(arch):
    """GQA with RoPE (llama, qwen2 with q/k biases, mistral) and MHA without RoPE (opt): the weights change, the
    float32 logits do not (to rounding), while an untied λ breaks a RoPE model's logits."""
    model = tiny_model(arch)
    original = copy.deepcopy(model)
    ids = token_batch(2, 48, seed=5)
    tquant.quantize(model, "qoq_kv4", calib=calib())
    proj = "model.decoder.layers.0.self_attn.k_proj" if arch == "opt" else "model.layers.0.self_attn.k_proj"
    assert rel(model.get_submodule(proj).weight, original.get_submodule(proj).weight) > 0.05
    with torch.no_grad():
        ref = original(ids, use_cache=False).logits
        assert rel(model(ids, use_cache=False).logits, ref) < 3e-6
        if arch == "llama":
            from tquant.calib.smooth_attention import fold

            untied = torch.empty(HKV, D).uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0))
            fold(attention(original, 0).q_proj, attention(original, 0).k_proj, untied)
            assert rel(original(ids, use_cache=False).logits, ref) > 1e-2


def test_lambda_is_tied_recorded_and_folded_as_recorded():
    """smooth_scales [layer][KV head][channel] = max|K|^alpha of the post-RoPE keys over every calibration batch,
    tied (j, j + D/2), JSON in the spec; k_proj rows were divided and each query head's q_proj rows multiplied
    by exactly those values."""
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    ids = calib()
    tquant.quantize(model, "qoq_kv4", calib=ids, smooth_alpha=0.6, batch_size=3)  # batches of 3, 3, 2
    spec = json.loads(json.dumps(model.config.quantization_config["kv_cache"]))
    assert spec["method"] == "qoq_kv4" and spec["smooth_alpha"] == 0.6 and spec["head_dim"] == D
    lams = torch.tensor(spec["smooth_scales"], dtype=torch.float64)
    assert lams.shape == (2, HKV, D)
    assert torch.equal(lams[..., : D // 2], lams[..., D // 2 :])
    assert lams.amax(-1).min() > 1.2 * lams.amin(-1).max()  # channels do get different scales
    for i, keys in enumerate(cached_keys(original, ids)):
        m = keys.abs().amax(dim=(0, 2)).double().pow(0.6)
        assert torch.allclose(lams[i], torch.maximum(m, m.roll(D // 2, dims=-1)), rtol=1e-3)
        new, old = attention(model, i), attention(original, i)
        k_scale = 1 / lams[i].reshape(-1, 1)
        assert torch.allclose(new.k_proj.weight.double(), old.k_proj.weight.double() * k_scale, rtol=1e-6)
        q_scale = lams[i].repeat_interleave(REP, dim=0).reshape(-1, 1)  # query head h reads KV head h // REP
        assert torch.allclose(new.q_proj.weight.double(), old.q_proj.weight.double() * q_scale, rtol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_cache_holds_one_scale_and_minimum_per_token_per_head(bits):
    """Prefill then decode: with residual 0 every token is stored, keys like values: one fp16 (scale, mn) per token
    per KV head over its D channels, each element within half a step of its own token's range."""
    method = QoQKV4(kv_bits=bits)
    method.check_model(tiny_model("llama").config)
    layer = method.make_layer(0, kernel=False)
    k, v = lively((2, HKV, 37, D), seed=bits), lively((2, HKV, 37, D), seed=bits + 1)
    layer.update(k[..., :30, :], v[..., :30, :])
    for t in range(30, 37):
        layer.update(k[..., t : t + 1, :], v[..., t : t + 1, :])
    assert layer.quantized_length() == 37 and layer.keys.shape[-2] == 0
    stored = layer.stored()
    for packed, x, back in ((layer.packed_keys, k, stored[0]), (layer.packed_values, v, stored[1])):
        assert packed.scale.shape == packed.mn.shape == (2, HKV, 37, 1) and packed.scale.dtype == torch.float16
        assert packed.codes.shape == (2, HKV, 37, D * bits // 32) and packed.codes.dtype == torch.int32
        slack = 1e-3 * packed.mn.float().abs() + 1e-6
        assert ((back - x).abs() <= packed.scale.float() / 2 + slack).all()
        assert (back - x).abs().max() > 0
    assert layer.nbytes() == 2 * 2 * HKV * 37 * (D * bits // 8 + 4)


def test_generate_reads_the_qoq_cache(monkeypatch):
    model = tiny_model("llama")
    tquant.quantize(model, "qoq_kv4", calib=calib())
    out, cache = generate_through_its_cache(monkeypatch, model, token_batch(1, 12, seed=6))
    for layer in cache.layers:
        assert isinstance(layer, KiviLayer) and (layer.key_axis, layer.bits, layer.group) == ("token", 4, D)
        assert layer.quantized_length() == out.shape[1] - 1  # every token written, all of them quantized


def test_decoding_through_the_cache_stays_close_to_the_float_model():
    """8-bit within 1 % of the float logits, 4-bit further off but close; the prefill alone is exact (to the fold's
    rounding) unless prefill_with_quant."""
    ids = token_batch(2, 80, seed=7)
    with torch.no_grad():
        ref = tiny_model("llama")(ids).logits
        errors = {}
        for bits, pwq in ((8, False), (4, False), (4, True)):
            model = tiny_model("llama")
            tquant.quantize(model, "qoq_kv4", calib=calib(), kv_bits=bits, prefill_with_quant=pwq)
            errors[bits, pwq] = rel(decoded_logits(model, ids, 40, tquant.kv_cache(model)), ref)
            prefill = rel(model(ids, **{cache_kwarg(model): tquant.kv_cache(model)}, use_cache=True).logits, ref)
            assert (prefill > 1e-2) if pwq else (prefill < 3e-6)
    assert errors[8, False] < 1e-2 < errors[4, False] < errors[4, True] < 0.3, errors


def outlier_model():
    """The tiny llama with key channels 2 and 13 of every KV head 16x larger (13 is not 2's RoPE partner 10)."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.view(HKV, D, -1)[:, [2, 13]] *= 16
    return model


_seen = []


def _capture(module, query, key, value, attention_mask, **kwargs):
    _seen.append((query, key))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


transformers.AttentionInterface.register("test_qoq_capture", _capture)


def score_errors(model, ids):
    """Per layer: relative error of the attention scores Q K^T when K is stored as 4-bit per token per head (Q, K as
    attention receives them, after RoPE)."""
    _seen.clear()
    model.set_attn_implementation("test_qoq_capture")
    with torch.no_grad():
        model(ids, use_cache=False)
    errors = []
    for q, k in _seen:
        k4 = kv_quant.dequantize_values(kv_quant.quantize_values(k, 4, D), 4, D)
        k, k4 = (t.repeat_interleave(REP, dim=1).transpose(-1, -2) for t in (k, k4))
        errors.append(rel(q @ k4, q @ k))
    return errors


def test_smoothing_flattens_outlier_key_channels_and_lowers_the_4bit_error():
    ids = token_batch(2, 80, seed=8)
    models = {}
    for alpha in (0, 0.5):
        models[alpha] = outlier_model()
        tquant.quantize(models[alpha], "qoq_kv4", calib=calib(), smooth_alpha=alpha)
    for plain, smooth in zip(cached_keys(models[0], ids), cached_keys(models[0.5], ids)):
        spread = [k.abs().amax(dim=(0, 2)) for k in (plain, smooth)]  # max |K| per head and channel
        spread = [s.amax(-1) / s.mean(-1) for s in spread]
        assert (spread[1] < 0.75 * spread[0]).all(), spread
    with torch.no_grad():
        ref = outlier_model()(ids).logits
        logits_error = {a: rel(decoded_logits(m, ids, 40, tquant.kv_cache(m)), ref) for a, m in models.items()}
    assert logits_error[0.5] < 0.7 * logits_error[0], logits_error
    for plain, smooth in zip(score_errors(models[0], ids), score_errors(models[0.5], ids)):
        assert smooth < 0.7 * plain, (plain, smooth)


@pytest.mark.parametrize("weights", [None, "rtn"])
def test_save_load_round_trip(tmp_path, weights):
    """The smoothed float weights (or a weight method's codes of them) and the KV4 cache come back: same spec with
    λ, bit-identical logits, the same greedy tokens through the reloaded cache."""
    model = tiny_model("llama")
    tquant.quantize(model, "qoq_kv4", calib=calib())
    if weights:
        tquant.quantize(model, weights, bits=4, group_size=32)  # keeps the KV spec
    tquant.save(model, str(tmp_path / "m"))
    loaded = tquant.load(str(tmp_path / "m"))
    qc = model.config.quantization_config
    assert loaded.config.quantization_config["kv_cache"] == qc["kv_cache"] and qc["kv_cache"]["smooth_scales"]
    assert qc["method"] == weights
    ids = token_batch(1, 20, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
        assert torch.equal(decoded_logits(loaded, ids, 8, tquant.kv_cache(loaded)),
                           decoded_logits(model, ids, 8, tquant.kv_cache(model)))
        a = model.generate(ids, max_new_tokens=20, do_sample=False)
        b = loaded.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(a, b)


def test_no_smoothing_is_data_free_on_any_attention():
    """smooth_alpha=0: no calibration, no fold (GPT-2 has no q_proj / k_proj), only the KV4 cache."""
    model = tiny_model("gpt2")
    weights = copy.deepcopy(model.state_dict())
    tquant.quantize(model, "qoq_kv4", smooth_alpha=0)
    assert all(torch.equal(t, weights[n]) for n, t in model.state_dict().items())
    assert model.config.quantization_config["kv_cache"]["smooth_scales"] is None
    with torch.no_grad():
        out = model.generate(token_batch(1, 8, seed=10), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (1, 14)


EXTRA_ARCHS = {  # q / k norms after the projections; partial RoPE (half of each head rotated)
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256),
    "phi": lambda: transformers.PhiConfig(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256),
}


@pytest.mark.parametrize("case, match", [
    ("kv_bits", "kv_bits=2 is not supported; choose 4 or 8"),
    ("alpha high", r"smooth_alpha must be in \[0, 1\]; got 1.5"),
    ("alpha negative", r"smooth_alpha must be in \[0, 1\]; got -0.1"),
    ("residual", "residual must be >= 0"),
    ("bits", "give kv_bits= instead of bits="),
    ("no calib", "needs calibration data"),
    ("odd head", "needs an even head size"),
    ("head_dim", "head_dim=8 is not the model's head size 16"),
    ("after rtn", "apply qoq_kv4 before the weight method"),
    ("gpt2", "separate q_proj / k_proj linears; GPT2LMHeadModel has none"),
    ("qwen3", "cannot be folded into Qwen3ForCausalLM.*q_norm / k_norm"),
    ("phi", "cannot be folded into PhiForCausalLM.*partial / interleaved RoPE"),
    ("twice", "already carry qoq_kv4's SmoothAttention"),
])
def test_refusals(monkeypatch, case, match):
    for name, config in EXTRA_ARCHS.items():
        monkeypatch.setitem(ARCHS, name, config)
    arch = case if case in ("gpt2", "qwen3", "phi") else "llama"
    model = tiny_model(arch, **({"head_dim": 15} if case == "odd head" else {}))
    options = {"kv_bits": dict(kv_bits=2), "alpha high": dict(smooth_alpha=1.5),
               "alpha negative": dict(smooth_alpha=-0.1), "residual": dict(residual=-1),
               "bits": dict(bits=4), "head_dim": dict(head_dim=8)}.get(case, {})
    if case == "after rtn":
        tquant.quantize(model, "rtn", bits=4, group_size=32)
    if case == "twice":
        tquant.quantize(model, "qoq_kv4", calib=calib())
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        tquant.quantize(model, "qoq_kv4", **({} if case == "no calib" else {"calib": calib()}), **options)
    assert all(torch.equal(t, weights[n]) for n, t in model.state_dict().items())  # refused before any fold

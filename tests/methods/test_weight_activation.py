"""The weight-activation methods (smoothquant, zeroquant + LKD, qqq, W4A4) on tiny random models."""
import pytest
import torch

import tquant
from tquant import driver
from tquant.calib import smoothing
from tquant.modules import ActQuantLinear
from tests.tiny_models import tiny_model, token_batch

CALIB = token_batch(8, 32)


def rel_err(model, reference, ids=CALIB):
    with torch.no_grad():
        out = model(ids).logits
    return ((out - reference).norm() / reference.norm()).item()


def with_outliers(model, factor=30.0):
    """Activation outlier channels (as in real LLMs): a few norm-weight channels scaled up."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith("layernorm") or name.endswith("layer_norm") or name.endswith(".ln_1") or name.endswith(".ln_2"):
                mod.weight[:: 17] *= factor
    return model


def block_inputs(model):
    name, blocks = driver.find_blocks(model)
    return blocks, driver.capture_block_inputs(model, name, blocks, CALIB, "cpu", 8)


def smooth_block(block, inputs, alpha=0.5, tied=False):
    """Apply SmoothQuant's smoothing to every input group of block; {first linear: absorber name or None}."""
    linears = driver._linears(block)
    groups = driver._input_groups(block, linears, *inputs[0])
    amax = smoothing.input_absmax(block, {g[0]: linears[g[0]] for g in groups}, inputs)
    names = {id(m): n for n, m in block.named_modules()}
    chosen = {}
    for g in groups:
        group = [linears[n] for n in g]
        absorber = smoothing.find_absorber(block, group, inputs, tied=tied)
        smoothing.SmoothedGroup(group, absorber, amax[g[0]], alpha)
        chosen[g[0]] = None if absorber is None else names[id(absorber.module)]
    return chosen


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_smoothing_keeps_the_float_model_exact(arch):
    model = with_outliers(tiny_model(arch))
    with torch.no_grad():
        reference = model(CALIB).logits
        blocks, inputs = block_inputs(model)
        chosen = smooth_block(blocks[0], inputs)
    assert rel_err(model, reference) < 1e-5
    expected = {
        # GQA: v_proj has fewer channels than o_proj's input, so o_proj is smoothed at run time
        "llama": {"self_attn.q_proj": "input_layernorm", "self_attn.o_proj": None,
                  "mlp.gate_proj": "post_attention_layernorm", "mlp.down_proj": "mlp.up_proj"},
        "opt": {"self_attn.q_proj": "self_attn_layer_norm", "self_attn.out_proj": "self_attn.v_proj",
                "fc1": "final_layer_norm", "fc2": "fc1"},  # ReLU is homogeneous: fc1 absorbs fc2's scale
        "gpt2": {"attn.c_attn": "ln_1", "attn.c_proj": None, "mlp.c_fc": "ln_2", "mlp.c_proj": None},
    }[arch]
    assert chosen == expected


def test_gqa_v_proj_absorbs_o_projs_tied_scale():
    """tied=True (QoQ's output-module smoothing): under GQA (6 query heads on 2 KV heads) v_proj takes o_proj's
    divisor, one per KV-head channel, and the float model stays exact; the scales are tied as they must be."""
    model = with_outliers(tiny_model("llama"))
    with torch.no_grad():
        reference = model(CALIB).logits
        blocks, inputs = block_inputs(model)
        v_before = blocks[0].self_attn.v_proj.weight.clone()
        chosen = smooth_block(blocks[0], inputs, tied=True)
    assert chosen["self_attn.o_proj"] == "self_attn.v_proj"
    assert rel_err(model, reference) < 1e-5
    ratio = (v_before / blocks[0].self_attn.v_proj.weight)[:, 0]  # s per v_proj channel
    assert ratio.std() > 1e-3  # really scaled, not by one factor
    index = smoothing._gqa_index(96, 32, 16)
    assert index.tolist()[:20] == [*range(16), *range(4)] and index[48].item() == 16  # heads 0-2 -> 0, 3-5 -> 1
    s = smoothing.smoothing_scales(torch.rand(96) + 0.1, [torch.randn(8, 96)], 0.5, index)
    assert torch.equal(s[:16], s[16:32]) and torch.equal(s[:16], s[32:48]) and not torch.equal(s[:16], s[48:64])


def test_absorber_is_not_fooled_by_a_saturated_silu_gate():
    """With huge gate pre-activations SiLU(g) ~ ReLU(g) is nearly homogeneous, so scaling gate_proj's rows
    almost passes; only up_proj absorbs down_proj's scale exactly."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight *= 200
        reference = model(CALIB).logits
        blocks, inputs = block_inputs(model)
        chosen = smooth_block(blocks[0], inputs)
    assert chosen["mlp.down_proj"] == "mlp.up_proj"
    assert rel_err(model, reference) < 1e-5


def quantized(arch, method, outliers=True, **options):
    model = tiny_model(arch)
    if outliers:
        with_outliers(model)
    with torch.no_grad():
        reference = model(CALIB).logits
    tquant.quantize(model, method, calib=CALIB, device="cpu", progress=False, **options)
    return model, reference


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuantLinear)}


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_smoothquant_beats_plain_w8a8_on_outlier_activations(arch):
    sq, reference = quantized(arch, "smoothquant", alpha=0.5)
    plain, _ = quantized(arch, "zeroquant", bits=8)  # RTN W8A8 per-channel / per-token, no smoothing
    assert all(m.bits == 8 and m.act_bits == 8 for m in layers(sq).values())
    assert rel_err(sq, reference) < 0.7 * rel_err(plain, reference)


def test_smoothquant_static_scales_and_runtime_smoothing():
    model, reference = quantized("llama", "smoothquant", alpha=0.5, act_static=True)
    mods = layers(model)
    assert all(m.act_scale is not None and m.act_scale.item() > 0 for m in mods.values())
    assert {n for n, m in mods.items() if m.smooth is not None} == {f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)}
    dynamic, _ = quantized("llama", "smoothquant", alpha=0.5)
    assert rel_err(dynamic, reference) < rel_err(model, reference) < 0.3  # per-tensor is coarser than per-token


def test_zeroquant_w4_8_mixes_bits_by_layer():
    model, _ = quantized("llama", "zeroquant", bits=8, mlp_bits=4, group_size=32)
    for name, m in layers(model).items():
        expected = (4, 32) if ".mlp." in name else (8, m.in_features)
        assert (m.bits, m.group_size) == expected, name
        assert (m.group_scale is not None) == (m.bits == 4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lkd_lowers_the_block_error_it_optimizes(arch):
    model, reference = quantized(arch, "zeroquant", bits=8, mlp_bits=4, lkd=True, lkd_steps=30, lkd_lr=2e-4)
    log = model.config.quantization_config["report"]["lkd_mse_before_after"]
    assert len(log) == 2 and all(after < 0.9 * before for before, after in log.values())
    plain, _ = quantized(arch, "zeroquant", bits=8, mlp_bits=4)
    assert rel_err(model, reference) < rel_err(plain, reference)


def test_lkd_layers_option_limits_training():
    model, _ = quantized("llama", "zeroquant", lkd=True, lkd_steps=5, lkd_layers="model.layers.1.*")
    assert list(model.config.quantization_config["report"]["lkd_mse_before_after"]) == ["model.layers.1"]


@pytest.mark.parametrize("group_size", [-1, 32])
def test_qqq_beats_rtn_w4a8_and_uses_the_integer_grid(group_size):
    model, reference = quantized("llama", "qqq", group_size=group_size, smooth_grid=5)
    rtn, _ = quantized("llama", "zeroquant", bits=4, group_size=group_size)
    assert rel_err(model, reference) < rel_err(rtn, reference)
    for m in layers(model).values():
        assert m.bits == 4 and m.act_bits == 8
        assert (m.group_scale is not None) == (group_size == 32)
        if m.group_scale is not None:
            assert 1 <= m.group_scale.min() and m.group_scale.max() <= 15
    alphas = model.config.quantization_config["report"]["alpha"]
    assert len(alphas) == 14 and all(a is None or 0 <= a < 1 for a in alphas.values())


@pytest.mark.parametrize("method,options", [("zeroquant", dict(bits=4, act_bits=4, group_size=32)),
                                            ("qqq", dict(act_bits=4, group_size=-1, smooth_grid=3))])
def test_w4a4_option(method, options):
    model, reference = quantized("llama", method, **options)
    assert all(m.bits == 4 and m.act_bits == 4 for m in layers(model).values())
    assert rel_err(model, reference) < 1.0


@pytest.mark.parametrize("method,options", [("smoothquant", dict(act_static=True)),
                                            ("qqq", dict(group_size=32, smooth_grid=3)),
                                            ("zeroquant", dict(bits=8, mlp_bits=4, group_size=32, act_bits=8))])
def test_weight_activation_save_load_is_bit_identical(tmp_path, method, options):
    model, _ = quantized("llama", method, **options)
    tquant.save(model, tmp_path)
    loaded = tquant.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(CALIB).logits, model(CALIB).logits)
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in model.named_modules()}


@pytest.mark.parametrize("method,options,message", [
    ("smoothquant", dict(sym=False), "symmetric"),
    ("smoothquant", dict(act_bits=6), "act_bits=6"),
    ("smoothquant", dict(bits=3), "4 or 8 bits"),
    ("smoothquant", dict(group_size=32), "8-bit weights are per-channel"),
    ("smoothquant", dict(alpha=1.5), "alpha must be in"),
    ("zeroquant", dict(bits=8, act_bits=4), "4-bit activations .* need 4-bit weights"),
    ("zeroquant", dict(lkd=True, lkd_steps=0), "lkd_steps"),
    ("qqq", dict(bits=8), "4 bits"),
    ("qqq", dict(group_size=32, static_groups=False), "static_groups=True"),
])
def test_weight_activation_bad_options_raise(method, options, message):
    with pytest.raises(ValueError, match=message):
        tquant.quantize(tiny_model("llama"), method, calib=CALIB, device="cpu", progress=False, **options)


def test_zeroquant_without_lkd_is_data_free():
    model = tiny_model("llama")
    tquant.quantize(model, "zeroquant", device="cpu", progress=False)  # no calib=
    assert len(layers(model)) == 14
    with pytest.raises(ValueError, match="needs calibration data"):
        tquant.quantize(tiny_model("llama"), "zeroquant", lkd=True, device="cpu", progress=False)

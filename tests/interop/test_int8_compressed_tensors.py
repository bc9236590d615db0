"""compressed-tensors int-quantized W8A8 (SmoothQuant, ZeroQuant), checked with the real library (0.20.x): its config
parser reads the export, its decompressor (transformers' CompressedTensorsHfQuantizer, as a user loads the checkpoint)
gives exactly tquant's int8 weights times their scales and, running its activation simulation on vLLM's int8 grid,
tquant's layer outputs and logits; tquant.load reads the export (and the library's own compressor's output) into
ActQuantLinear; a smoothing factor no op can absorb is refused by name.

Two things of the library's simulation (not of the checkpoint) are set aside here, each measured on these models:
- its symmetric int8 grid is [-128, 127] with scale absmax / 127.5; vLLM's int8 kernels (and tquant) quantize
  activations to [-127, 127] with absmax / 127. Two grids round independently, so their logits differ by about the
  whole activation-quantization error (2.6% relative on the tiny Llama); `vllm_grid` runs the library on vLLM's grid.
- its "token" strategy keeps dims 0 and 1: a 2-D input (OPT reshapes to [tokens, K] before fc1 / fc2) is quantized
  per tensor. OPT's layers are compared on 3-D inputs only."""
import contextlib
import json
import os
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

import tquant
from tquant.modules import ActQuantLinear
from tests.interop.helpers import library_simulation, library_w8a8_checkpoint, logits
from tests.tiny_models import tiny_model, token_batch

ct = pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

CASES = {  # arch, its overrides, method, options; MHA Llama: SmoothQuant folds every factor (v_proj absorbs o_proj's)
    "smoothquant-llama-mha": ("llama", dict(num_key_value_heads=6), "smoothquant", {}),
    "smoothquant-llama-mha-static": ("llama", dict(num_key_value_heads=6), "smoothquant", dict(act_static=True)),
    "smoothquant-opt": ("opt", {}, "smoothquant", {}),
    "zeroquant-llama-gqa": ("llama", {}, "zeroquant", {}),
}


def w8a8(arch, overrides, method, options, **extra):
    model = tiny_model(arch, **overrides)
    tquant.quantize(model, method, calib=token_batch(8), progress=False, **options, **extra)
    return model


def act_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuantLinear)}




@contextlib.contextmanager
def vllm_grid():
    """The library's activation simulation on vLLM's symmetric int8 grid: [-127, 127], scale absmax / 127."""
    from compressed_tensors.quantization.lifecycle import forward
    from compressed_tensors.quantization.utils import helpers

    def grid(args, device):
        return torch.tensor(-127.0, device=device), torch.tensor(127.0, device=device)

    with mock.patch.object(helpers, "calculate_range", grid), mock.patch.object(forward, "calculate_range", grid):
        yield


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    model = w8a8(*CASES[request.param])
    out = str(tmp_path_factory.mktemp("ct8"))
    tquant.export(model, out, format="compressed-tensors")
    return request.param, model, out


def test_config_and_tensors_are_what_the_library_reads(exported):
    from compressed_tensors.quantization import QuantizationConfig

    name, model, out = exported
    static = CASES[name][3].get("act_static", False)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == "int-quantized" and list(parsed.config_groups) == ["group_0"]
    scheme = parsed.config_groups["group_0"]
    assert scheme.targets == ["Linear"] and parsed.ignore == ["lm_head"]
    w, a = scheme.weights, scheme.input_activations
    assert (w.num_bits, w.type, w.symmetric, w.strategy) == (8, "int", True, "channel")
    assert (a.num_bits, a.type, a.symmetric, a.strategy, a.dynamic) == (8, "int", True, "tensor" if static else
                                                                        "token", not static)
    t = load_file(os.path.join(out, "model.safetensors"))
    for layer, mod in act_layers(model).items():
        assert t[f"{layer}.weight"].dtype == torch.int8 and torch.equal(t[f"{layer}.weight"], mod.qweight)
        assert t[f"{layer}.weight_scale"].shape == (mod.out_features, 1)
        assert torch.equal(t[f"{layer}.weight_scale"][:, 0], mod.w_scale)
        assert f"{layer}.weight_zero_point" not in t and (f"{layer}.input_scale" in t) == static


def test_every_smoothing_factor_was_folded_into_the_preceding_op(exported):
    name, model, out = exported
    arch, overrides, method, _ = CASES[name]
    assert all(m.smooth is None for m in act_layers(model).values())  # nothing left for a run-time divisor
    if method == "smoothquant":  # the norms took 1 / s: the exported norm weights are not the float model's
        norm = "model.layers.0.input_layernorm.weight" if arch == "llama" else \
            "model.decoder.layers.0.self_attn_layer_norm.weight"
        assert not torch.equal(load_file(os.path.join(out, "model.safetensors"))[norm],
                               tiny_model(arch, **overrides).state_dict()[norm])


def test_library_decompression_gives_tquants_weights_and_outputs(exported):
    name, model, out = exported
    hf = library_simulation(out)
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vllm_grid():
        for layer, mod in act_layers(model).items():
            ref = hf.get_submodule(layer)
            assert torch.equal(ref.weight, mod.qweight.float() * mod.w_scale[:, None]), layer
            if mod.in_features == 96:
                y = mod(x)
                assert torch.allclose(ref(x), y, rtol=0, atol=1e-5 * y.abs().max()), layer
    if CASES[name][0] == "opt":
        return  # the library quantizes OPT's 2-D fc1 / fc2 inputs per tensor (module docstring)
    ids = token_batch(4, seed=9)
    with torch.no_grad(), vllm_grid():
        theirs = hf(ids).logits
    ours, float_logits = logits(model, ids), logits(tiny_model(CASES[name][0], **CASES[name][1]), ids)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    # rounding flips (inputs equal to 1e-7 land on either side of a code boundary) only: measured 0.3-0.5%,
    # against 2.7-5.5% for the float model
    assert rel(theirs, ours) < 0.01 and rel(theirs, ours) < 0.3 * rel(float_logits, ours)


def test_tquant_imports_its_int8_export_bit_exactly(exported, tmp_path):
    name, model, out = exported
    loaded = tquant.load(out)
    ours, theirs = act_layers(model), act_layers(loaded)
    assert set(theirs) == set(ours)
    for layer, mod in ours.items():
        got = theirs[layer]
        assert torch.equal(got.qweight, mod.qweight) and torch.equal(got.w_scale, mod.w_scale), layer
        assert (got.act_scale is None) == (mod.act_scale is None)
        assert got.act_scale is None or torch.equal(got.act_scale, mod.act_scale)
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.config.quantization_config["options"] == {"imported_from": "compressed-tensors"}
    tquant.save(loaded, str(tmp_path))  # an imported model is a tquant model: saved and loaded as one
    assert torch.equal(logits(tquant.load(str(tmp_path))), logits(model))


def test_an_unfoldable_smoothing_factor_is_refused_by_layer_and_method(tmp_path):
    """GQA Llama: o_proj's input has no op to take its factor (v_proj has 32 channels for o_proj's 96)."""
    case = ("llama", {}, "smoothquant", {})
    model = w8a8(*case)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.o_proj: method 'smoothquant' left a smoothing "
                                         r"factor .*grouped-query attention \(num_key_value_heads=2 < "
                                         r"num_attention_heads=6\).*--skip '\*\.o_proj'"):
        tquant.export(model, str(tmp_path / "refused"), format="compressed-tensors")
    assert not (tmp_path / "refused").exists()
    kept = w8a8(*case, skip=["*.o_proj"])  # what the error says to do: o_proj stays float, in the export's ignore
    tquant.export(kept, str(tmp_path / "ok"), format="compressed-tensors")
    qc = json.load(open(tmp_path / "ok" / "config.json"))["quantization_config"]
    assert qc["ignore"] == ["lm_head", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    hf = library_simulation(str(tmp_path / "ok"))
    assert type(hf.get_submodule("model.layers.0.self_attn.o_proj")).__name__ == "Linear"
    assert torch.equal(logits(tquant.load(str(tmp_path / "ok"))), logits(kept))


def test_w4a8_layers_are_refused_by_name(tmp_path):
    model = w8a8("llama", {}, "zeroquant", dict(mlp_bits=4))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.\w+_proj: method 'zeroquant' stores it as W4A8: "
                                         r"tquant exports int-quantized W8A8 only"):
        tquant.export(model, str(tmp_path), format="compressed-tensors")
    with pytest.raises(ValueError, match=r"GPTQ holds weight-only layers. Export with --format compressed-tensors"):
        tquant.export(model, str(tmp_path), format="gptq")


# ---- the library's own compressor -> tquant ----

@pytest.mark.parametrize("static", [False, True])
def test_library_compressed_int8_checkpoint_loads_into_act_quant_linear(tmp_path, static):
    library_w8a8_checkpoint(str(tmp_path), static, "int", 0.05)
    loaded = tquant.load(str(tmp_path))
    reference = library_simulation(str(tmp_path))
    layers = act_layers(loaded)
    assert len(layers) == 14 and all((m.bits, m.act_bits, m.act_scale is not None) == (8, 8, static)
                                     for m in layers.values())
    for layer, mod in layers.items():
        assert torch.equal(mod.qweight.float() * mod.w_scale[:, None], reference.get_submodule(layer).weight), layer
    ids = token_batch(4, seed=9)
    with torch.no_grad(), vllm_grid():
        theirs = reference(ids).logits
    assert ((logits(loaded, ids) - theirs).norm() / theirs.norm()) < 0.01


def test_bad_int8_checkpoints_are_refused_by_tensor(tmp_path):
    from safetensors.torch import save_file

    dst = tmp_path / "bad"
    tquant.export(w8a8(*CASES["zeroquant-llama-gqa"]), str(dst), format="compressed-tensors")
    config = json.load(open(dst / "config.json"))
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"]["symmetric"] = False
    json.dump(config, open(dst / "config.json", "w"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.input_activations: symmetric=False: "
                                         r"tquant quantizes activations to symmetric int8"):
        tquant.load(str(dst))
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"]["symmetric"] = True
    json.dump(config, open(dst / "config.json", "w"))
    t = load_file(dst / "model.safetensors")
    del t["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(t, dst / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight_scale: missing from the checkpoint"):
        tquant.load(str(dst))

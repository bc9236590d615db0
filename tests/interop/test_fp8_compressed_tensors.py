"""compressed-tensors float-quantized FP8 (the fp8 method: W8A8 dynamic or static, and weight-only), checked with the
real library (0.20.x): its config parser reads the export, its decompressor (transformers' CompressedTensorsHfQuantizer,
as a user loads the checkpoint) gives exactly tquant's e4m3 weights times their scales, and its FP8 simulation gives
tquant's logits; tquant.load reads the export (and the library's own compressor's output) back into FP8Linear."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import tquant
from tquant.modules import FP8Linear
from tests.interop.helpers import library_simulation, library_w8a8_checkpoint, logits
from tests.tiny_models import tiny_model, token_batch

ct = pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

CASES = {"dynamic": {}, "static": dict(act_static=True), "weight_only": dict(weight_only=True)}


def fp8_model(options, arch="llama"):
    model = tiny_model(arch)
    tquant.quantize(model, "fp8", calib=token_batch(8), progress=False, **options)
    return model


def fp8_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}




@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    model = fp8_model(CASES[request.param])
    out = str(tmp_path_factory.mktemp("ct_fp8"))
    tquant.export(model, out, format="compressed-tensors")
    return request.param, model, out


def test_config_and_tensors_are_what_the_library_reads(exported):
    from compressed_tensors.quantization import QuantizationConfig

    name, model, out = exported
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == ("naive-quantized" if name == "weight_only" else "float-quantized")
    scheme = parsed.config_groups["group_0"]
    assert list(parsed.config_groups) == ["group_0"] and scheme.targets == ["Linear"] and parsed.ignore == ["lm_head"]
    w, a = scheme.weights, scheme.input_activations
    assert (w.num_bits, w.type, w.symmetric, w.strategy, w.dynamic) == (8, "float", True, "channel", False)
    if name == "weight_only":
        assert a is None
    else:
        static = name == "static"
        assert (a.num_bits, a.type, a.symmetric, a.strategy, a.dynamic) == (8, "float", True, "tensor" if static else
                                                                            "token", not static)
    t = load_file(os.path.join(out, "model.safetensors"))
    for layer, mod in fp8_layers(model).items():
        assert t[f"{layer}.weight"].dtype == torch.float8_e4m3fn
        assert torch.equal(t[f"{layer}.weight"].view(torch.uint8), mod.qweight.view(torch.uint8))
        assert t[f"{layer}.weight_scale"].dtype == torch.float32
        assert torch.equal(t[f"{layer}.weight_scale"], mod.w_scale[:, None])
        assert (f"{layer}.input_scale" in t) == (name == "static")
        assert name != "static" or torch.equal(t[f"{layer}.input_scale"], mod.act_scale)


def check_every_layer(hf, ours: dict, ids=None):
    """Each FP8Linear of `ours` against the library's layer of that name in `hf`: the decompressed weight equal to
    qweight * w_scale, and the output on the input the library's layer saw within 1e-6 (summation order). Returns
    (the library model's logits, ids)."""
    ids = token_batch(4, seed=9) if ids is None else ids
    seen = {}

    def keep(layer):
        def hook(module, args, output):
            seen.setdefault(layer, (args[0].detach(), output.detach()))
        return hook
    hooks = [hf.get_submodule(layer).register_forward_hook(keep(layer)) for layer in ours]
    with torch.no_grad():
        theirs = hf(ids).logits
        for hook in hooks:
            hook.remove()
        for layer, mod in ours.items():
            assert torch.equal(hf.get_submodule(layer).weight, mod.qweight.float() * mod.w_scale[:, None]), layer
            x, y = seen[layer]
            assert ((mod(x) - y).norm() / y.norm()) < 1e-6, layer
    return theirs, ids


def test_library_decompression_gives_tquants_weights_and_outputs(exported):
    """Every decompressed weight equals qweight * w_scale exactly, and every layer of the library's model (its own
    e4m3 activation simulation: scale max |x| / 448, clamp, cast) gives tquant's output on the input it saw, up to
    summation order (its fp32 against tquant's reference in fp64): measured 1.8e-7 .. 2.6e-7 relative. Along the
    model those 1e-7 differences move a few activations across an e4m3 rounding boundary (one step is 1/16 of the
    value), and the differences grow block by block: measured, the logits differ by 0.8 % (dynamic), 0.3 % (static)
    and not at all (weight-only: no activation rounding), against 8-11 % between tquant and the float model."""
    name, model, out = exported
    hf = library_simulation(out)
    theirs, ids = check_every_layer(hf, fp8_layers(model))
    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    ours_logits, float_logits = logits(model, ids), logits(tiny_model("llama"), ids)
    assert rel(theirs, ours_logits) < 0.02 and rel(theirs, ours_logits) < 0.3 * rel(float_logits, ours_logits)


def test_tquant_imports_its_fp8_export_bit_exactly(exported, tmp_path):
    name, model, out = exported
    loaded = tquant.load(out)
    ours, theirs = fp8_layers(model), fp8_layers(loaded)
    assert set(theirs) == set(ours) and len(ours) == 14
    for layer, mod in ours.items():
        got = theirs[layer]
        assert torch.equal(got.qweight.view(torch.uint8), mod.qweight.view(torch.uint8)), layer
        assert torch.equal(got.w_scale, mod.w_scale) and got.act_bits == mod.act_bits
        assert (got.act_scale is None) == (mod.act_scale is None)
        assert got.act_scale is None or torch.equal(got.act_scale, mod.act_scale)
    assert torch.equal(logits(loaded), logits(model))
    tquant.save(loaded, str(tmp_path))  # an imported model is a tquant model: saved and loaded as one
    assert torch.equal(logits(tquant.load(str(tmp_path))), logits(model))


def test_gptq_and_awq_refuse_fp8_naming_compressed_tensors(tmp_path):
    model = fp8_model({})
    for fmt in ("gptq", "awq"):
        with pytest.raises(ValueError, match=r"method 'fp8' stores .* as FP8Linear, float8 e4m3 weights.*"
                                             r"--format compressed-tensors \(float-quantized"):
            tquant.export(model, str(tmp_path / fmt), format=fmt)


@pytest.mark.parametrize("static", [False, True])
def test_library_compressed_fp8_checkpoint_loads_into_fp8_linear(tmp_path, static):
    library_w8a8_checkpoint(str(tmp_path), static, "float", 0.01)
    loaded = tquant.load(str(tmp_path))
    reference = library_simulation(str(tmp_path))
    layers = fp8_layers(loaded)
    assert len(layers) == 14 and all((m.act_bits, m.act_scale is not None) == (8, static) for m in layers.values())
    theirs, ids = check_every_layer(reference, layers)
    assert ((logits(loaded, ids) - theirs).norm() / theirs.norm()) < 0.02  # e4m3 flips, as above


def test_bad_fp8_checkpoints_are_refused_by_tensor(tmp_path):
    from safetensors.torch import save_file

    dst = tmp_path / "bad"
    tquant.export(fp8_model({}), str(dst), format="compressed-tensors")
    config = json.load(open(dst / "config.json"))
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "group"
    json.dump(config, open(dst / "config.json", "w"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight: strategy='group': tquant's "
                                         r"FP8 GEMMs take e4m3 weights"):
        tquant.load(str(dst))
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "channel"
    json.dump(config, open(dst / "config.json", "w"))
    t = load_file(dst / "model.safetensors")
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"].to(torch.float8_e5m2)
    save_file(t, dst / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: dtype torch\.float8_e5m2, "
                                         r"expected torch\.float8_e4m3fn"):
        tquant.load(str(dst))

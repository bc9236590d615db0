"""compressed-tensors pack-quantized, checked with the real library (compressed-tensors 0.20.x, the `test` extra):
its decompressor (through transformers' CompressedTensorsHfQuantizer, as a user loads the checkpoint) gives exactly
tquant's dequantized weights and logits; its compressor's checkpoint loads into tquant's PackedLinear with the same
weights and the same logits as its own decompressed model."""
import json
import os

import pytest
import torch

import tquant
from tquant.interop.common import pack_dense, unpack_dense
from tests.interop.helpers import dequantized, edit_checkpoint, give_perm, logits, packed_layers, quantized
from tests.tiny_models import tiny_model

ct = pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")


def _ct_load(path):
    """The checkpoint as transformers + compressed-tensors load it, decompressed to float."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)).eval()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_dense_packing_is_the_librarys(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (6, 70), generator=g)
    ours = pack_dense(codes, bits)
    theirs = pack_to_int32((codes - 2 ** (bits - 1)).to(torch.int8), bits)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_dense(ours, bits, 70), codes)
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size([6, 70])).long() + 2 ** (bits - 1), codes)


CASES = {  # W4A16 / W8A16, symmetric and asymmetric, per group and per channel
    "w4-g32-sym": dict(bits=4, group_size=32, sym=True),
    "w4-g32-asym": dict(bits=4, group_size=32, sym=False),
    "w4-channel-asym": dict(bits=4, group_size=-1, sym=False),
    "w8-channel-sym": dict(bits=8, group_size=-1, sym=True),
    "w8-g32-asym": dict(bits=8, group_size=32, sym=False),
    "w4-g32-gptq-static-act-order": dict(method="gptq", bits=4, group_size=32, sym=True, act_order=True,
                                         static_groups=True),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    model = quantized(**CASES[request.param])
    out = str(tmp_path_factory.mktemp("ct"))
    tquant.export(model, out, format="compressed-tensors", overwrite=True)
    return request.param, model, out


def test_config_is_what_the_library_reads(exported):
    from compressed_tensors.quantization import QuantizationConfig

    name, model, out = exported
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert qc["quant_method"] == "compressed-tensors" and parsed.format == "pack-quantized"
    args = parsed.config_groups["group_0"].weights
    opts = CASES[name]
    assert args.num_bits == opts["bits"] and args.symmetric == opts["sym"]
    assert args.strategy == ("channel" if opts["group_size"] == -1 else "group")
    assert parsed.ignore == ["lm_head"]


def test_tensor_names_and_dtypes(exported):
    from safetensors.torch import load_file

    name, model, out = exported
    t = load_file(os.path.join(out, "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    bits, sym = CASES[name]["bits"], CASES[name]["sym"]
    assert t[f"{q}.weight_packed"].dtype == torch.int32 and t[f"{q}.weight_packed"].shape == (96, 96 * bits // 32)
    assert t[f"{q}.weight_shape"].dtype == torch.int64 and t[f"{q}.weight_shape"].tolist() == [96, 96]
    assert t[f"{q}.weight_scale"].dtype == torch.float32
    assert (f"{q}.weight_zero_point" in t) == (not sym)
    assert f"{q}.weight" not in t and "lm_head.weight" not in t  # tied to the embeddings, as save_pretrained writes


def test_library_decompression_gives_tquants_weights_and_logits(exported):
    name, model, out = exported
    hf = _ct_load(out)
    for layer, mod in packed_layers(model).items():
        w = hf.get_submodule(layer).weight
        assert torch.equal(w, dequantized(mod)), layer
    assert torch.equal(logits(hf), logits(model))


def test_tquant_imports_its_export_bit_exactly(exported):
    name, model, out = exported
    loaded = tquant.load(out)
    layers = packed_layers(loaded)
    assert set(layers) == set(packed_layers(model))
    for layer, mod in packed_layers(model).items():
        assert torch.equal(dequantized(layers[layer]), dequantized(mod)), layer
    assert torch.equal(logits(loaded), logits(model))


def test_act_order_with_one_group_per_channel_is_written_in_input_order(tmp_path):
    """A perm with group_size = K exports exactly (actorder "weight", columns put back in input order)."""
    model = quantized(bits=4, group_size=-1, sym=False)
    name = "model.layers.1.mlp.down_proj"
    new = give_perm(model, name)
    tquant.export(model, str(tmp_path), format="compressed-tensors")
    qc = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert {g["weights"].get("actorder") for g in qc["config_groups"].values()} == {None, "weight"}
    hf = _ct_load(str(tmp_path))
    assert torch.equal(hf.get_submodule(name).weight, dequantized(new))
    assert torch.allclose(logits(hf), logits(model), atol=1e-5)
    assert torch.equal(dequantized(tquant.load(str(tmp_path)).get_submodule(name)), dequantized(new))


def test_grouped_act_order_is_refused_naming_gptq(tmp_path):
    model = quantized(bits=4, group_size=32)
    give_perm(model, "model.layers.0.self_attn.k_proj")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj: act-order groups.*g_idx.*"
                                         r"compressed-tensors 0\.20.*--format gptq"):
        tquant.export(model, str(tmp_path), format="compressed-tensors")
    assert not os.path.exists(tmp_path / "config.json")


# ---- the library's own compressor -> tquant ----

def _library_checkpoint(path, bits, group_size, sym):
    """A tiny Llama quantized and saved the way llm-compressor saves it: compressed-tensors' qparams
    (calculate_qparams of each weight's min / max), ModelCompressor.compress_model, save_pretrained, update_config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = tiny_model("llama")
    weights = dict(num_bits=bits, type="int", symmetric=sym, strategy="group" if group_size > 0 else "channel",
                   group_size=group_size if group_size > 0 else None)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                ignore=["lm_head"], quantization_status=QuantizationStatus.CALIBRATION,
                                format="pack-quantized")
    apply_quantization_config(model, config)
    for name, mod in model.named_modules():
        if hasattr(mod, "quantization_scheme") and name != "lm_head":
            w = mod.weight.detach()
            n, k = w.shape
            gs = group_size if group_size > 0 else k
            grouped = w.reshape(n, k // gs, gs)
            scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), mod.quantization_scheme.weights)
            mod.weight_scale.data.copy_(scale.reshape(mod.weight_scale.shape))
            if hasattr(mod, "weight_zero_point"):
                mod.weight_zero_point.data.copy_(zp.reshape(mod.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (4, 32, False), (8, -1, True), (4, -1, False)])
def test_library_compressed_checkpoint_loads_into_packed_linear(tmp_path, bits, group_size, sym):
    _library_checkpoint(str(tmp_path), bits, group_size, sym)
    qc = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    loaded = tquant.load(str(tmp_path))
    reference = _ct_load(str(tmp_path))
    layers = packed_layers(loaded)
    assert len(layers) == 14 and all(m.bits == bits for m in layers.values())  # 2 blocks x 7 linears, lm_head float
    for layer, mod in layers.items():
        assert torch.equal(dequantized(mod), reference.get_submodule(layer).weight), layer
    assert torch.allclose(logits(loaded), logits(reference), atol=1e-5, rtol=0)
    # no float weight was made: the layers hold packed codes and run tquant's kernels (or their references)
    assert all(not hasattr(m, "weight") for m in layers.values())


# ---- bad or foreign pack-quantized checkpoints ----

Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("weights,tensors,message", [
    (dict(num_bits=5), {}, rf"{Q}\.weight_packed: bits=5: tquant has kernels for \[2, 3, 4, 8\]-bit weights only"),
    (dict(type="float"), {}, rf"{Q}\.weight: weights of type 'float': tquant's kernels take integer weights"),
    (dict(group_size=40), {}, rf"{Q}\.weight_scale: group_size=40 does not divide in_features=96"),
    (dict(actorder="group"), {}, rf"{Q}\.weight_g_idx: missing: actorder 'group' needs each input channel's group"),
    ({}, {f"{Q}.weight_packed": torch.zeros(96, 11, dtype=torch.int32)},
     rf"{Q}\.weight_packed: shape \[96, 11\], expected \[96, 12\]"),
    ({}, {f"{Q}.weight_shape": torch.tensor([96, 64])},
     rf"{Q}\.weight_shape: \[96, 64\], the model's layer is \[96, 96\]"),
    ({}, {f"{Q}.weight_zero_point": None}, rf"{Q}\.weight_zero_point: missing from the checkpoint \(expected shape "
                                            r"\[12, 3\]\)"),
    ({}, {f"{Q}.weight_scale": torch.ones(96, 3, dtype=torch.int32)}, rf"{Q}\.weight_scale: dtype torch\.int32"),
    ({}, {f"{Q}.weight_g_idx": torch.zeros(96, dtype=torch.int32)},
     rf"{Q}\.weight_g_idx: group 0 has 96 input channels, expected 32"),
])
def test_bad_pack_quantized_checkpoints_name_the_tensor(tmp_path, weights, tensors, message):
    """The issue's bad checkpoints (bits tquant has no kernel for, mismatched shapes, a missing g_idx or zero point)
    in an asymmetric W4 g32 export, each refused by tquant.load with the tensor's name and what was expected."""
    tquant.export(quantized(bits=4, group_size=32, sym=False), str(tmp_path), format="compressed-tensors")
    edit_checkpoint(str(tmp_path), lambda qc: qc["config_groups"]["group_0"]["weights"].update(weights), tensors)
    with pytest.raises(ValueError, match=message):
        tquant.load(str(tmp_path))

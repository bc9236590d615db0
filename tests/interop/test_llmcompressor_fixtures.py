"""Checkpoints written by llm-compressor itself (tests/fixtures/llmcompressor, made by
tests/fixtures/make_llmcompressor.py with llm-compressor 0.14's oneshot) load into tquant's modules without a float
weight, with the weights and logits of the library's own decompression (transformers + compressed-tensors)."""
import json
from pathlib import Path

import pytest
import torch

import tquant
from tquant.modules import ActQuantLinear, PackedLinear
from tests.interop.helpers import dequantized, logits, packed_layers

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "llmcompressor"
WEIGHT_ONLY = {"w4a16_sym_g32": (4, 32, True), "w4a16_asym_g32": (4, 32, False), "gptq_w4a16_g32": (4, 32, True)}


def library_model(path):
    """The checkpoint as a user of the library loads it, decompressed to float weights."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)).eval()


@pytest.mark.parametrize("name", list(WEIGHT_ONLY))
def test_weight_only_fixture_loads_into_packed_linear(name):
    bits, group, sym = WEIGHT_ONLY[name]
    qc = json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    loaded = tquant.load(str(FIXTURES / name))
    reference = library_model(str(FIXTURES / name))
    layers = packed_layers(loaded)
    assert len(layers) == 14  # 2 blocks x 7 linears; lm_head float
    for layer, mod in layers.items():
        assert (mod.bits, mod.group_size) == (bits, group) and not hasattr(mod, "weight")
        if sym:  # a symmetric grid: every zero point at the middle code
            assert torch.all(mod.zeros == 2 ** (bits - 1)), layer
        assert torch.equal(dequantized(mod), reference.get_submodule(layer).weight), layer
    assert torch.allclose(logits(loaded), logits(reference), atol=1e-5, rtol=0)


def test_int8_fixture_loads_into_act_quant_linear():
    """int-quantized W8A8 (dynamic per-token activations): the int8 weights times their scales are the library's
    decompressed weights exactly; the logits differ from the float-activation reference by the activation
    quantization only (a bound, and far from zero: the activations are quantized)."""
    name = "w8a8_int_dynamic"
    qc = json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    loaded = tquant.load(str(FIXTURES / name))
    reference = library_model(str(FIXTURES / name))
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, ActQuantLinear)}
    assert len(layers) == 14 and not any(isinstance(m, PackedLinear) for m in loaded.modules())
    for layer, mod in layers.items():
        w = reference.get_submodule(layer).weight
        assert mod.qweight.dtype == torch.int8 and mod.qweight.shape == w.shape and mod.smooth is None, layer
        assert torch.equal((mod.qweight.float() * mod.w_scale[:, None]).to(w.dtype), w), layer
    ours, theirs = logits(loaded), logits(reference)
    gap = ((ours - theirs).norm() / theirs.norm()).item()
    assert 1e-4 < gap < 0.05

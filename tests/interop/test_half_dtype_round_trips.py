"""A bf16 or fp16 checkpoint (what the hub holds), loaded as transformers loads it (config.json's dtype; RoPE tables
computed in float32), quantized, exported to each weight-only format and read back by tquant.load: the same dtypes
(config, embeddings, norms, every quantized layer's scales), the same codes and zero points, bit-identical logits;
and compressed-tensors decompresses the export to tquant's weights in that dtype. The float32 round trips are in
test_compressed_tensors.py, test_gptq.py and tests/methods/test_awq.py."""
import pytest
import torch

import tquant
from tests.interop.helpers import dequantized, logits, packed_layers
from tests.tiny_models import tiny_model, token_batch

transformers = pytest.importorskip("transformers")

FORMATS = {"compressed-tensors": {}, "gptq v1": dict(gptq_format="gptq"), "gptq v2": dict(gptq_format="gptq_v2"),
           "awq": {}}


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def half_model(request, tmp_path_factory):
    source = str(tmp_path_factory.mktemp("half"))
    tiny_model("llama", dtype=request.param).save_pretrained(source)
    model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    assert model.config.dtype == request.param and model.model.embed_tokens.weight.dtype == request.param
    tquant.quantize(model, "rtn", bits=4, group_size=32, sym=False, calib=token_batch(8), progress=False)
    return model


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_half_model_round_trips_in_its_dtype(tmp_path, half_model, fmt):
    tquant.export(half_model, str(tmp_path), format=fmt.split()[0], **FORMATS[fmt])
    loaded = tquant.load(str(tmp_path))
    assert loaded.config.dtype == half_model.config.dtype
    assert loaded.config._attn_implementation == half_model.config._attn_implementation
    for name, mod in packed_layers(half_model).items():
        back = loaded.get_submodule(name)
        assert back.scales.dtype == mod.scales.dtype and torch.equal(back.scales, mod.scales), name
        assert torch.equal(back.zeros, mod.zeros) and torch.equal(back.qweight, mod.qweight), name
    # every tensor both hold, the non-persistent buffers too (RoPE's inv_freq: the import computes it, no format
    # stores it), in dtype, device and value: a difference in the logits below then lies in the forwards, not here
    want, got = (dict(m.named_parameters()) | dict(m.named_buffers()) for m in (half_model, loaded))
    for name in sorted(want.keys() & got.keys()):
        assert (got[name].dtype, got[name].device) == (want[name].dtype, want[name].device), name
        assert torch.equal(got[name], want[name]), name
    assert torch.equal(logits(loaded), logits(half_model))


def test_the_librarys_decompression_of_a_half_export_is_tquants(tmp_path, half_model):
    """compressed-tensors, given the bf16 / fp16 export, decompresses to tquant's dequantized weights bit for bit, in
    the model's dtype (the logits then differ by the two matmuls' rounding: nn.Linear in half precision against
    tquant's kernel)."""
    pytest.importorskip("compressed_tensors")
    tquant.export(half_model, str(tmp_path), format="compressed-tensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), quantization_config=transformers.CompressedTensorsConfig(dequantize=True)).eval()
    for name, mod in packed_layers(half_model).items():
        weight = hf.get_submodule(name).weight
        assert weight.dtype == half_model.config.dtype and torch.equal(weight, dequantized(mod)), name

"""AWQ GEMM checkpoints: a fixture written to the published layout loads into PackedLinear with the dequantized
reference's logits. The layout follows GPTQModel's AwqGEMMQuantLinear (gptqmodel/nn_modules/qlinear/gemm_awq.py,
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)) and AutoAWQ's WQLinear_GEMM.from_linear pack loop, re-written here: for each
block of 8 columns, nibble i of the int32 holds column order_map[i]."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import tquant
from tests.interop.helpers import dequantized, edit_checkpoint, logits, packed_layers
from tests.tiny_models import tiny_model

ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_pack(values_kn: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's loop: values [R, N] -> int32 [R, N / 8], word col |= values[:, col * 8 + ORDER_MAP[i]] << 4i."""
    r, n = values_kn.shape
    out = torch.zeros(r, n // 8, dtype=torch.int64)
    for col in range(n // 8):
        for i in range(8):
            out[:, col] |= values_kn[:, col * 8 + ORDER_MAP[i]].to(torch.int64) << (4 * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def _fixture(path, group_size=32, seed=0, version="gemm"):
    model = tiny_model("llama", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    tensors, quantized = {}, set()
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        n, k = mod.weight.shape
        g = k // group_size
        codes = torch.randint(0, 16, (k, n), generator=gen)
        zeros = torch.randint(0, 16, (g, n), generator=gen)
        scales = (torch.rand(g, n, generator=gen) * 0.02 + 0.001).half().float()
        gi = torch.arange(k) // group_size
        with torch.no_grad():
            mod.weight.copy_(((codes - zeros[gi]) * scales[gi]).t())
        tensors |= {f"{name}.qweight": awq_pack(codes), f"{name}.qzeros": awq_pack(zeros), f"{name}.scales": scales}
        quantized.add(f"{name}.weight")
    for name, t in model.state_dict().items():
        if name not in quantized and name != "lm_head.weight":
            tensors[name] = t
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                     "version": version, "modules_to_not_convert": None}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return model


def test_awq_gemm_fixture_loads_with_the_reference_logits(tmp_path):
    reference = _fixture(str(tmp_path))
    loaded = tquant.load(str(tmp_path))
    layers = packed_layers(loaded)
    assert len(layers) == 14 and all(m.bits == 4 and m.group_size == 32 and m.perm is None for m in layers.values())
    for name, mod in layers.items():
        assert torch.equal(dequantized(mod), reference.get_submodule(name).weight), name
    assert torch.allclose(logits(loaded), logits(reference), atol=1e-5, rtol=0)


def test_awq_imports_export_to_gptq_and_compressed_tensors(tmp_path):
    _fixture(str(tmp_path / "awq"))
    loaded = tquant.load(str(tmp_path / "awq"))
    for fmt in ("gptq_v2", "compressed-tensors"):
        out = str(tmp_path / fmt)
        tquant.export(loaded, out, format="gptq" if fmt == "gptq_v2" else fmt, gptq_format="gptq_v2")
        again = tquant.load(out)
        for name, mod in packed_layers(loaded).items():
            assert torch.equal(dequantized(again.get_submodule(name)), dequantized(mod)), (fmt, name)


@pytest.mark.parametrize("edit,message", [
    (dict(version="gemv"), r"version: 'gemv': tquant imports AWQ's 'gemm' layout only"),
    (dict(bits=3), r"bits: 3: AWQ's GEMM layout is 4-bit"),
])
def test_foreign_awq_variants_are_refused(tmp_path, edit, message):
    _fixture(str(tmp_path))
    c = json.load(open(tmp_path / "config.json"))
    c["quantization_config"] |= edit
    json.dump(c, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=message):
        tquant.load(str(tmp_path))


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("config,tensors,message", [
    ({}, {f"{Q}.qzeros": None}, rf"{Q}\.qzeros: missing from the checkpoint \(expected shape \[3, 12\]\)"),
    ({}, {f"{Q}.qweight": torch.zeros(96, 11, dtype=torch.int32)}, rf"{Q}\.qweight: shape \[96, 11\], expected "
                                                                   r"\[96, 12\]"),
    ({}, {f"{Q}.scales": torch.ones(3, 96, dtype=torch.int32)}, rf"{Q}\.scales: dtype torch\.int32"),
    (dict(group_size=40), {}, rf"{Q}\.scales: group_size=40 does not divide in_features=96"),
    (dict(zero_point=False), {}, r"quantization_config\.zero_point: false: tquant imports AWQ with zero points only"),
])
def test_bad_awq_checkpoints_name_the_tensor(tmp_path, config, tensors, message):
    _fixture(str(tmp_path))
    edit_checkpoint(str(tmp_path), config, tensors)
    with pytest.raises(ValueError, match=message):
        tquant.load(str(tmp_path))


def test_autoawqs_quant_config_json_beside_config_json(tmp_path):
    """An AutoAWQ checkpoint whose config.json has no quantization_config, its settings in quant_config.json
    (AutoAWQ's keys: zero_point, q_group_size, w_bit, version "GEMM"): read as the same checkpoint."""
    _fixture(str(tmp_path / "inside"))
    legacy = tmp_path / "legacy"
    _fixture(str(legacy))
    config = json.load(open(legacy / "config.json"))
    del config["quantization_config"]
    json.dump(config, open(legacy / "config.json", "w"))
    json.dump({"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"},
              open(legacy / "quant_config.json", "w"))
    loaded = tquant.load(str(legacy))
    assert len(packed_layers(loaded)) == 14
    assert torch.equal(logits(loaded), logits(tquant.load(str(tmp_path / "inside"))))

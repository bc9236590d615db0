"""GPTQ checkpoints (quant_method gptq, v1 and v2): export and import round trips, and a fixture written to the
published layout.

The layout is taken from GPTQModel (ModelCloud/GPTQModel): its qlinear packers / unpackers (qweight int32
[K * bits / 32, N] packed along K, qzeros int32 [G, N * bits / 32] packed along N, 3-bit values crossing word
boundaries, g_idx int32 [K]) and gptqmodel/utils/model.py convert_gptq_v1_to_v2_format (v1 stores zero - 1). The
reference packer below follows AutoGPTQ / GPTQModel's per-word loop, written independently of tquant's packer."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import tquant
from tquant.formats.packing import unpack_codes
from tests.interop.helpers import dequantized, edit_checkpoint, give_perm, logits, packed_layers, quantized
from tests.tiny_models import tiny_model


def reference_pack_k(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's pack loop for 2 / 4 / 8 bits: word r of column n holds codes[r * epw + i, n] << (bits * i)."""
    k, n = codes_kn.shape
    epw = 32 // bits
    out = torch.zeros(k // epw, n, dtype=torch.int64)
    for i in range(epw):
        out |= codes_kn[i::epw].to(torch.int64) << (bits * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_export_matches_the_published_layout(tmp_path, fmt):
    model = quantized(bits=4, group_size=32, sym=True)
    tquant.export(model, str(tmp_path), format="gptq", gptq_format=fmt)
    qc = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert qc | {} == json.load(open(tmp_path / "quantize_config.json"))
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"], qc["checkpoint_format"]) == \
        ("gptq", 4, 32, False, True, fmt)
    t = load_file(tmp_path / "model.safetensors")
    for name, mod in packed_layers(model).items():
        codes = unpack_codes(mod.qweight, 4, mod.in_features)
        assert torch.equal(t[f"{name}.qweight"], reference_pack_k(codes, 4))
        zeros = mod.zeros.to(torch.int64) - (1 if fmt == "gptq" else 0)
        assert torch.equal(t[f"{name}.qzeros"], reference_pack_k(zeros.t().contiguous(), 4).t().contiguous())
        assert torch.equal(t[f"{name}.scales"], mod.scales)
        assert torch.equal(t[f"{name}.g_idx"], torch.arange(mod.in_features, dtype=torch.int32) // 32)
        assert t[f"{name}.g_idx"].dtype == torch.int32


ROUND_TRIPS = {
    "w4-g32-sym-v1": (dict(bits=4, group_size=32, sym=True), "gptq", False),
    "w4-g32-asym-v2": (dict(bits=4, group_size=32, sym=False), "gptq_v2", False),
    "w4-g32-act-order-v1": (dict(bits=4, group_size=32, sym=True), "gptq", True),
    "w4-g32-asym-act-order-v2": (dict(bits=4, group_size=32, sym=False), "gptq_v2", True),
    "w3-g32-asym-act-order-v2": (dict(bits=3, group_size=32, sym=False), "gptq_v2", True),
    "w8-channel-sym-v1": (dict(bits=8, group_size=-1, sym=True), "gptq", False),
    "w2-g32-sym-v1": (dict(bits=2, group_size=32, sym=True), "gptq", False),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip_is_bit_exact(tmp_path, case):
    opts, fmt, act_order = ROUND_TRIPS[case]
    model = quantized(**opts)
    if act_order:
        for i, name in enumerate(["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]):
            give_perm(model, name, seed=i)
    tquant.export(model, str(tmp_path / "a"), format="gptq", gptq_format=fmt)
    qc = json.load(open(tmp_path / "a" / "config.json"))["quantization_config"]
    assert qc["desc_act"] == act_order
    loaded = tquant.load(str(tmp_path / "a"))
    for name, mod in packed_layers(model).items():
        back = loaded.get_submodule(name)
        assert (back.bits, back.group_size) == (mod.bits, mod.group_size)
        assert torch.equal(dequantized(back), dequantized(mod)), name
        if mod.perm is None:  # same buffers; with a perm the order inside each group is GPTQ's (sorted)
            assert torch.equal(back.qweight, mod.qweight) and back.perm is None
        else:
            g = torch.arange(mod.in_features) // mod.group_size  # each group holds the same input channels
            for j in range(mod.in_features // mod.group_size):
                assert torch.equal(torch.sort(back.perm[g == j]).values, torch.sort(mod.perm[g == j]).values)
    out = logits(loaded)
    assert torch.equal(out, logits(model)) if not act_order else torch.allclose(out, logits(model), atol=1e-5)
    # and the imported model exports to the same files again
    tquant.export(loaded, str(tmp_path / "b"), format="gptq", gptq_format=fmt)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_v1_refuses_a_zero_point_of_zero(tmp_path):
    model = quantized(bits=4, group_size=32, sym=False)
    model.get_submodule("model.layers.1.mlp.up_proj").zeros[2, 5] = 0
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.zeros: a zero point of 0 cannot be "
                                         r"stored in GPTQ v1.*gptq_v2"):
        tquant.export(model, str(tmp_path), format="gptq", gptq_format="gptq")


def _fixture(path, *, bits=4, group_size=32, desc_act=True, fmt="gptq", seed=0):
    """A GPTQ checkpoint of the tiny Llama written with the reference packer, and the float model holding its
    dequantized weights (W[:, k] = (code - zero[g_idx[k]]) * scale[g_idx[k]])."""
    model = tiny_model("llama", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        n, k = mod.weight.shape
        g = k // group_size
        codes = torch.randint(0, 2**bits, (k, n), generator=gen)
        zeros = torch.randint(1, 2**bits, (g, n), generator=gen)  # >= 1: v1 can store them
        scales = torch.rand(g, n, generator=gen) * 0.02 + 0.001
        g_idx = (torch.randperm(k, generator=gen) % g).to(torch.int32) if desc_act else \
            torch.arange(k, dtype=torch.int32) // group_size
        gi = g_idx.long()
        with torch.no_grad():
            mod.weight.copy_(((codes - zeros[gi]) * scales[gi]).t())
        stored = zeros - (1 if fmt == "gptq" else 0)
        tensors |= {f"{name}.qweight": reference_pack_k(codes, bits),
                    f"{name}.qzeros": reference_pack_k(stored.t().contiguous(), bits).t().contiguous(),
                    f"{name}.scales": scales, f"{name}.g_idx": g_idx}
    for name, t in model.state_dict().items():
        if not any(name.startswith(p.rsplit(".", 1)[0] + ".") for p in tensors) and name != "lm_head.weight":
            tensors[name] = t
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                     "desc_act": desc_act, "sym": False, "checkpoint_format": fmt}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return model


@pytest.mark.parametrize("fmt,desc_act", [("gptq", True), ("gptq_v2", False)])
def test_published_layout_fixture_loads_with_the_reference_logits(tmp_path, fmt, desc_act):
    reference = _fixture(str(tmp_path), fmt=fmt, desc_act=desc_act)
    loaded = tquant.load(str(tmp_path))
    assert len(packed_layers(loaded)) == 14
    for name, mod in packed_layers(loaded).items():
        assert torch.equal(dequantized(mod), reference.get_submodule(name).weight), name
        assert (mod.perm is not None) == desc_act
    assert torch.allclose(logits(loaded), logits(reference), atol=1e-5, rtol=0)


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit,message", [
    (dict(tensors={f"{Q}.g_idx": None}), rf"{Q}\.g_idx: missing: desc_act=true needs"),
    (dict(config={"bits": 5}), r"bits=5: tquant has kernels for \[2, 3, 4, 8\]-bit weights only"),
    (dict(tensors={f"{Q}.qweight": torch.zeros(12, 95, dtype=torch.int32)}),
     rf"{Q}\.qweight: shape \[12, 95\], expected \[12, 96\]"),
    (dict(tensors={f"{Q}.scales": torch.zeros(3, 96, dtype=torch.int32)}), rf"{Q}\.scales: dtype torch\.int32"),
    (dict(tensors={f"{Q}.g_idx": torch.zeros(96, dtype=torch.int32)}),
     rf"{Q}\.g_idx: group 0 has 96 input channels, expected 32"),
    (dict(config={"checkpoint_format": "marlin"}), r"checkpoint_format: 'marlin'"),
    (dict(config={"quant_method": "bitsandbytes"}), r"quant_method='bitsandbytes'.*'compressed-tensors', 'gptq', 'awq'"),
])
def test_bad_checkpoints_name_the_tensor(tmp_path, edit, message):
    _fixture(str(tmp_path))
    edit_checkpoint(str(tmp_path), **edit)
    with pytest.raises(ValueError, match=message):
        tquant.load(str(tmp_path))


def test_autogptqs_quantize_config_json_beside_config_json(tmp_path):
    """An AutoGPTQ checkpoint of before quantization_config moved into config.json: quantize_config.json (no
    quant_method, no checkpoint_format: v1) beside a config.json without one, the weights in
    gptq_model-4bit-32g.safetensors; tquant.load reads it as the same checkpoint with the config inside."""
    _fixture(str(tmp_path / "inside"), desc_act=True)
    legacy = tmp_path / "legacy"
    _fixture(str(legacy), desc_act=True)
    config = json.load(open(legacy / "config.json"))
    qc = config.pop("quantization_config")
    json.dump(config, open(legacy / "config.json", "w"))
    json.dump({"bits": qc["bits"], "group_size": qc["group_size"], "damp_percent": 0.01, "desc_act": qc["desc_act"],
               "static_groups": False, "sym": qc["sym"], "true_sequential": True, "model_name_or_path": None,
               "model_file_base_name": "gptq_model-4bit-32g"}, open(legacy / "quantize_config.json", "w"))
    os.rename(legacy / "model.safetensors", legacy / "gptq_model-4bit-32g.safetensors")
    loaded = tquant.load(str(legacy))
    assert len(packed_layers(loaded)) == 14
    assert torch.equal(logits(loaded), logits(tquant.load(str(tmp_path / "inside"))))
    json.dump([qc], open(legacy / "quantize_config.json", "w"))
    with pytest.raises(ValueError, match=r"quantize_config\.json: expected a JSON object of quantization settings"):
        tquant.load(str(legacy))

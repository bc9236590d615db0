"""QuantizedLinear's registry: the module for each weight type (QuantizedWeight split on act_bits), the module for
each saved spec type, and from_spec(layer_spec()) giving back the same spec for every registered linear."""
import pytest
import torch

from tquant.formats.weights import BCQWeight, BitPlaneWeight, FP8Weight, QuantizedWeight
from tquant.modules import (ActQuantLinear, BCQLinear, BitPlaneLinear, FP8Linear, PackedEmbedding, PackedExperts, PackedLinear,
                            QuantizedLinear, QuipLinear, SpQRLinear, linear_module, module_for_spec, module_for_weight, spec_types)


def weight(act_bits=None):
    torch.manual_seed(0)
    qw = QuantizedWeight.from_rtn(torch.randn(32, 64), 8 if act_bits else 4, 64 if act_bits else 32, sym=bool(act_bits))
    qw.act_bits = act_bits
    return qw


def test_module_for_weight_splits_quantized_weight_on_act_bits():
    assert module_for_weight(weight()) is PackedLinear
    assert module_for_weight(weight(act_bits=8)) is ActQuantLinear
    qw = weight()
    assert module_for_weight(BitPlaneWeight(qw.codes, qw.scale, qw.zero, 4, 32)) is BitPlaneLinear  # before its base
    assert module_for_weight(BCQWeight.from_uniform(qw)) is BCQLinear
    assert module_for_weight(FP8Weight(torch.zeros(4, 8, dtype=torch.float8_e4m3fn), torch.ones(4))) is FP8Linear
    assert isinstance(linear_module(weight(act_bits=8), None, torch.float32), ActQuantLinear)
    with pytest.raises(TypeError, match="no quantized module"):
        module_for_weight(object())


def test_module_for_spec_knows_every_saved_type():
    expected = {"packed_linear": PackedLinear, "packed_embedding": PackedEmbedding, "act_quant_linear": ActQuantLinear,
                "quip_linear": QuipLinear, "bcq_linear": BCQLinear, "spqr_linear": SpQRLinear,
                "bitplane_linear": BitPlaneLinear, "packed_experts": PackedExperts, "fp8_linear": FP8Linear}
    assert set(spec_types()) == set(expected)
    assert all(module_for_spec({"type": t}) is cls for t, cls in expected.items())
    with pytest.raises(ValueError, match="unknown module type"):
        module_for_spec({"type": "nope"})


@pytest.mark.parametrize("mod", [
    PackedLinear(64, 32, bits=3, group_size=32, bias=True, has_perm=True),
    ActQuantLinear(64, 32, bits=4, act_bits=8, group_size=32, smooth=True, zero=True, perm=True),
    ActQuantLinear(64, 32, bits=8, act_bits=8, group_size=64, bias=True, static=True),
    QuipLinear(64, 32, bits=3, bias=True),
    BCQLinear(64, 32, planes=2, group_size=32, offset=True, has_perm=True),
    SpQRLinear(64, 32, bits=3, group_size=16, scale_bits=3, stat_group=16, outliers=5, has_perm=True, bias=True),
    BitPlaneLinear(64, 32, bits=3, act_bits=None, group_size=32, out_bits=8, out_group=16),
    FP8Linear(64, 32, static=True, bias=True),
    FP8Linear(64, 32, act_bits=None),
], ids=lambda m: type(m).__name__)
def test_from_spec_rebuilds_layer_spec(mod):
    spec = mod.layer_spec()
    assert isinstance(mod, QuantizedLinear) and spec["type"] == mod.spec_type
    assert list(spec)[1:] == list(mod.spec_fields)
    again = module_for_spec(spec).from_spec(spec, torch.float16)
    assert again.layer_spec() == spec and list(again.layer_spec()) == list(spec)
    assert {n: (b.shape, b.dtype) for n, b in again.named_buffers()} == \
        {n: (b.shape, b.dtype) for n, b in mod.named_buffers()}
    assert repr(again) == repr(mod)


def test_old_specs_without_later_fields_load():
    spec = ActQuantLinear(64, 32, bits=8, act_bits=8, group_size=64).layer_spec()
    del spec["zero"], spec["perm"]
    assert ActQuantLinear.from_spec(spec, torch.float16).layer_spec() == {**spec, "zero": False, "perm": False}
    spec = BitPlaneLinear(64, 32, bits=4, act_bits=8, group_size=32).layer_spec()
    del spec["out_bits"], spec["out_group"]
    assert BitPlaneLinear.from_spec(spec, torch.float16).out_bits is None

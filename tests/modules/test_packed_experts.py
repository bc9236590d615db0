"""PackedExperts against transformers' own experts module holding the same (de-quantized) weights: the forward
contract (hidden_states, top_k_index, top_k_weights), the Triton path against the torch reference, the spec round
trip and validation of damaged tensors."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from tquant.formats.weights import QuantizedWeight
from tquant.modules import PackedExperts, module_for_spec
from tests.kernel_device import DEVICE


def _experts(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    mod = MixtralExperts(cfg).to(dtype)
    with torch.no_grad():
        mod.gate_up_proj.normal_(0, 0.1)
        mod.down_proj.normal_(0, 0.1)
    return mod


def _quantized(mod, bits=4, group=32, perm=False):
    """(PackedExperts, the float module now holding the de-quantized weights)."""
    gu, dn = [], []
    for e in range(mod.num_experts):
        for param, out in ((mod.gate_up_proj, gu), (mod.down_proj, dn)):
            qw = QuantizedWeight.from_rtn(param[e], bits, group, sym=False)
            if perm:  # storage order reversed: codes in storage order, perm maps storage -> input channel
                p = torch.arange(param.shape[2] - 1, -1, -1, dtype=torch.int32)
                qw = QuantizedWeight.from_rtn(param[e][:, p], bits, group, sym=False)
                qw.perm = p
            with torch.no_grad():
                param[e] = qw.dequantize().to(param.dtype)
            out.append(qw)
    return PackedExperts.from_quantized(gu, dn, "silu", mod.gate_up_proj.dtype), mod


def _routing(t=12, e=4, k=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.softmax(torch.randn(t, k, generator=g), dim=-1)
    return index, weights


@pytest.mark.parametrize("perm", [False, True])
def test_forward_matches_transformers_experts_with_the_dequantized_weights(perm):
    packed, ref = _quantized(_experts(), perm=perm)
    x = torch.randn(12, 64)
    index, weights = _routing()
    with torch.no_grad():
        want = ref(x, index, weights)
        got = packed(x, index, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a slot marked dropped (index == num_experts, as transformers' expert-parallel paths mark it) adds nothing:
    # as a slot of weight 0
    dropped, zero = index.clone(), weights.clone()
    dropped[1, 1] = 4
    zero[1, 1] = 0
    with torch.no_grad():
        torch.testing.assert_close(packed(x, dropped, weights), packed(x, index, zero), rtol=0, atol=0)
    assert packed.gate_up_qweight.shape == (4, 64 // 8, 192) and packed.down_scales.shape == (4, 96 // 32, 64)


@pytest.mark.parametrize("perm", [False, True])
def test_triton_path_matches_the_reference(perm, monkeypatch):
    """The Triton path (two grouped launches, tquant.kernels.moe_matmul) against the per-expert torch path, with a
    dropped slot; it never launches the per-expert weight_only_matmul."""
    from tquant.kernels import weight_only_matmul as wom

    monkeypatch.setattr(wom, "weight_only_matmul", None)
    packed, _ = _quantized(_experts(), perm=perm)
    packed = packed.to(DEVICE)
    x = torch.randn(5, 64).to(DEVICE)
    index, weights = _routing(t=5)
    index[3, 0] = 4  # dropped (transformers' mark: num_experts)
    index, weights = index.to(DEVICE), weights.to(DEVICE)
    with torch.no_grad():
        packed.backend = "torch"
        ref = packed(x, index, weights)
        packed.backend = "triton"
        got = packed(x, index, weights)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_bf16_keeps_dtype():
    packed, ref = _quantized(_experts(torch.bfloat16))
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    index, weights = _routing(t=6)
    with torch.no_grad():
        got, want = packed(x, index, weights), ref(x, index, weights)
    assert got.dtype == torch.bfloat16 and packed.gate_up_scales.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_spec_round_trip_and_validation():
    packed, _ = _quantized(_experts(), perm=True)
    spec = packed.layer_spec()
    assert spec["type"] == "packed_experts" and spec["hidden_act"] == "silu" and spec["has_perm"] is True
    rebuilt = module_for_spec(spec).check_spec("layer", spec, torch.float32)
    assert isinstance(rebuilt, PackedExperts) and rebuilt.gate_up_perm.shape == (4, 64)
    packed.validate("layer")
    with pytest.raises(ValueError, match="layer: layer spec .*unknown keys"):
        PackedExperts.check_spec("layer", spec | {"extra": 1}, torch.float32)
    with pytest.raises(ValueError, match="hidden_act"):
        PackedExperts.check_spec("layer", spec | {"hidden_act": "no_such_act"}, torch.float32)
    with pytest.raises(ValueError, match="gate_up_group_size"):
        PackedExperts.check_spec("layer", spec | {"gate_up_group_size": 48}, torch.float32)
    packed.down_scales[2, 0, 5] = float("nan")
    with pytest.raises(ValueError, match=r"layer.down_scales: not finite"):
        packed.validate("layer")
    packed.down_scales[2, 0, 5] = 1.0
    packed.gate_up_perm[1, 0] = 3
    with pytest.raises(ValueError, match=r"layer.gate_up_perm\[1\]: not a permutation"):
        packed.validate("layer")


def test_refuses_mixed_weights():
    mod = _experts()
    gu = [QuantizedWeight.from_rtn(mod.gate_up_proj[e], 4, 32, True) for e in range(4)]
    dn = [QuantizedWeight.from_rtn(mod.down_proj[e], 8 if e == 3 else 4, 32, True) for e in range(4)]
    with pytest.raises(ValueError, match="differ in bits"):
        PackedExperts.from_quantized(gu, dn, "silu", torch.float32)

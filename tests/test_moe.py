"""Mixture-of-experts quantization through tquant.quantize on tiny random Mixtral / Qwen3-MoE / Qwen2-MoE (4 experts,
top-2, hidden 64; tests/tiny_models.py): every expert becomes part of a PackedExperts, each expert's codes are what
the method gives that expert's weight alone on the statistics of its routed tokens (or of all tokens: "all", the
min-token fallback), logits stay close to float, save -> tquant.load gives the same logits bit for bit, generate
runs, refusals name the model type and the method."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import tquant
import tquant.serialization
from tquant.api import make_method
from tquant.calib.experts import gated
from tquant.formats.packing import dequantize_packed, unpack_codes
from tquant.formats.weights import QuantizedWeight
from tquant.modules import PackedExperts, PackedLinear
from tests.kernel_device import DEVICE
from tests.tiny_models import tiny_model, token_batch

CALIB = token_batch(8, 64)  # 512 tokens: about 256 routed to each of 4 experts (top-2)
IDS = token_batch(2, 24, seed=5)


def _codes(packed: PackedExperts, proj: str, e: int) -> torch.Tensor:
    k = packed.hidden_dim if proj == "gate_up" else packed.intermediate_dim
    return unpack_codes(getattr(packed, f"{proj}_qweight")[e], packed.bits, k).t()  # [N, K] like QuantizedWeight


def _dequantized(packed: PackedExperts, proj: str, e: int) -> torch.Tensor:
    k = packed.hidden_dim if proj == "gate_up" else packed.intermediate_dim
    w = dequantize_packed(getattr(packed, f"{proj}_qweight")[e], getattr(packed, f"{proj}_scales")[e],
                          getattr(packed, f"{proj}_zeros")[e], packed.bits, getattr(packed, f"{proj}_group_size"), k)
    return w.t().to(getattr(packed, f"{proj}_scales").dtype)


def _stand_in(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device)
    lin.weight.data = w.clone()
    return lin


def _quantize_recording(arch, method, **options):
    """(model quantized on DEVICE with attention left float, so block 0's experts see the float model's inputs; the
    float weights of block 0's experts, on DEVICE; what block 0's experts were handed on each calibration batch, on
    DEVICE). The expected codes are computed on DEVICE too: the method's arithmetic on a GPU (cuBLAS's summation
    order in GPTQ's Hessian; RTN's scale, a division by the grid's Python int that CUDA computes as a multiplication
    by its reciprocal) differs from the CPU's in the last bits, which can move a code by one."""
    model = tiny_model(arch)
    experts = model.model.layers[0].mlp.experts
    float_gu, float_dn = (w.detach().to(DEVICE, copy=True) for w in (experts.gate_up_proj, experts.down_proj))
    calls = []
    experts.register_forward_pre_hook(lambda m, a: calls.append((a[0].detach().clone(), a[1].clone())))
    tquant.quantize(model, method, calib=CALIB, batch_size=4, progress=False, skip=["*.self_attn.*"], device=DEVICE,
                    **options)
    n_batches = CALIB.shape[0] // 4
    return model, float_gu, float_dn, calls[1:1 + n_batches]  # calls[0]: the driver's look at the call order


def _expected(method, float_w, batches):
    """The method's weight of one expert projection quantized alone on those input batches."""
    lin = _stand_in(float_w)
    state = method.new_state("expert", lin)
    for x in batches:
        state.add_batch(x)
    return method.quantize(state, lin, "expert")


def _check_block0(model, method_name, float_gu, float_dn, captured, all_tokens, **options):
    method = make_method(method_name, **options)
    packed = model.model.layers[0].mlp.experts
    for e in range(packed.num_experts):
        xs = [x if e in all_tokens else x[(idx == e).any(-1)] for x, idx in captured]
        xs = [x for x in xs if x.shape[0]]
        want = _expected(method, float_gu[e], xs)
        assert torch.equal(_codes(packed, "gate_up", e), want.codes.cpu()), f"expert {e} gate_up"
        gate_up = _dequantized(packed, "gate_up", e).to(DEVICE)
        hs = [gated(packed, x, gate_up) for x in xs]  # through the quantized gate_up
        want = _expected(method, float_dn[e], hs)
        assert torch.equal(_codes(packed, "down", e), want.codes.cpu()), f"expert {e} down"


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("method, options, bound", [("rtn", dict(bits=8, group_size=32), 0.02),
                                                    ("gptq", dict(bits=4, group_size=32), 0.35)])
def test_every_expert_quantized_saved_and_loaded(arch, method, options, bound, tmp_path):
    model = tiny_model(arch)
    with torch.no_grad():
        fp = model(IDS).logits
    tquant.quantize(model, method, calib=None if method == "rtn" else CALIB, batch_size=4, progress=False, **options)
    for layer in model.model.layers:
        assert isinstance(layer.mlp.experts, PackedExperts) and layer.mlp.experts.bits == options["bits"]
        assert isinstance(layer.self_attn.q_proj, PackedLinear)
        assert isinstance(layer.mlp.gate.weight, nn.Parameter)  # the router stays in float
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]
    layers = model.config.quantization_config["layers"]
    assert layers["model.layers.1.mlp.experts"]["type"] == "packed_experts"
    with torch.no_grad():
        out = model(IDS).logits
    err = ((out - fp).norm() / fp.norm()).item()
    assert err < bound, f"{arch} {method}: logits {err:.3f} away from float"
    if method == "gptq":  # GPTQ's experts beat round-to-nearest at the same grid
        rtn = tiny_model(arch)
        tquant.quantize(rtn, "rtn", progress=False, **options)
        with torch.no_grad():
            assert err < ((rtn(IDS).logits - fp).norm() / fp.norm()).item()
    tquant.save(model, str(tmp_path / "q"))
    loaded = tquant.load(str(tmp_path / "q"))
    assert isinstance(loaded.model.layers[0].mlp.experts, PackedExperts)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, out)
    gen = loaded.generate(IDS[:1, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 12)


def test_export_refuses_experts_by_name(tmp_path):
    """No engine format holds PackedExperts: the export names the layer and the module instead of writing buffers
    nobody reads."""
    model = tiny_model("mixtral")
    tquant.quantize(model, "rtn", bits=4, group_size=32, progress=False)
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts as PackedExperts, mixture-of-experts"):
            tquant.export(model, str(tmp_path / fmt), format=fmt)
        assert not (tmp_path / fmt / "config.json").exists()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_each_experts_codes_are_the_method_on_its_routed_tokens(method):
    options = dict(bits=4, group_size=32)
    model, float_gu, float_dn, captured = _quantize_recording("mixtral", method, moe_min_tokens=1, **options)
    _check_block0(model, method, float_gu, float_dn, captured, all_tokens=(), **options)
    if method == "rtn":  # data-free: no passes, no token counts
        assert not captured and "calibration" not in model.config.quantization_config["layers"][
            "model.layers.0.mlp.experts"]
        return
    calibration = model.config.quantization_config["layers"]["model.layers.0.mlp.experts"]["calibration"]
    counts = [int(sum((idx == e).any(-1).sum() for _, idx in captured)) for e in range(4)]
    assert calibration == {"mode": "routed", "min_tokens": 1, "routed_tokens": counts, "on_all_tokens": []}
    assert sum(counts) == 2 * CALIB.numel()  # top-2: each token reaches two experts


def test_all_mode_calibrates_every_expert_on_all_tokens(caplog):
    options = dict(bits=4, group_size=32)
    with caplog.at_level(logging.INFO, logger="tquant"):
        model, float_gu, float_dn, captured = _quantize_recording("qwen3_moe", "gptq", moe_calibration="all", **options)
    _check_block0(model, "gptq", float_gu, float_dn, captured, all_tokens=range(4), **options)
    assert "layer model.layers.0.mlp.experts: moe_calibration='all': every expert calibrated on all tokens" \
        in caplog.text


def test_experts_with_too_few_tokens_fall_back_to_all_tokens_and_are_logged(caplog):
    options = dict(bits=4, group_size=32)
    probe = tiny_model("mixtral")
    seen = []
    probe.model.layers[0].mlp.experts.register_forward_pre_hook(lambda m, a: seen.append(a[1]))
    with torch.no_grad():
        probe(CALIB)
    counts = [int((seen[0] == e).any(-1).sum()) for e in range(4)]
    threshold = sorted(counts)[2]  # the two least-routed experts fall below it
    low = sorted(e for e in range(4) if counts[e] < threshold)
    assert len(low) == 2
    with caplog.at_level(logging.INFO, logger="tquant"):
        model, float_gu, float_dn, captured = _quantize_recording("mixtral", "gptq", moe_min_tokens=threshold,
                                                                  **options)
    _check_block0(model, "gptq", float_gu, float_dn, captured, all_tokens=low, **options)
    line = (f"layer model.layers.0.mlp.experts: experts {low[0]}, {low[1]} got {counts[low[0]]} and {counts[low[1]]} "
            f"tokens, below {threshold}: calibrated on all tokens")
    assert line in caplog.text
    spec = model.config.quantization_config["layers"]["model.layers.0.mlp.experts"]
    assert spec["calibration"]["on_all_tokens"] == low and spec["calibration"]["routed_tokens"] == counts


def test_default_min_tokens_is_twice_the_widest_input(caplog):
    model = tiny_model("mixtral")  # hidden 64, intermediate 128: 256 tokens
    with caplog.at_level(logging.INFO, logger="tquant"):
        tquant.quantize(model, "gptq", bits=4, group_size=32, calib=token_batch(4, 32), batch_size=4, progress=False)
    # 128 tokens, 256 routed slots over 4 experts: every expert is below 256
    spec = model.config.quantization_config["layers"]["model.layers.0.mlp.experts"]["calibration"]
    assert spec["min_tokens"] == 256 and spec["on_all_tokens"] == [0, 1, 2, 3]
    assert "experts 0, 1, 2, 3 got" in caplog.text and "below 256: calibrated on all tokens" in caplog.text


def test_shared_experts_are_linears_and_gates_stay_float():
    model = tiny_model("qwen2_moe")
    with torch.no_grad():
        fp = model(IDS).logits
    tquant.quantize(model, "gptq", bits=8, group_size=32, calib=CALIB, batch_size=4, progress=False)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.experts, PackedExperts)
    assert all(isinstance(getattr(mlp.shared_expert, n), PackedLinear) for n in ("gate_proj", "up_proj", "down_proj"))
    assert type(mlp.shared_expert_gate) is nn.Linear and isinstance(mlp.gate.weight, nn.Parameter)
    assert "model.layers.0.mlp.shared_expert_gate" not in model.config.quantization_config["layers"]
    with torch.no_grad():
        assert ((model(IDS).logits - fp).norm() / fp.norm()).item() < 0.02


@pytest.mark.parametrize("method, why", [("smoothquant", "block- or model-level steps"),
                                         ("spqr", "SpQRWeight"), ("bcq", "BCQWeight")])
def test_methods_that_cannot_quantize_experts_are_refused(method, why):
    model = tiny_model("qwen3_moe")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"model type 'qwen3_moe' is not supported by the weight method "
                                         rf"'{method}' on its mixture-of-experts experts.*{why}"):
        tquant.quantize(model, method, calib=CALIB, batch_size=4, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-done


def test_skipped_experts_stay_float():
    model = tiny_model("mixtral")
    tquant.quantize(model, "rtn", bits=4, group_size=32, skip=["*.experts"], progress=False)
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert isinstance(model.model.layers[0].self_attn.o_proj, PackedLinear)


def test_bad_moe_options():
    for bad in (dict(moe_calibration="some"), dict(moe_min_tokens=0), dict(moe_min_tokens=2.5)):
        with pytest.raises(ValueError, match="moe_"):
            tquant.quantize(tiny_model("mixtral"), "rtn", bits=4, group_size=32, progress=False, **bad)


def test_an_unannotated_methods_other_weights_are_refused_at_the_expert(monkeypatch):
    """A method whose quantize carries no return annotation passes experts_refusal; the weight it makes is checked
    as it comes."""
    from tquant.methods.rtn import RTN

    def act_quantized(self, state, linear, name):
        qw = QuantizedWeight.from_rtn(linear.weight, self.bits, 32, True)
        qw.act_bits = 8
        return qw

    monkeypatch.setattr(RTN, "quantize", act_quantized)
    with pytest.raises(ValueError, match=r"made a QuantizedWeight for expert projection .*experts\.0\.gate_up_proj "
                                         r"\(act_bits=8\)"):
        tquant.quantize(tiny_model("mixtral"), "rtn", bits=4, group_size=32, progress=False)


def test_other_fused_experts_layouts_are_refused_naming_the_model_type():
    """GPT-OSS keeps its experts transposed, interleaved and with biases: not what PackedExperts computes."""
    import transformers

    from tests.tiny_models import VOCAB

    cfg = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, max_position_embeddings=256,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(ValueError, match=r"model type 'gpt_oss' is not supported by tquant's weight methods yet: its "
                                         r"mixture-of-experts experts \(model.layers.0.mlp.experts, fused 3-D "
                                         r"parameters\) use a layout .*is_transposed=True"):
        tquant.quantize(model, "rtn", bits=4, group_size=32, progress=False)


def test_not_true_sequential_calibrates_down_through_the_float_gate_up():
    options = dict(bits=4, group_size=32)
    model, float_gu, float_dn, captured = _quantize_recording("mixtral", "gptq", moe_min_tokens=1,
                                                              true_sequential=False, **options)
    method = make_method("gptq", **options)
    packed = model.model.layers[0].mlp.experts
    for e in range(packed.num_experts):
        xs = [x[(idx == e).any(-1)] for x, idx in captured]
        assert torch.equal(_codes(packed, "gate_up", e), _expected(method, float_gu[e], xs).codes.cpu())
        hs = [gated(packed, x, float_gu[e]) for x in xs]
        assert torch.equal(_codes(packed, "down", e), _expected(method, float_dn[e], hs).codes.cpu())


def test_bf16_model_keeps_its_dtype(tmp_path):
    model = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    with torch.no_grad():
        fp = model(IDS).logits.float()
    tquant.quantize(model, "gptq", bits=8, group_size=32, calib=CALIB, batch_size=4, progress=False)
    packed = model.model.layers[0].mlp.experts
    assert packed.gate_up_scales.dtype == packed.down_zeros.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(IDS).logits
    assert out.dtype == torch.bfloat16 and ((out.float() - fp).norm() / fp.norm()).item() < 0.05
    tquant.save(model, str(tmp_path / "q"))
    loaded = tquant.load(str(tmp_path / "q"))
    assert loaded.model.layers[0].mlp.experts.down_scales.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, out)

"""tquant.export(..., check_tp=...) / tquant export --check-tp: each layer split over each tensor-parallel degree as
vLLM splits it, checked against the rules tquant.interop.tp cites from vLLM's source (group size, int32 packing
along K and N, Marlin's 64 / 128 tiles on the fused layer, the int8 GEMM's 16, attention heads), and fused q/k/v and
gate/up with one scheme; a failing degree names the layer and the size and nothing is written."""
import logging
import os

import pytest
import torch
import transformers

import tquant
from tquant.cli import main
from tquant.interop import _quantized_layers, tp
from tests.tiny_models import VOCAB, tiny_model, token_batch


def marlin_llama(bits=4, group_size=64, **opts):
    """A Llama whose q/k/v, o, gate/up and down take Marlin's tiles at tp 1 and 2: hidden 256 (4 heads of 64, 2 KV
    heads), intermediate 512."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    tquant.quantize(model, "rtn", bits=bits, group_size=group_size, progress=False, **opts)
    return model


def problems(model, degrees, fmt="compressed-tensors"):
    return tp.check(model, _quantized_layers(model, fmt), degrees, fmt)


def has(found: list[str], text: str) -> bool:
    return any(text in p for p in found)


@pytest.fixture(scope="module")
def w4g64():
    return marlin_llama()


def test_passing_degrees_export_and_are_reported(w4g64, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tquant"):
        tquant.export(w4g64, str(tmp_path / "out"), format="compressed-tensors", check_tp=(1, 2))
    assert "tensor-parallel check (vLLM's splits and kernels): tp 1, 2 pass" in caplog.text
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")
    tquant.export(w4g64, str(tmp_path / "gptq"), format="gptq", gptq_format="gptq_v2", check_tp="2")


def test_a_failing_degree_names_the_layer_and_size_and_writes_nothing(w4g64, tmp_path):
    with pytest.raises(ValueError) as err:
        tquant.export(w4g64, str(tmp_path / "out"), format="compressed-tensors", check_tp=(2, 4, 8))
    text = str(err.value)
    assert "tensor-parallel check failed (tp 2 pass)" in text
    # tp 4: o_proj's input shard 256 / 4 = 64 is below Marlin's thread_k tile
    assert ("tp 4: model.layers.0.self_attn.o_proj: row-parallel: input shard 64 = 256 / 4 is not a multiple of "
            "Marlin's min_thread_k 128") in text
    # tp 8: 4 attention heads do not split over 8 GPUs
    assert "tp 8: model.layers.0.self_attn.q_proj: num_attention_heads 4 does not split over tp 8" in text
    assert not os.path.exists(tmp_path / "out")


def test_row_parallel_shard_inside_a_group(tmp_path):
    model = marlin_llama(group_size=128)
    found = problems(model, (4,))[4]
    assert has(found, "model.layers.0.self_attn.o_proj: row-parallel: input shard 64 = 256 / 4 is not a multiple of "
                      "the group size 128: the split falls inside a group")


def test_column_parallel_marlin_thread_n_on_the_fused_qkv():
    """k / v shards alone (64 / 2 = 32 columns) are below Marlin's 64, yet vLLM tiles the fused q+k+v on each GPU:
    the check adds them up. One KV head at tp 4 is replicated (vLLM's num_kv_head_replicas)."""
    model = marlin_llama()
    assert not [p for p in problems(model, (4,))[4] if "k_proj" in p or "q_proj" in p]
    model = tiny_model("llama")  # hidden 96: q+k+v = 96 + 32 + 32 = 160 columns, not a multiple of 64
    tquant.quantize(model, "rtn", bits=4, group_size=32, progress=False)
    found = problems(model, (1,))[1]
    assert has(found, "model.layers.0.self_attn.q_proj: column-parallel: output shard 160 (the fused q_proj + k_proj + "
                      "v_proj of model.layers.0.self_attn on one GPU) is not a multiple of Marlin's min_thread_n 64")


def test_marlin_rules_only_where_vllm_runs_marlin():
    """An asymmetric GPTQ checkpoint runs vLLM's plain GPTQ kernel (gptq_marlin takes symmetric 4 / 8-bit only);
    compressed-tensors runs 4-bit with zero points on Marlin too."""
    model = tiny_model("llama")  # q+k+v = 160 columns
    tquant.quantize(model, "rtn", bits=4, group_size=32, sym=False, progress=False)
    assert has(problems(model, (1,))[1], "min_thread_n 64")
    assert not has(problems(model, (1,), "gptq")[1], "Marlin")
    model = tiny_model("llama")
    tquant.quantize(model, "rtn", bits=8, group_size=32, sym=False, progress=False)
    assert not has(problems(model, (1,))[1], "Marlin")  # 8-bit with zero points: no Marlin type (uint8 + zp)


def test_packing_along_k_and_n():
    model = tiny_model("llama")  # hidden 96, heads 6, KV heads 2 (head_dim 16)
    tquant.quantize(model, "rtn", bits=2, group_size=96, progress=False)  # per channel: no group to split
    found = problems(model, (2, 3, 6))
    # 2-bit: 16 codes a word along K; o_proj's 96 / 6 = 16 fills one, down_proj's 192 / 6 = 32 two, 96 / 3 = 32 two
    assert not [p for p in found[6] if "words" in p]
    model = tiny_model("llama")
    tquant.quantize(model, "rtn", bits=3, group_size=96, sym=True, progress=False)
    found = problems(model, (2,), "gptq")[2]
    # 3-bit: 32 codes in 3 words; o_proj's 48 input channels leave a word part-filled
    assert has(found, "model.layers.0.self_attn.o_proj: row-parallel: input shard 48 = 96 / 2 does not fill whole "
                      "int32 words at 3 bits")
    # GPTQ packs zero points along N: Fraction(32, 3).numerator = 32 columns; k_proj keeps one KV head of 16
    assert has(found, "model.layers.0.self_attn.k_proj: column-parallel: output shard 16 is not a multiple of 32, the "
                      "zero points' packing along N at 3 bits")
    # compressed-tensors keeps no zero points for a symmetric layer: no packing along N
    assert not [p for p in problems(model, (2,))[2] if "packing along N" in p]


def test_fused_layers_need_one_scheme(tmp_path):
    model = tiny_model("llama")
    tquant.quantize(model, "rtn", bits=4, group_size=32, skip=["*.k_proj"], progress=False)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn: vLLM fuses q_proj / k_proj / v_proj into one "
                                         r"layer with one quantization scheme, these differ \(.*k_proj: float \(not "
                                         r"quantized\)"):
        tquant.export(model, str(tmp_path / "out"), check_tp=(1,))


def test_w8a8_shards_take_the_int8_gemm():
    model = tiny_model("llama", num_key_value_heads=6, intermediate_size=208)  # 208 = 13 x 16
    tquant.quantize(model, "smoothquant", calib=token_batch(4), progress=False)
    found = problems(model, (1, 2))
    assert not found[1]
    assert has(found[2], "model.layers.0.mlp.down_proj: row-parallel: input shard 104 = 208 / 2 is not a multiple of "
                         "16: vLLM's CUTLASS int8 GEMM")
    assert not has(found[2], "self_attn")  # 96 / 2 = 48 and the fused q+k+v 144: multiples of 16


def test_degrees_are_checked():
    for bad in ("", "two", "0,2", (-1,)):
        with pytest.raises(ValueError, match="expected tensor-parallel degrees"):
            tp.parse_degrees(bad)
    assert tp.parse_degrees("8, 2,4,2") == (2, 4, 8)


def test_cli_check_tp(w4g64, tmp_path, capsys):
    tquant.save(w4g64, str(tmp_path / "saved"))
    main(["export", str(tmp_path / "saved"), str(tmp_path / "ok"), "--format", "compressed-tensors",
          "--check-tp", "1,2"])
    assert "(tensor-parallel check: tp 1, 2 pass)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"tquant export: tensor-parallel check failed \(tp 2 pass\)"):
        main(["export", str(tmp_path / "saved"), str(tmp_path / "bad"), "--format", "gptq", "--check-tp", "2,4"])
    assert not os.path.exists(tmp_path / "bad")
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "saved"), str(tmp_path / "bad"), "--format", "gptq", "--check-tp", "two"])
    assert "expected tensor-parallel degrees" in capsys.readouterr().err


def test_phi3_fused_projections_and_head_counts():
    """Phi-3 stores q/k/v as one qkv_proj (6 heads + 2 x 2 KV heads of 16) and gate/up as one gate_up_proj; a head
    count that does not divide is reported once for the model."""
    model = tiny_model("phi3")
    tquant.quantize(model, "rtn", bits=4, group_size=32, progress=False)
    found = problems(model, (2, 3))
    assert has(found[2], "model.layers.0.self_attn.qkv_proj: column-parallel: output shard 80 is not a multiple of "
                         "Marlin's min_thread_n 64")  # (3 + 1 + 1) x 16 on each GPU
    # gate_up_proj: 2 x 192 / 2 = 192 columns on each GPU, a multiple of 64; its unsplit input 96 is not of 128
    assert has(found[2], "model.layers.0.mlp.gate_up_proj: column-parallel: input size 96 is not a multiple of "
                         "Marlin's min_thread_k 128")
    assert not has(found[2], "gate_up_proj: column-parallel: output")
    heads = [p for p in found[3] if "num_key_value_heads 2 and tp 3" in p]
    assert len(heads) == 1 and heads[0].startswith("model.layers.0.self_attn.qkv_proj: ")

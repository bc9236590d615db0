"""Streaming quantization of mixture-of-experts checkpoints (issue 28): Mixtral and Qwen3-MoE store each expert's
projections apart (model.layers.L.block_sparse_moe.experts.e.w1.weight, ...mlp.experts.e.gate_proj.weight) and
transformers fuses them on loading into 3-D expert tensors (mlp.experts.gate_up_proj [E, 2I, H], down_proj
[E, H, I]); tquant.streaming.source reads each block through transformers' own rules (tquant/streaming/conversion.py).
The streamed checkpoint equals the in-memory tquant.quantize + tquant.save of the same model and calibration tensor
for tensor (tests/test_streaming.py's check), loads and generates; a layout transformers' rules cannot make into the
model is refused, naming the tensor and the model type."""
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import tquant
from tests.test_streaming import (
    BLOCKS,
    CALIB,
    OPTIONS,
    SHARD,
    Stop,
    assert_same_checkpoint,
    read_json,
)
from tests.tiny_models import byte_tokenizer, tiny_model, token_batch
from tquant.config import tquant_config
from tquant.models import find_blocks, load_model
from tquant.serialization import INDEX
from tquant.streaming.progress import RECORD, WORK
from tquant.streaming.source import Source

MOE = ("mixtral", "qwen3_moe")


def _save_moe(path, arch, seed=0, **overrides):
    """A tiny random MoE model of BLOCKS blocks in 50 KB shards (an expert's tensors spread over several), with a
    tokenizer."""
    tiny_model(arch, seed=seed, num_hidden_layers=BLOCKS, **overrides).save_pretrained(path, max_shard_size="50KB")
    byte_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return {arch: _save_moe(tmp_path_factory.mktemp(arch), arch) for arch in MOE}


@pytest.fixture(scope="module")
def in_memory(sources, tmp_path_factory):
    """in_memory(arch, method): the folder tquant.quantize + tquant.save make of that source, made once."""
    made = {}

    def make(arch, method):
        if (arch, method) not in made:
            model, _ = load_model(sources[arch])
            tquant.quantize(model, method, calib=CALIB, **OPTIONS)
            tquant_config(model.config)["base_model"] = sources[arch]
            made[arch, method] = str(tmp_path_factory.mktemp(f"{arch}-{method}"))
            tquant.save(model, made[arch, method], max_shard_size=SHARD)
        return made[arch, method]

    return make


def stored_names(folder):
    return list(read_json(folder, INDEX)["weight_map"])


def test_the_checkpoint_stores_experts_apart(sources):
    """What the tests below stand on: the saved files hold one tensor per expert projection, the model fused ones."""
    names = stored_names(sources["mixtral"])
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names
    assert not any("gate_up_proj" in n for n in names)
    assert "model.layers.0.mlp.experts.0.up_proj.weight" in stored_names(sources["qwen3_moe"])


@pytest.mark.parametrize("arch", MOE)
def test_blocks_read_equal_from_pretrained(sources, arch):
    """The skeleton and every block read by the Source equal transformers' from_pretrained tensor for tensor."""
    expected = transformers.AutoModelForCausalLM.from_pretrained(sources[arch]).state_dict()
    source = Source(sources[arch])
    model = source.skeleton()
    name, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        source.load(model, block, f"{name}.{i}.")
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


def test_experts_fuse_in_natural_order(tmp_path):
    """Twelve experts: expert 10 is stacked after expert 9 (transformers' dot_natural_key), not after expert 1."""
    src = str(tmp_path / "m")
    tiny_model("mixtral", num_hidden_layers=1, num_local_experts=12).save_pretrained(src)
    stored = load_file(os.path.join(src, "model.safetensors"))
    source = Source(src)
    model = source.skeleton()
    source.load(model, model.model.layers[0], "model.layers.0.")
    down = model.model.layers[0].mlp.experts.down_proj
    for e in range(12):
        assert torch.equal(down[e], stored[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"]), e


@pytest.mark.parametrize("arch, method", [(a, m) for a in MOE for m in ("rtn", "gptq")])
def test_moe_streaming_equals_in_memory(sources, in_memory, tmp_path, arch, method):
    out = str(tmp_path / "q")
    tquant.quantize_to_disk(sources[arch], out, method, calib=CALIB, max_shard_size=SHARD, **OPTIONS)
    assert_same_checkpoint(in_memory(arch, method), out)
    loaded = tquant.load(out)
    assert any(isinstance(m, tquant.modules.QuantizedLinear) for m in loaded.modules())
    gen = loaded.generate(token_batch(1, 8, seed=5), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 12)


def test_a_stopped_moe_run_resumes(sources, in_memory, tmp_path):
    out = str(tmp_path / "q")

    def stop_after_block_1(i, n):
        if i == 1:
            raise Stop

    with pytest.raises(Stop):
        tquant.quantize_to_disk(sources["mixtral"], out, "gptq", calib=CALIB, on_block=stop_after_block_1, **OPTIONS)
    assert len(read_json(out, WORK, RECORD)["blocks"]) == 2
    tquant.quantize_to_disk(sources["mixtral"], out, "gptq", calib=CALIB, resume=True, **OPTIONS)
    assert_same_checkpoint(in_memory("mixtral", "gptq"), out)


def _rewrite(src, dst, change):
    """The checkpoint in src written to dst as one model.safetensors, its tensors {name: tensor} passed through
    change."""
    tensors = {}
    for f in sorted(set(read_json(src, INDEX)["weight_map"].values())):
        tensors |= load_file(os.path.join(src, f))
    os.makedirs(dst)
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and f != INDEX:
            with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
                b.write(a.read())
    save_file(change(tensors), os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


EXPERT = "model.layers.0.block_sparse_moe.experts.{}.{}.weight"


@pytest.mark.parametrize("change, error", [
    (lambda t: {k.replace(".block_sparse_moe.gate.", ".block_sparse_moe.router."): v for k, v in t.items()},
     (r"lack tensor 'model.layers.0.mlp.gate.weight', which the model built from its config.json has \(model type "
      r"'mixtral'\)")),
    (lambda t: {k: v for k, v in t.items() if not k.startswith("model.layers.0.block_sparse_moe.experts.3.")},
     (r"tensor 'model.layers.0.mlp.experts.gate_up_proj' is \(3, 256, 64\) as made of the stored "
      r"model.layers.0.block_sparse_moe.experts.0.w1.weight, .* expects \(4, 256, 64\)")),
    (lambda t: {k: v for k, v in t.items() if k != EXPERT.format(2, "w3")},
     (r"transformers' loading rules for model type 'mixtral' cannot make tensor "
      r"'model.layers.0.mlp.experts.gate_up_proj'")),
], ids=["renamed-router", "expert-missing", "w3-missing"])
def test_a_layout_the_rules_cannot_make_is_refused(sources, tmp_path, change, error):
    src = _rewrite(sources["mixtral"], str(tmp_path / "m"), change)
    out = str(tmp_path / "q")
    with pytest.raises(ValueError, match=error):
        tquant.quantize_to_disk(src, out, "rtn", **OPTIONS)
    assert not os.path.exists(out)

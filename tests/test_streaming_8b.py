"""benchmarks/streaming_8b.py (issue 28's 8B streaming GPTQ measurement) at a tiny scale on the CPU: the random model
it writes is what transformers loads, "one block's needs" counts what a block holds, and the script runs end to end
across two calls (the first stopped after a block, the second resuming), leaving a checkpoint tquant.load reads. The
GPU run is the measurement."""
import json
import os

import pytest
import torch
import transformers
from torch import nn

import tquant
from benchmarks import streaming_8b
from tquant.serialization import INDEX

TINY = ["--layers", "2", "--hidden", "256", "--intermediate", "512", "--heads", "4", "--kv-heads", "2", "--vocab",
        "1000", "--samples", "8", "--seqlen", "64", "--device", "cpu", "--shard-size", "300KB"]


def test_one_block_needs_counts_the_blocks_weights_hessians_and_states():
    """Against the block transformers builds for the 8B shape: its parameters in bf16, one fp32 Hessian per distinct
    linear input (q/k/v share the block's input, gate/up the MLP's), the hidden states in and out in bf16."""
    a = streaming_8b.parse(["--folder", "unused"])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(streaming_8b.llama_config(a))
    block = model.model.layers[0]
    linears = dict(block.named_modules())
    inputs = [linears[n].in_features for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")]
    needs = streaming_8b.block_needs(a)
    assert needs["weights_bf16_gib"] * 2**30 == 2 * sum(p.numel() for p in block.parameters())
    assert needs["hessians_fp32_gib"] * 2**30 == 4 * sum(k * k for k in inputs)
    assert needs["hidden_states_in_out_gib"] * 2**30 == 2 * 2 * 128 * 2048 * 4096
    assert round(needs["total_gib"], 2) == 5.36  # the docstring's figure


def test_the_random_model_loads_in_transformers(tmp_path):
    folder = str(tmp_path / "m")
    a = streaming_8b.parse(["--folder", folder, *TINY])
    assert streaming_8b.write_model(a) > 0
    assert streaming_8b.write_model(a) is None  # there: skipped
    with open(os.path.join(folder, INDEX)) as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) > 2
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16 and len(model.model.layers) == 2
    assert torch.equal(model.model.norm.weight, torch.ones(256, dtype=torch.bfloat16))
    q = model.model.layers[1].self_attn.q_proj.weight.float()
    assert abs(q.std().item() - 0.02) < 0.002 and not torch.equal(q, model.model.layers[0].self_attn.q_proj.weight)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.data_ptr() != \
        model.model.embed_tokens.weight.data_ptr()  # untied, as Llama-3-8B


@pytest.mark.slow
def test_two_calls_write_quantize_stop_and_resume(tmp_path):
    folder, record = str(tmp_path / "m"), str(tmp_path / "record.json")
    args = ["--folder", folder, *TINY, "--max-blocks", "1", "--json", record]
    first = streaming_8b.main(args)["calls"]
    assert len(first) == 1 and first[0]["blocks"] == [0] and first[0]["finished"] is False
    assert first[0]["write_model_s"] > 0 and first[0]["peak_rss_gib"] > 0
    done = streaming_8b.main(args)
    second = done["calls"][1]
    assert second["resumed"] and second["blocks"] == [1] and second["finished"] and "write_model_s" not in second
    assert done["total"]["blocks_done"] == 2 and done["total"]["finished"]
    with open(record) as f:
        assert json.load(f) == done
    model = tquant.load(folder + "-gptq-w4g128")
    assert model(torch.randint(0, 1000, (1, 8))).logits.isfinite().all()

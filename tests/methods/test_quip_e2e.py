"""QuIP#'s end-to-end fine-tuning (e2e_epochs): it lowers the KL to the float model on held-out tokens, leaves the
codes and the input embedding alone and tunes the signs, norms and an untied head, keeps every stored dtype, saves
and reloads bit-identically, refuses bad options and streaming; all of it in both evaluation orders (e2e_dense: the
rotated-back weight, the default, or the Hadamard transforms), which tune to the same parameters."""
import contextlib

import pytest
import torch

import tquant
from tquant.api import make_method
from tquant.modules import QuipLinear
from tests.tiny_models import byte_tokenizer, tiny_model, token_batch

CALIB = token_batch(64, 32)  # 2048 tokens: fewer (256) over-fit the 3488 tuned values and raise the held-out KL
HELD_OUT = token_batch(8, 32, seed=7)
E2E = dict(e2e_epochs=2, e2e_topk=256, e2e_lr=1e-3, e2e_susv_lr=1e-3)


def quantized(arch="llama", calib=CALIB, dtype=torch.float32, **options):
    model = tiny_model(arch, dtype=dtype)
    tquant.quantize(model, "quip#", bits=2, calib=calib, progress=False, scale_grid="", **options)
    return model


def held_out_kl(model, reference) -> float:
    """Mean over HELD_OUT's positions of the full KL(p_float || q_model)."""
    with torch.no_grad():
        p = reference(HELD_OUT).logits.float().log_softmax(-1)
        q = model(HELD_OUT).logits.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.fixture(scope="module", params=[True, False], ids=["dense", "transforms"])
def dense(request):
    """The end-to-end stage's evaluation order (e2e_dense)."""
    return request.param


@pytest.fixture(scope="module")
def runs(dense):
    """The same tiny Llama quantized at 2 bits without and with end-to-end fine-tuning (same seeds)."""
    return {"plain": quantized(), "e2e": quantized(**E2E, e2e_dense=dense)}


def quip_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuipLinear)}


def test_e2e_lowers_the_held_out_kl_to_the_float_model(runs, dense):
    reference = tiny_model("llama")
    plain, tuned = held_out_kl(runs["plain"], reference), held_out_kl(runs["e2e"], reference)
    assert tuned < 0.98 * plain, (tuned, plain)
    report = runs["e2e"].config.quantization_config["report"]["e2e"]
    before, after = report["kl_before_after"]
    assert after < 0.9 * before, report
    assert report["steps"] == 2 * 64 // 4
    assert report["dense"] is dense
    # 2 blocks x (q 96+96, k 96+32, v 96+32, o 96+96, gate 96+192, up 96+192, down 192+96) sign entries; the four
    # block norms and the final one (96 each); the head is tied to the embedding, so both stay fixed
    assert report["tuned_parameters"] == {"signs": 3008, "float": 480}
    assert report["teacher_rest_mass"] < 1e-2  # k = 256 of 257 tokens: the loss is the full KL but one token


def test_e2e_keeps_the_codes_and_the_embedding_and_tunes_the_signs_and_norms(runs):
    plain, tuned = quip_layers(runs["plain"]), quip_layers(runs["e2e"])
    assert plain.keys() == tuned.keys() and len(plain) == 14
    for name, layer in tuned.items():
        assert torch.equal(layer.codes, plain[name].codes), name
        assert set(plain[name].su.unique().tolist()) == {-1.0, 1.0}
        assert not torch.equal(layer.su, plain[name].su) and not torch.equal(layer.sv, plain[name].sv), name
        assert layer.backend == "auto" and not layer.su.requires_grad
    assert torch.equal(runs["e2e"].model.embed_tokens.weight, runs["plain"].model.embed_tokens.weight)
    assert not torch.equal(runs["e2e"].model.norm.weight, runs["plain"].model.norm.weight)
    flags = lambda m: [(n, p.requires_grad) for n, p in m.named_parameters()]
    assert flags(runs["e2e"]) == flags(runs["plain"])  # the same parameters, their flags back


def test_e2e_model_saves_and_reloads_bit_identically(runs, tmp_path):
    model = runs["e2e"]
    tquant.save(model, tmp_path / "q")
    loaded = tquant.load(tmp_path / "q")
    for name, layer in quip_layers(loaded).items():
        original = model.get_submodule(name)
        assert layer.su.dtype == torch.float32 and torch.equal(layer.su, original.su), name
        assert torch.equal(layer.sv, original.sv) and torch.equal(layer.codes, original.codes), name
    with torch.no_grad():
        assert torch.equal(loaded(HELD_OUT).logits, model(HELD_OUT).logits)


def test_e2e_tunes_an_untied_head_and_the_biases_but_not_the_embedding(dense):
    plain = quantized("qwen2", calib=CALIB[:8])
    tuned = quantized("qwen2", calib=CALIB[:8], e2e_epochs=1, e2e_lr=1e-3, e2e_susv_lr=1e-3, e2e_dense=dense)
    assert torch.equal(tuned.model.embed_tokens.weight, plain.model.embed_tokens.weight)
    assert not torch.equal(tuned.lm_head.weight, plain.lm_head.weight)
    q_plain, q_tuned = plain.model.layers[0].self_attn.q_proj, tuned.model.layers[0].self_attn.q_proj
    assert q_tuned.bias is not None and not torch.equal(q_tuned.bias, q_plain.bias)
    assert isinstance(q_tuned._buffers["bias"], torch.Tensor)  # a buffer again, as tquant.load makes it
    counts = tuned.config.quantization_config["report"]["e2e"]["tuned_parameters"]
    # the head (257 x 96), five norms (96) and the q / k / v biases of both blocks (96 + 32 + 32)
    assert counts["float"] == 257 * 96 + 5 * 96 + 2 * 160, counts


def test_e2e_on_a_bfloat16_model_keeps_every_stored_dtype(dense):
    plain = quantized(dtype=torch.bfloat16, calib=CALIB[:8])
    tuned = quantized(dtype=torch.bfloat16, calib=CALIB[:8], e2e_epochs=1, e2e_lr=1e-3, e2e_susv_lr=1e-3,
                      e2e_dense=dense)
    dtypes = lambda m: {k: v.dtype for k, v in m.state_dict().items()}
    assert dtypes(tuned) == dtypes(plain)
    layer = tuned.model.layers[1].mlp.down_proj
    assert layer.su.dtype == layer.sv.dtype == torch.float32 and layer.codes.dtype == torch.int16
    assert tuned.model.norm.weight.dtype == torch.bfloat16
    assert not torch.equal(layer.su, plain.model.layers[1].mlp.down_proj.su)
    tuned.model.layers[0].self_attn.q_proj.validate("q_proj")  # what tquant.load checks


@pytest.mark.parametrize("options,match", [
    (dict(e2e_epochs=-1), r"e2e_epochs must be an integer >= 0 \(0 turns it off\); got -1"),
    (dict(e2e_epochs=1.5), r"e2e_epochs must be an integer"),
    (dict(e2e_batch=0), r"e2e_batch must be an integer >= 1; got 0"),
    (dict(e2e_topk=0), r"e2e_topk must be an integer >= 1"),
    (dict(e2e_lr=0.0), r"e2e_lr must be a positive finite learning rate; got 0.0"),
    (dict(e2e_susv_lr=float("nan")), r"e2e_susv_lr must be a positive"),
    (dict(e2e_susv_lr=-1e-4), r"e2e_susv_lr must be a positive"),
    (dict(e2e_dense=1), r"e2e_dense must be True or False; got 1"),
])
def test_bad_e2e_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        make_method("quip#", **options)


def test_e2e_refuses_to_stream(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match=r"e2e_epochs > 0 tunes the whole model end to end.*without streaming"):
        tquant.quantize_to_disk(str(tmp_path / "src"), str(tmp_path / "out"), "quip#", calib=CALIB[:2],
                                tokenizer=byte_tokenizer(), e2e_epochs=1, scale_grid="")


def test_e2e_after_the_per_block_stage(dense):
    """The benchmark rows' combination: per-block fine-tuning, then end to end from where it left the signs."""
    model = quantized(calib=CALIB[:8], ft_epochs=1, e2e_epochs=1, e2e_lr=1e-3, e2e_susv_lr=1e-3, e2e_dense=dense)
    report = model.config.quantization_config["report"]
    assert len(report["ft_mse_before_after"]) == 2
    before, after = report["e2e"]["kl_before_after"]
    assert after < before, report["e2e"]


def test_both_orders_tune_to_the_same_parameters():
    """Four Adam steps end to end (the best of the two KL checks kept) in the dense order and through the transforms:
    the same function, so the same tuned signs, norms, biases and head but for float rounding: measured 1e-7 on the
    signs and norms, 5e-6 at most (the head; the k_proj bias, whose exact gradient is zero, since softmax ignores a
    key bias, so Adam scales rounding noise) against 4e-3 moved by every parameter."""
    options = dict(calib=CALIB[:16], e2e_epochs=1, e2e_lr=1e-3, e2e_susv_lr=1e-3)
    dense, transforms = (quantized("qwen2", **options, e2e_dense=d) for d in (True, False))
    reports = [m.config.quantization_config["report"]["e2e"] for m in (dense, transforms)]
    assert [r["dense"] for r in reports] == [True, False] and reports[0]["steps"] == 4
    (b0, a0), (b1, a1) = (r["kl_before_after"] for r in reports)
    assert a0 < b0 and b0 == pytest.approx(b1, rel=1e-5) and a0 == pytest.approx(a1, rel=1e-4)
    plain = quantized("qwen2", calib=CALIB[:16])
    state0, state1, start = dense.state_dict(), transforms.state_dict(), plain.state_dict()
    assert state0.keys() == state1.keys()
    moved = 0
    for key, value in state0.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, state1[key], rtol=1e-4, atol=2e-5, msg=key)
            moved += not torch.equal(value, start[key])
        else:
            assert torch.equal(value, state1[key]), key
    assert moved == 2 * 7 * 2 + 5 + 2 * 3 + 1  # every su / sv, the five norms, the q / k / v biases and the head


def test_the_default_order_is_dense(monkeypatch):
    """quip#'s default enters trainable(dense=True) for every QuipLinear in the end-to-end stage."""
    assert make_method("quip#").e2e_dense is True
    seen = []
    trainable = QuipLinear.trainable

    @contextlib.contextmanager
    def spy(self, dense=False):
        seen.append(dense)
        with trainable(self, dense=dense):
            yield

    monkeypatch.setattr(QuipLinear, "trainable", spy)
    model = quantized(calib=CALIB[:4], e2e_epochs=1)
    assert seen == [True] * 14 and model.config.quantization_config["report"]["e2e"]["dense"] is True

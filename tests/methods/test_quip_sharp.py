"""QuIP#: block LDL, BlockLDLQ, incoherence processing, the method on tiny random models, fine-tuning, errors."""
import pytest
import torch

import tquant
from tquant.formats import e8p_codebook
from tquant.formats.hadamard import hadamard_dense, transform
from tquant.formats.incoherence import rotate_hessian, rotate_weight, unrotate_weight
from tquant.methods import quip_sharp
from tquant.methods.quip_sharp import block_ldl, block_ldlq, proxy_error
from tquant.modules import QuipLinear
from tests.tiny_models import tiny_model, token_batch

CALIB = token_batch(8, 32)


def correlated_hessian(k, seed, tokens=400):
    """H = X^T X / T of inputs with strongly correlated channels (near rank k / 4, as in LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g)
    x = (x + 0.3 * torch.randn(tokens, k, generator=g)) * torch.empty(k).uniform_(0.3, 3, generator=g)
    return (x.t() @ x / tokens).double()


def signs(n, seed):
    return torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1


@pytest.mark.parametrize("k", [16, 96, 136])
def test_block_ldl_factors_h(k):
    h = correlated_hessian(k, k)
    lower = block_ldl(h)
    blocks = k // 8
    for i in range(blocks):
        torch.testing.assert_close(lower[8 * i : 8 * i + 8, 8 * i : 8 * i + 8], torch.eye(8, dtype=h.dtype))
        assert lower[8 * i : 8 * i + 8, 8 * (i + 1) :].abs().max() < 1e-12 if i + 1 < blocks else True
    # D = L^-1 H L^-T is block diagonal
    linv = torch.linalg.inv(lower)
    d = linv @ h @ linv.t()
    mask = torch.block_diag(*[torch.ones(8, 8, dtype=torch.bool)] * blocks)
    assert d[~mask].abs().max() < 1e-8 * d.abs().max()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_block_ldlq_beats_nearest_rounding_on_the_proxy(bits, seed):
    k, n = 64, 48
    h = correlated_hessian(k, seed).float()
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 10))
    hat, codes = block_ldlq(w, block_ldl(h.double()).float(), bits)
    nearest, _ = e8p_codebook.rvq_quantize(w.reshape(n, k // 8, 8), bits)
    assert codes.shape == (n, k // 8, 1 if bits == 2 else 2)
    torch.testing.assert_close(e8p_codebook.rvq_decode(codes, bits).reshape(n, k), hat)
    assert proxy_error(w - hat, h) < 0.7 * proxy_error(w - nearest.reshape(n, k), h)


def test_block_ldlq_buffers_match_the_plain_loop():
    """Lazy updates over 128-column buffers (K = 200: a partial buffer too) give the one-block-at-a-time result."""
    k, n = 200, 24
    lower = block_ldl(correlated_hessian(k, 5)).float()
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(6))
    hat, _ = block_ldlq(w, lower, 2)
    plain = torch.zeros_like(w)
    for i in range(k - 8, -1, -8):
        target = w[:, i : i + 8] + (w[:, i + 8 :] - plain[:, i + 8 :]) @ lower[i + 8 :, i : i + 8]
        plain[:, i : i + 8], _ = e8p_codebook.rvq_quantize(target, 2)
    torch.testing.assert_close(hat, plain)


@pytest.mark.parametrize("n,k", [(96, 192), (32, 96), (40, 12)])
def test_incoherence_is_orthogonal_and_keeps_the_proxy(n, k):
    g = torch.Generator().manual_seed(n + k)
    w, delta = torch.randn(n, k, generator=g).double(), torch.randn(n, k, generator=g).double()
    su, sv = signs(k, 1), signs(n, 2)
    h = correlated_hessian(k, 3)
    wr = rotate_weight(w, su, sv)
    torch.testing.assert_close(unrotate_weight(wr, su, sv), w)
    torch.testing.assert_close(wr.norm(), w.norm())
    hr = rotate_hessian(h, su)
    dr = rotate_weight(delta, su, sv)
    assert abs(proxy_error(delta, h) - proxy_error(dr, hr)) < 1e-9 * proxy_error(delta, h)
    x = torch.randn(3, k, generator=g).double()
    torch.testing.assert_close(transform(transform(x), transpose=True), x)


def test_incoherence_spreads_an_outlier():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)).double() * 0.01
    w[5, 7] = 10.0
    wr = rotate_weight(w, signs(96, 1), signs(64, 2))
    assert w.abs().max() / w.square().mean().sqrt() > 50
    assert wr.abs().max() / wr.square().mean().sqrt() < 5


def quantized(bits, **options):
    model = tiny_model("llama")
    with torch.no_grad():
        reference = model(CALIB).logits
    tquant.quantize(model, "quip#", bits=bits, calib=CALIB, progress=False, **options)
    with torch.no_grad():
        out = model(CALIB).logits
    return model, ((out - reference).norm() / reference.norm()).item()


@pytest.mark.slow
def test_quip_sharp_quantizes_a_tiny_llama_better_with_more_bits():
    errors = {}
    for bits in (2, 3, 4):
        model, errors[bits] = quantized(bits)
        layers = [m for m in model.modules() if isinstance(m, QuipLinear)]
        assert len(layers) == 14 and all(m.bits == bits for m in layers)
        qc = model.config.quantization_config
        assert qc["method"] == "quip#" and len(qc["report"]["scale_c"]) == 14
    assert errors[4] < errors[3] < errors[2] < 0.8, errors


def test_quip_linear_computes_the_dequantized_weight():
    model, _ = quantized(3, scale_grid="")
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    # rebuild W from the module's buffers with the reference decoder and transforms
    codes = torch.stack([layer.codes.t().long() & 0xFFFF, layer.codes2.t().long()], dim=-1)
    d = e8p_codebook.rvq_decode(codes, 3).reshape(layer.out_features, layer.in_features)
    w = unrotate_weight(d.double(), layer.su.double(), layer.sv.double())
    torch.testing.assert_close(layer(x).double(), x.double() @ w.t(), rtol=1e-4, atol=1e-5)
    assert set(layer.su.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.slow
def test_quip_sharp_beats_rtn_at_two_bits():
    _, quip = quantized(2)
    model = tiny_model("llama")
    with torch.no_grad():
        reference = model(CALIB).logits
    tquant.quantize(model, "gptq", bits=2, group_size=32, calib=CALIB, progress=False)
    with torch.no_grad():
        gptq = ((model(CALIB).logits - reference).norm() / reference.norm()).item()
    assert quip < gptq, (quip, gptq)


def test_fine_tuning_lowers_the_block_error_and_tunes_the_signs():
    model, tuned = quantized(2, ft_epochs=2, scale_grid="")
    _, plain = quantized(2, scale_grid="")
    report = model.config.quantization_config["report"]["ft_mse_before_after"]
    assert len(report) == 2 and all(after <= before for before, after in report.values())
    assert any(after < 0.95 * before for before, after in report.values())
    su = model.model.layers[0].self_attn.q_proj.su
    assert not set(su.unique().tolist()) <= {-1.0, 1.0}
    assert tuned < plain, (tuned, plain)


def plain_weight(layer: QuipLinear) -> torch.Tensor:
    """A = H_N^T D H_K [N, K] float64 from the layer's codes: D the decoded codes, H_n the orthonormal Hadamard."""
    stages = [layer.codes.t().long() & 0xFFFF]
    if layer.bits > 2:
        stages.append(layer.codes2.t().long() & (0xFF if layer.bits == 3 else 0xFFFF))
    d = e8p_codebook.rvq_decode(torch.stack(stages, dim=-1), layer.bits).reshape(layer.out_features, -1)
    return hadamard_dense(layer.out_features, torch.float64).t() @ d.double() @ \
        hadamard_dense(layer.in_features, torch.float64)


def test_fine_tuning_tunes_each_linear_as_its_quip_linear_and_keeps_the_tuned_values(monkeypatch, tmp_path):
    """Per block, each quantized linear runs as its QuipLinear (trainable(dense=True)) computing
    ((x * su) @ A^T) * sv + bias; su, sv are tuned at ft_susv_lr, the norms and biases at ft_lr; the tuned su, sv and
    biases are what the quantized model holds, saves and reloads."""
    real, tuned = quip_sharp.distill, []

    def checked(block, groups, inputs, teacher, **kw):
        layers = {n: m for n, m in block.named_modules() if isinstance(m, QuipLinear)}
        assert len(layers) == 7 and [g["lr"] for g in groups] == [5e-4, 5e-5]
        assert [id(p) for p in groups[0]["params"]] == [id(p) for m in layers.values() for p in (m.su, m.sv)]
        biases = {id(m.bias) for m in layers.values() if m.bias is not None}  # q, k, v
        assert len(biases) == 3 and biases < {id(p) for p in groups[1]["params"]} and len(groups[1]["params"]) == 5
        g = torch.Generator().manual_seed(len(tuned))
        for m in layers.values():
            with torch.no_grad():  # real-valued signs and a bias, as tuning makes them
                m.su.mul_(torch.empty(m.in_features).uniform_(0.5, 1.5, generator=g))
                if m.bias is not None:
                    m.bias.add_(torch.randn(m.out_features, generator=g) * 0.1)
            x = torch.randn(5, m.in_features, generator=g)
            want = (x.double() * m.su.double()) @ plain_weight(m).t() * m.sv.double()
            want = want if m.bias is None else want + m.bias.double()
            torch.testing.assert_close(m(x).detach().double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        out = real(block, groups, inputs, teacher, **kw)
        tuned.append({n: [t.detach().clone() for t in (m.su, m.sv, m.bias) if t is not None]
                      for n, m in layers.items()})
        return out

    monkeypatch.setattr(quip_sharp, "distill", checked)
    model = tiny_model("qwen2")
    ids = token_batch(4, 16)
    tquant.quantize(model, "quip#", bits=2, calib=CALIB, ft_epochs=1, scale_grid="", progress=False)
    tquant.save(model, tmp_path / "q")
    loaded = tquant.load(tmp_path / "q")
    assert len(tuned) == 2
    for m in (model, loaded):
        for block, values in zip(m.model.layers, tuned):
            for n, kept in values.items():
                layer = block.get_submodule(n)
                assert isinstance(layer, QuipLinear) and list(layer.parameters()) == []
                for t, want in zip((layer.su, layer.sv, layer.bias), kept):
                    assert torch.equal(t, want), n
    assert not set(tuned[0]["self_attn.q_proj"][0].unique().tolist()) <= {-1.0, 1.0}
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_alias_and_listing():
    assert tquant.methods()["quip#"]["bits"].startswith("bits per weight")
    assert "quip_sharp" not in tquant.methods()
    model = tiny_model("llama")
    tquant.quantize(model, "quip_sharp", bits=2, calib=CALIB[:2], progress=False, scale_grid="")
    assert model.config.quantization_config["method"] == "quip#"


@pytest.mark.parametrize("options,match", [
    (dict(bits=5), "2, 3 or 4 bits"),
    (dict(group_size=32), "no groups"),
    (dict(sym=False), "symmetric"),
    (dict(scale_grid="0.9,-1"), "positive"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        tquant.quantize(tiny_model("llama"), "quip#", calib=CALIB, progress=False, **options)


def test_layers_without_a_hadamard_construction_are_named():
    with pytest.raises(ValueError, match=r"lm_head.*out_features=257"):
        tquant.quantize(tiny_model("llama"), "quip#", calib=CALIB, lm_head=True, progress=False)
    with pytest.raises(ValueError, match=r"mlp.gate_proj.*out_features=100"):
        tquant.quantize(tiny_model("llama", intermediate_size=100), "quip#", calib=CALIB, progress=False)
    with pytest.raises(ValueError, match=r"8 input channels.*mlp.down_proj.*in_features=36"):
        tquant.quantize(tiny_model("llama", intermediate_size=36), "quip#", calib=CALIB, progress=False)


def test_quip_sharp_model_saves_and_reloads_bit_identically(tmp_path):
    model = tiny_model("llama")
    ids = token_batch(4, 16)
    tquant.quantize(model, "quip#", bits=3, calib=ids, progress=False, scale_grid="")
    tquant.save(model, tmp_path / "q")
    loaded = tquant.load(tmp_path / "q")
    assert isinstance(loaded.model.layers[0].mlp.up_proj, QuipLinear)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

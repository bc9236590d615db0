"""BCQ (tquant.formats.bcq, method "bcq", BCQLinear): each search step does what its definition says on fresh random
weights, the uniform-grid conversion is exact (RTN and GPTQ with act order), and a tiny Llama quantizes, runs,
saves and reloads through BCQLinear; bad options and layers are refused by name."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tquant
from tquant.formats import bcq
from tquant.modules import BCQLinear
from tquant.formats.weights import BCQWeight, QuantizedWeight
from tests.tiny_models import tiny_model, token_batch

CALIB = token_batch(8, 32)


def weights(seed, n=24, k=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * (0.5 + torch.rand(n, 1, generator=g))


def rel_err(a, w):
    return ((a - w).norm() / w.norm()).item()


@settings(max_examples=12, deadline=None)
@given(bits=st.integers(2, 4), group=st.sampled_from([32, 64, 128]), seed=st.integers(0, 2**31 - 1))
def test_each_search_step_lowers_the_error(bits, group, seed):
    w = weights(seed)
    errors = [rel_err(bcq.dequantize(*bcq.search(w, bits, group, rounds)), w) for rounds in (0, 1, 2, 10)]
    assert errors[0] >= errors[1] - 1e-6 and errors[1] >= errors[2] - 1e-6 and errors[2] >= errors[3] - 1e-6, errors
    assert errors[3] < 0.97 * errors[0], errors
    more = rel_err(bcq.dequantize(*bcq.search(w, bits - 1, group, 10)), w)
    assert errors[3] < more  # one plane more, less error


def test_greedy_is_sign_and_mean_absolute_value():
    w = weights(1)
    alphas, bits, offset = bcq.search(w, 1, 32, 0)
    assert offset is None
    groups = w.reshape(24, 4, 32)
    torch.testing.assert_close(alphas[..., 0], groups.abs().mean(-1))
    assert torch.equal(bits[0].bool(), w >= 0)


def test_refined_alphas_are_least_squares_and_alternating_codes_are_nearest():
    w = weights(2)
    alphas, bits, _ = bcq.search(w, 3, 32, 1)
    b = (bits.float() * 2 - 1).permute(1, 2, 0).reshape(24, 4, 32, 3)  # [N, G, g, q]
    residual = w.reshape(24, 4, 32, 1) - (b * alphas[:, :, None, :]).sum(-1, keepdim=True)
    assert (b * residual).sum(2).abs().max() < 1e-4  # normal equations: B^T (w - B a) = 0
    groups = w.reshape(-1, 32)
    a = torch.rand(groups.shape[0], 3, generator=torch.Generator().manual_seed(5)) * torch.tensor([1.0, -0.5, 0.2])
    signs = bcq._nearest_signs(groups, a, None)  # [R, g, q]
    candidates = a @ bcq._signs(3, "cpu").T  # [R, 8]: every value of each group
    best = (groups[..., None] - candidates[:, None, :]).abs().min(-1).values
    torch.testing.assert_close((groups - (signs * a[:, None, :]).sum(-1)).abs(), best, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_offset_search_fits_asymmetric_groups(bits):
    """Groups shifted off zero: the searched offset (least squares with an all-ones plane, so its residual sums to
    zero over every group) beats plain BCQ, whose 2^q values are symmetric about 0."""
    w = weights(7).abs() + 0.3
    plain = rel_err(bcq.dequantize(*bcq.search(w, bits, 32, 10)), w)
    alphas, planes, offset = bcq.search(w, bits, 32, 10, offset=True)
    assert offset.shape == (24, 4)
    shifted = rel_err(bcq.dequantize(alphas, planes, offset), w)
    assert shifted < 0.7 * plain, (shifted, plain)
    greedy = bcq.search(w, bits, 32, 0, offset=True)
    torch.testing.assert_close(greedy[2], w.reshape(24, 4, 32).mean(-1))  # greedy: the group mean


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_uniform_grids_convert_exactly(bits):
    w = weights(3)
    qw = QuantizedWeight.from_rtn(w, bits, 32, sym=False)
    torch.testing.assert_close(BCQWeight.from_uniform(qw).dequantize(), qw.dequantize(), rtol=0, atol=1e-5)


def test_act_order_weight_converts_with_its_permutation():
    """A uniform weight stored in activation order (GPTQ's act_order: storage column k is input channel perm[k])
    converts with its permutation, and BCQLinear gathers x by it."""
    w = weights(4)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(4))
    qw = QuantizedWeight.from_rtn(w[:, perm], 3, 32, sym=False)
    qw.perm = perm
    converted = BCQWeight.from_uniform(qw)
    torch.testing.assert_close(converted.dequantize(), qw.dequantize(), rtol=0, atol=1e-5)
    layer = BCQLinear.from_quantized(converted, None, torch.float32)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(layer(x), x @ qw.dequantize().t(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group_order", ["input", "act"])
def test_gptq_grid_in_bcq_form_gives_gptq_model_outputs(monkeypatch, group_order):
    """grid="gptq": GPTQ's weights (act order, asymmetric; groups of input channels by default, act-order groups with
    a stored perm otherwise) stored as BCQ run the model as GPTQ's own modules do."""
    from tquant.methods import bcq as bcq_method
    from tquant.methods.gptq import GPTQ

    gptq = tiny_model("llama")
    tquant.quantize(gptq, "gptq", bits=3, group_size=32, sym=False, group_order=group_order, calib=CALIB,
                    progress=False)
    monkeypatch.setattr(bcq_method.BCQ, "_gptq", lambda self: GPTQ(bits=self.bits, group_size=self.group_size,
                                                                   sym=False, group_order=group_order))
    model = tiny_model("llama")
    tquant.quantize(model, "bcq", bits=3, group_size=32, grid="gptq", calib=CALIB, progress=False)
    layer = model.model.layers[0].self_attn.k_proj
    assert isinstance(layer, BCQLinear) and (layer.perm is not None) == (group_order == "act")
    assert layer.offset is not None
    with torch.no_grad():
        torch.testing.assert_close(model(CALIB).logits, gptq(CALIB).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="calib"):
        tquant.quantize(tiny_model("llama"), "bcq", grid="gptq", progress=False)


def quantized(**options):
    model = tiny_model("llama")
    with torch.no_grad():
        reference = model(CALIB).logits
    tquant.quantize(model, "bcq", progress=False, **options)
    with torch.no_grad():
        out = model(CALIB).logits
    return model, rel_err(out, reference)


@pytest.mark.slow
def test_bcq_quantizes_a_tiny_llama_and_searching_longer_helps():
    greedy_model, greedy = quantized(bits=3, group_size=32, rounds=0)
    model, alternating = quantized(bits=3, group_size=32, rounds=30)
    layers = [m for m in model.modules() if isinstance(m, BCQLinear)]
    assert len(layers) == 14 and all(m.planes.shape[0] == 3 and m.offset is None for m in layers)
    assert alternating < greedy < 1.0, (alternating, greedy)
    _, four = quantized(bits=4, group_size=32, rounds=30)
    assert four < alternating
    assert model.config.quantization_config["method"] == "bcq"


def test_bcq_linear_computes_the_dequantized_weight():
    model, _ = quantized(bits=2, group_size=-1, grid="rtn")
    layer = model.model.layers[1].mlp.down_proj
    assert layer.offset is not None and layer.group_size == layer.in_features
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    from tquant.kernels.bcq_matmul import unpack_planes
    w = bcq.dequantize(layer.alphas.permute(2, 1, 0), unpack_planes(layer.planes, layer.in_features),
                       layer.offset.t())
    torch.testing.assert_close(layer(x), x @ w.t(), rtol=1e-4, atol=1e-5)


def test_bcq_model_saves_and_reloads_bit_identically(tmp_path):
    model, _ = quantized(bits=3, group_size=32, rounds=3)
    tquant.save(model, tmp_path / "q")
    loaded = tquant.load(tmp_path / "q")
    assert isinstance(loaded.model.layers[0].mlp.up_proj, BCQLinear)
    with torch.no_grad():
        assert torch.equal(loaded(CALIB).logits, model(CALIB).logits)


@pytest.mark.parametrize("options,match", [
    (dict(bits=5), "1-4 binary planes"),
    (dict(bits=0), "1-4 binary planes"),
    (dict(grid="lut"), "grid must be one of"),
    (dict(rounds=-1), "rounds must be >= 0"),
    (dict(bits=1, grid="rtn"), "bits 2, 3 or 4"),
    (dict(grid="rtn", offset=True), "offset=True is for grid='bcq'"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        tquant.quantize(tiny_model("llama"), "bcq", progress=False, **options)


def test_layers_that_do_not_pack_are_named():
    with pytest.raises(ValueError, match=r"mlp.down_proj.*in_features=100"):
        tquant.quantize(tiny_model("llama", intermediate_size=100), "bcq", group_size=-1, progress=False)
    with pytest.raises(ValueError, match=r"q_proj.*group_size 48; both must be multiples of 32"):
        tquant.quantize(tiny_model("llama"), "bcq", group_size=48, progress=False)
    with pytest.raises(ValueError, match=r"group_size=64 does not divide"):
        tquant.quantize(tiny_model("llama"), "bcq", group_size=64, progress=False)

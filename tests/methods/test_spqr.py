"""SpQR (tquant.formats.spqr, method "spqr", SpQRLinear): the bilevel grid and the leave-one-out gain do what their
definitions say, outliers lower the layer error, the storage report is exact, and a tiny Llama quantizes, runs,
saves and reloads through SpQRLinear; bad options and layers are refused by name."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tquant
from tquant.formats import spqr
from tquant.methods import get_method
from tquant.modules import SpQRLinear
from tquant.formats.quantizer import dequantize, qparams, quantize
from tests.tiny_models import tiny_model, token_batch


@settings(max_examples=15, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), scale_bits=st.integers(1, 4), stat_group=st.sampled_from([1, 4, 16]),
       seed=st.integers(0, 2**31 - 1))
def test_bilevel_scales_are_a_min_max_grid_of_the_scales(bits, scale_bits, stat_group, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 16, generator=g) * torch.rand(32, 1, generator=g)
    s_hat, zero, codes, step, low = spqr.bilevel_qparams(w, bits, scale_bits, stat_group)
    scale = qparams(w, bits, sym=False)[0].view(-1, stat_group)
    assert step.dtype == low.dtype == torch.float16 and codes.min() >= 0 and codes.max() < 2**scale_bits
    torch.testing.assert_close(s_hat, (codes.float().view(-1, stat_group) * step.float()[:, None]
                                       + low.float()[:, None]).view(-1))
    assert (s_hat - scale.view(-1)).abs().max() <= (step.float().repeat_interleave(stat_group) / 2 * 1.01
                                                    + 1e-3 * scale.view(-1)).max()
    assert torch.all(zero == zero.round()) and zero.min() >= 0 and zero.max() < 2**bits


def brute_force_gain(w, d, bits):
    def err(v, dv):
        s, z = qparams(v[None], bits, sym=False)
        return (((dequantize(quantize(v, s, z, bits), s, z) - v) / dv) ** 2).sum()

    keep = lambda t, j: torch.cat([t[:j], t[j + 1:]])  # noqa: E731
    return torch.tensor([[err(row, d) - err(keep(row, j), keep(d, j)) for j in range(len(row))] for row in w])


@settings(max_examples=20, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), g=st.sampled_from([4, 16]), kind=st.sampled_from(["normal", "ties", "negative"]),
       seed=st.integers(0, 2**31 - 1))
def test_outlier_gain_is_the_leave_one_out_error_reduction(bits, g, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    w, d = torch.randn(6, g, generator=gen), torch.rand(g, generator=gen) + 0.5
    if kind == "ties":  # repeated maxima and minima
        w = torch.round(w * 1.5)
    elif kind == "negative":  # rows with no positive weight (the grid's range is clamped to hold 0)
        w = -w.abs()
    torch.testing.assert_close(spqr.outlier_gain(w, d, bits), brute_force_gain(w, d, bits), rtol=1e-4, atol=1e-5)


def test_outlier_gain_singles_out_a_weight_that_stretches_its_range():
    gen = torch.Generator().manual_seed(0)
    w, d = torch.randn(6, 8, generator=gen), torch.rand(8, generator=gen) + 0.5
    w[2, 3] = 9.0
    gain = spqr.outlier_gain(w, d, 3)
    assert gain[2].argmax() == 3 and gain[2, 3] > 5 * gain[[0, 1, 3, 4, 5]].max()


def layer_with_outliers(seed=0, n=64, k=128):
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=False)
    linear.weight.data = torch.randn(n, k, generator=g) * 0.05
    linear.weight.data[torch.rand(n, k, generator=g) < 0.01] *= 12
    x = torch.randn(1024, k, generator=g) * (torch.rand(k, generator=g) * 2 + 0.1)
    return linear, x


def run(linear, x, method="spqr", **opts):
    m = get_method(method)(**opts)
    state = m.new_state("layer", linear)
    state.add_batch(x)
    qw = m.quantize(state, linear, "layer")
    w = linear.weight.detach()
    return qw, m, ((x @ (qw.dequantize() - w).t()) ** 2).mean().item() / ((x @ w.t()) ** 2).mean().item()


def test_outliers_lower_the_error_and_beat_gptq_on_the_same_groups():
    linear, x = layer_with_outliers()
    _, none, e_none = run(linear, x, outlier_relative_threshold=math.inf)
    qw, m, e_out = run(linear, x)
    _, _, e_simple = run(linear, x, simplified_outliers=True)
    _, _, e_gptq = run(linear, x, "gptq", bits=3, group_size=16, sym=False, percdamp=1.0)
    assert none.report()["outlier_fraction"] == 0 and 0 < m.report()["outlier_fraction"] < 0.05
    assert e_out < 0.6 * e_none and e_simple < e_none and e_out < e_gptq, (e_out, e_simple, e_none, e_gptq)
    fewer = run(linear, x, outlier_relative_threshold=1.0)[1].report()["outlier_fraction"]
    assert 0 < fewer < m.report()["outlier_fraction"]


def test_storage_report_is_what_the_module_stores():
    linear, x = layer_with_outliers(1)
    qw, m, _ = run(linear, x, bits=4, group_size=32, scale_bits=4)
    mod = SpQRLinear.from_quantized(qw, None, torch.float16)
    parts = m.report()["bits_by_part"]
    assert parts["weights"] == 4 and parts["stats"] == 8 / 32 and parts["second_level"] == 32 / (32 * 16)
    assert parts["outliers"] == (qw.vals.numel() * 32 + 65 * 32) / (64 * 128) and parts["perm"] == 32 / 64
    assert mod.bits_per_parameter() == pytest.approx(m.report()["avg_bits"], rel=1e-12)
    torch.testing.assert_close(mod(x[:7].half()).float(), x[:7] @ qw.dequantize().t(), rtol=3e-3, atol=3e-3)


def test_outliers_keep_their_weights_exactly():
    """With H proportional to I there is no error feedback: outliers come back as the original weight (to fp16),
    every other weight as its dense code, and the CSR columns are storage columns sorted within each row."""
    linear, _ = layer_with_outliers(2)
    qw, _, _ = run(linear, torch.eye(128).repeat(4, 1), act_order=False)
    w, dense = linear.weight.detach(), qw.dense().dequantize()
    rows = torch.repeat_interleave(torch.arange(64), qw.row_ptr.diff())
    assert qw.perm is None and qw.vals.numel() > 0
    assert all(torch.all(qw.cols[a:b].diff() > 0) for a, b in zip(qw.row_ptr[:-1], qw.row_ptr[1:]))
    is_outlier = torch.zeros_like(w, dtype=torch.bool)
    is_outlier[rows, qw.cols] = True
    w_hat = qw.dequantize()
    torch.testing.assert_close(w_hat[is_outlier], w[is_outlier], rtol=1e-3, atol=1e-4)
    assert torch.equal(w_hat[~is_outlier], dense[~is_outlier])
    assert (w_hat[is_outlier] - dense[is_outlier]).abs().min() > 0


def test_tiny_llama_quantizes_runs_saves_and_reloads(tmp_path):
    model, ids = tiny_model("llama"), token_batch(8, 32)
    ref = model(ids).logits
    q = tquant.quantize(model, "spqr", bits=4, group_size=32, scale_bits=4, calib=ids, progress=False)
    layer = q.model.layers[0].mlp.down_proj
    assert isinstance(layer, SpQRLinear) and layer.vals.numel() > 0
    report = q.config.quantization_config["report"]
    assert 4 < report["avg_bits"] < 6 and report["outlier_fraction"] > 0
    out = q(ids).logits
    assert ((out - ref).norm() / ref.norm()) < 0.2
    tquant.save(q, tmp_path)
    again = tquant.load(tmp_path)
    assert torch.equal(again(ids).logits, out)


@pytest.mark.parametrize("opts,message", [
    (dict(bits=8), "bits"), (dict(bits=3, scale_bits=6), "scale_bits"), (dict(sym=True), "asymmetric"),
    (dict(static_groups=True), "static_groups"), (dict(outlier_relative_threshold=0), "outlier_relative_threshold"),
    (dict(stat_group=0), "stat_group"),
])
def test_bad_options_are_refused(opts, message):
    with pytest.raises(ValueError, match=message):
        get_method("spqr")(**opts)


def test_layers_spqr_cannot_hold_are_refused():
    method = get_method("spqr")(stat_group=16)
    with pytest.raises(ValueError, match="out_features=24, not a multiple of stat_group=16"):
        method.check_layer(torch.nn.Linear(32, 24), "proj")
    with pytest.raises(ValueError, match="does not divide"):
        method.check_layer(torch.nn.Linear(40, 32), "proj")

"""AWQ on tiny random models: the scale fold, the scale search's objective, the clipping search, the method's
options, its grids, and its checkpoints (save / load, compressed-tensors, AWQ's own GEMM layout)."""
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import tquant
from tests.interop.helpers import dequantized, logits, packed_layers
from tests.interop.test_awq import awq_pack
from tests.methods.test_weight_activation import CALIB, rel_err, with_outliers
from tests.tiny_models import tiny_model
from tquant import driver
from tquant.api import make_method
from tquant.calib.block_io import hidden
from tquant.formats.packing import unpack_codes
from tquant.formats.weights import QuantizedWeight
from tquant.methods.awq import (
    _inspected,
    awq_scales,
    clip_bounds,
    clip_values,
    fake_quantized,
    output_errors,
    weight_mean,
)
from tquant.modules import PackedLinear


def block0(model):
    """Block 0 of model, its inputs on CALIB, its linears and its input groups (as the driver finds them)."""
    name, blocks = driver.find_blocks(model)
    inputs = driver.capture_block_inputs(model, name, blocks, CALIB, "cpu", 8)
    linears = driver._linears(blocks[0])
    return blocks[0], inputs, linears, driver._input_groups(blocks[0], linears, *inputs[0])


def quantized(arch="llama", outliers=False, **opts):
    model = tiny_model(arch)
    if outliers:
        with_outliers(model)
    with torch.no_grad():
        reference = model(CALIB).logits
    opts = {"bits": 4, "group_size": 32, **opts}
    tquant.quantize(model, opts.pop("method", "awq"), calib=CALIB, progress=False, **opts)
    return model, reference


# ---- the fold ----

@pytest.mark.parametrize("arch", ["llama", "qwen3", "opt"])
def test_the_searched_scales_fold_exactly(arch):
    """After the search and fold (prepare_block), before anything is quantized, the float model computes what it
    did: the scales went into the weights' columns and their inverses into the norm / linear before them."""
    model = with_outliers(tiny_model(arch))
    with torch.no_grad():
        reference = model(CALIB).logits
        block, inputs, linears, groups = block0(model)
        before = {n: lin.weight.clone() for n, lin in linears.items()}
        method = make_method("awq", bits=3, group_size=32, clip=False)
        method.prepare_block(block, linears, groups, inputs, "")
    scaled = [n for n, a in method.alpha.items() if a is not None]
    assert scaled, method.alpha  # outlier channels: some group chose a scaling
    for n in scaled:
        assert not torch.equal(linears[n].weight, before[n]), n
    assert rel_err(model, reference) < 1e-5


def test_o_proj_under_gqa_is_left_unscaled_as_autoawq_does():
    """GQA (6 query heads on 2 KV heads): v_proj has fewer channels than o_proj's input, so no op absorbs o_proj's
    scale; every other group of a Llama block has its absorber (the norms, up_proj)."""
    model = with_outliers(tiny_model("llama"))
    with torch.no_grad():
        block, inputs, linears, groups = block0(model)
        method = make_method("awq", group_size=32, clip=False)
        method.prepare_block(block, linears, groups, inputs, "p.")
    assert method.unscaled == ["p.self_attn.o_proj"]
    assert set(method.alpha) == {f"p.{n}" for n in linears} - {"p.self_attn.o_proj"}


def test_a_given_scale_folds_through_smoothed_group():
    """SmoothedGroup(scales=s) multiplies the group's columns by s and divides the absorber's channels by s."""
    from tquant.calib import smoothing

    model = tiny_model("llama")
    block = model.model.layers[0]
    s = torch.rand(96, generator=torch.Generator().manual_seed(1)) + 0.5
    q, norm = block.self_attn.q_proj.weight.clone(), block.input_layernorm.weight.clone()
    smoothing.SmoothedGroup([block.self_attn.q_proj], smoothing.Absorber(block.input_layernorm), scales=s)
    torch.testing.assert_close(block.self_attn.q_proj.weight, q * s)
    torch.testing.assert_close(block.input_layernorm.weight, norm / s)


# ---- the scale search ----

def _seen(block, inputs, modules, group=(), weights=()):
    """The outputs of each of `modules` ([[fp32 tensor] per module]) in block forwards over inputs, the group's weights
    set to `weights` meanwhile."""
    outs, saved = [[] for _ in modules], [lin.weight.data for lin in group]
    handles = [m.register_forward_hook(lambda m, i, o, out=out: out.append(hidden(o).float()))
               for m, out in zip(modules, outs)]
    try:
        for lin, w in zip(group, weights):
            lin.weight.data = w
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for lin, w in zip(group, saved):
            lin.weight.data = w
    return outs


def _module_mse(block, inputs, modules, group, teacher, weights):
    """MSE over the outputs of `modules` (each element counted once) in block forwards over inputs, the group's
    weights set to `weights`, against teacher (_seen's float outputs)."""
    outs = _seen(block, inputs, modules, group, weights)
    return sum(((o - t) ** 2).sum().item() for out, tea in zip(outs, teacher) for o, t in zip(out, tea)) / \
        sum(t.numel() for tea in teacher for t in tea)


def _objective(block, g, search_loss):
    """The modules whose outputs AWQ's search compares for group g: the group's linears (search_loss 'linear'), or the
    smallest module holding them ('module')."""
    return [_inspected(block, g)] if search_loss == "module" else [block.get_submodule(n) for n in g]


@pytest.mark.parametrize("duo_scaling", [True, False])
@pytest.mark.parametrize("bits,sym", [(3, False), (4, True)])
def test_the_searched_scale_never_does_worse_than_rtn_on_its_objective(duo_scaling, bits, sym):
    """search_loss 'module', for each scaled group: the output MSE of its module (self_attn, mlp, down_proj) with the
    group's folded weights rounded, the folded block's other weights float, is at most that of plain round-to-nearest
    (alpha = 0 without duo scaling) of the unfolded weights, each computed here from block forwards, not by the
    method. (Under 'linear' the later fold of down_proj's scales into up_proj's rows rescales up_proj's outputs, so
    its objective is pinned before any fold: test_the_search_picks_the_least_error_of_a_one_at_a_time_search.)"""
    search_loss = "module"
    model = with_outliers(tiny_model("llama"))
    with torch.no_grad():
        block, inputs, linears, groups = block0(model)
        method = make_method("awq", bits=bits, group_size=32, sym=sym, clip=False, duo_scaling=duo_scaling,
                             search_loss=search_loss)
        def rtn(w):
            return QuantizedWeight.from_rtn(w, bits, 32, sym).dequantize()

        plain = {}
        for g in groups:
            group, modules = [linears[n] for n in g], _objective(block, g, search_loss)
            teacher = _seen(block, inputs, modules)
            plain[g[0]] = (modules, group, teacher, _module_mse(block, inputs, modules, group, teacher,
                                                                [rtn(lin.weight) for lin in group]))
        method.prepare_block(block, linears, groups, inputs, "")
        better = 0
        for g in groups:
            if g[0] == "self_attn.o_proj":
                continue
            modules, group, teacher, rtn_mse = plain[g[0]]
            awq_mse = _module_mse(block, inputs, modules, group, teacher, [rtn(lin.weight) for lin in group])
            assert awq_mse <= rtn_mse * (1 + 1e-5), (g, awq_mse, rtn_mse)
            better += awq_mse < rtn_mse * 0.99
    assert better >= 1  # the outlier channels make scaling pay somewhere


@pytest.mark.parametrize("search_loss", ["linear", "module"])
def test_the_search_picks_the_least_error_of_a_one_at_a_time_search(search_loss):
    """Each group's chosen alpha is the least error among no scaling and the n_grid alphas, each candidate's error
    computed here from block forwards with the group's weights set to Q(W s) / s one candidate at a time: for
    'linear' the MSE of the group's linear outputs (what the method gets from the Gram matrix, no forwards), for
    'module' that of its module (self_attn, mlp; a lone down_proj: its own output, from the Gram matrix in both)."""
    model = with_outliers(tiny_model("llama"))
    with torch.no_grad():
        block, inputs, linears, groups = block0(model)
        method = make_method("awq", bits=3, group_size=32, sym=False, clip=False, n_grid=6, search_loss=search_loss)
        expected = {}
        for g in groups:
            if g[0] == "self_attn.o_proj":  # unscaled under GQA
                continue
            group, modules = [linears[n] for n in g], _objective(block, g, search_loss)
            teacher = _seen(block, inputs, modules)
            xs = []
            handle = group[0].register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
            for args, kwargs in inputs:
                block(*args, **kwargs)
            handle.remove()
            x_mean = torch.cat(xs).abs().mean(0)
            w_mean = weight_mean([lin.weight for lin in group], 32)
            errors = {None: _module_mse(block, inputs, modules, group, teacher,
                                        [fake_quantized(lin.weight, None, 3, 32, False) for lin in group])}
            for i in range(6):
                s = awq_scales(x_mean, w_mean, i / 6)
                errors[i / 6] = _module_mse(block, inputs, modules, group, teacher,
                                            [fake_quantized(lin.weight, s, 3, 32, False) for lin in group])
            expected[g[0]] = errors
        method.prepare_block(block, linears, groups, inputs, "")
    for head, errors in expected.items():
        chosen = errors[method.alpha[head]]
        assert chosen <= min(errors.values()) * (1 + 1e-4), (head, method.alpha[head], errors)
    assert any(method.alpha[h] is not None for h in expected)  # the outliers make some scaling win


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(),
       group=st.sampled_from([8, 32]), n=st.integers(1, 3), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_output_errors_are_the_linear_outputs_mse(seed, bits, sym, group, n, dtype):
    """output_errors from H = X^T X / T equals the MSE of the outputs X (Q(W s) / s)^T against X W^T computed from X
    itself, over n linears reading X, for no scaling and two random scales; X with outlier channels and an odd T."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(77, 64, generator=g) * (torch.rand(64, generator=g) * 4 + 0.05)
    x[:, seed % 64] *= 30
    weights = [(torch.randn(int(torch.randint(1, 9, (1,), generator=g)), 64, generator=g)).to(dtype) for _ in range(n)]
    scales = [None] + [torch.rand(64, generator=g) * 3 + 0.1 for _ in range(2)]
    got = output_errors(weights, x.t() @ x / x.shape[0], scales, bits, group, sym)
    for s, e in zip(scales, got):
        d = [x @ (w.float() - fake_quantized(w, s, bits, group, sym).float()).t() for w in weights]
        expected = sum((t ** 2).sum().item() for t in d) / sum(t.numel() for t in d)
        assert e == pytest.approx(expected, rel=1e-4, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(),
       group=st.sampled_from([8, 32]), scaled=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_fake_quantized_is_the_grid_the_layers_store(seed, bits, sym, group, scaled, dtype):
    """What the search evaluates, Q(W s) / s, is the de-quantized QuantizedWeight of W s (what PackedLinear stores)
    divided by s, value for value."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(12, 32, generator=g) * torch.rand(32, generator=g) * 4).to(dtype)
    s = torch.rand(32, generator=g) * 3 + 0.05 if scaled else None
    expected = QuantizedWeight.from_rtn(w.float() * (1 if s is None else s), bits, group, sym).dequantize()
    expected = (expected if s is None else expected / s).to(dtype)
    assert torch.equal(fake_quantized(w, s, bits, group, sym), expected)


def test_awq_scales_follow_the_formula():
    g = torch.Generator().manual_seed(0)
    x, w = torch.rand(64, generator=g) * 5, torch.rand(64, generator=g)
    for alpha in (0.0, 0.35, 0.95):
        raw = (x.pow(alpha) / (w.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
        torch.testing.assert_close(awq_scales(x, w, alpha), raw / (raw.max() * raw.min()).sqrt())
        raw = x.pow(alpha).clamp(min=1e-4)
        torch.testing.assert_close(awq_scales(x, None, alpha), raw / (raw.max() * raw.min()).sqrt())
    assert torch.equal(awq_scales(x, None, 0.0), torch.ones(64))  # alpha 0 without w_mean: round-to-nearest
    x[3] = 0  # a dead channel: at least 1e-4 before normalizing, never 0 or inf
    s = awq_scales(x, w, 0.5)
    assert torch.isfinite(s).all() and (s > 0).all()


def test_weight_mean_is_the_mean_of_each_groups_normalized_magnitudes():
    w1 = torch.tensor([[1.0, -2.0, 4.0, 0.5]])
    w2 = torch.tensor([[0.0, 3.0, -1.0, 1.0]])
    # groups of 2: rows [0.5, 1 | 1, 0.125] and [0, 1 | 1, 1] (each divided by its group's max |w| + 1e-6)
    expected = torch.tensor([0.25, 1.0, 1.0, 0.5625])
    torch.testing.assert_close(weight_mean([w1, w2], 2), expected, rtol=1e-5, atol=1e-6)


# ---- the clipping search ----

def _group_errors(w, x, m, group, bits, sym):
    """||X_g (w_g - q_g)||^2 per row and group, q the grid value of w clamped to +-m ([N, G]) per group."""
    bound = m.repeat_interleave(group, dim=1)
    q = QuantizedWeight.from_rtn(torch.maximum(torch.minimum(w, bound), -bound), bits, group, sym).dequantize()
    delta = w - q
    return torch.stack([((x[:, i * group:(i + 1) * group] @ delta[:, i * group:(i + 1) * group].t()) ** 2).sum(0)
                        for i in range(w.shape[1] // group)], dim=1)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3, 4]), sym=st.booleans(),
       group=st.sampled_from([8, 16, 32]), grid=st.integers(2, 12), shrink=st.sampled_from([0.3, 0.5, 0.8]))
def test_clip_values_pick_the_least_output_error_of_the_grid(seed, bits, sym, group, grid, shrink):
    """Per row and group the chosen clip value's ||X_g (w_g - q_g)||^2 is the least over the grid m = (1 - i/grid)
    max|w_g|, i < shrink * grid, so never above no clipping (i = 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 32, generator=g) * (torch.rand(32, generator=g) * 3 + 0.1)
    w = torch.randn(6, 32, generator=g)
    w[:, seed % 32] *= 6  # an outlier weight: clipping it pays in some rows
    h = x.t() @ x
    chosen = clip_values(w, h, group, bits, sym, grid, shrink)
    top = w.abs().reshape(6, -1, group).amax(-1)
    steps = [i for i in range(grid) if i < shrink * grid - 1e-9]
    every = torch.stack([_group_errors(w, x, top * (1 - i / grid), group, bits, sym) for i in steps])
    got = _group_errors(w, x, chosen, group, bits, sym)
    torch.testing.assert_close(got, every.amin(0), rtol=1e-3, atol=1e-4)
    assert (got <= every[0] * (1 + 1e-4) + 1e-4).all()
    ratios = chosen / top
    assert ((ratios > 1 - shrink - 1e-6) & (ratios <= 1 + 1e-6)).all()


def _bound_errors(w, x, lo, hi, group, bits, sym):
    """||X_g (w_g - q_g)||^2 per row and group, q the grid value of w clamped to [lo, hi] ([N, G]) per group."""
    q = QuantizedWeight.from_rtn(torch.maximum(torch.minimum(w, hi.repeat_interleave(group, dim=1)),
                                               lo.repeat_interleave(group, dim=1)), bits, group, sym).dequantize()
    delta = w - q
    return torch.stack([((x[:, i * group:(i + 1) * group] @ delta[:, i * group:(i + 1) * group].t()) ** 2).sum(0)
                        for i in range(w.shape[1] // group)], dim=1)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3, 4]), group=st.sampled_from([8, 16, 32]),
       grid=st.integers(2, 12), shrink=st.sampled_from([0.3, 0.5, 0.8]))
def test_minmax_clip_bounds_never_do_worse_than_absmax(seed, bits, group, grid, shrink):
    """clip_range='minmax' on an asymmetric grid: per row and group its [lo, hi]'s ||X_g (w_g - q_g)||^2 is at most
    absmax's [-m, m]'s, each end within (1 - shrink) of the group's own min / max; with a one-sided outlier it is
    lower somewhere (absmax's clamp to +-m moves only the outlier's end of an asymmetric range). On a symmetric grid
    both are absmax's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 32, generator=g) * (torch.rand(32, generator=g) * 3 + 0.1)
    w = torch.randn(6, 32, generator=g)
    w[:, seed % 32] = w[:, seed % 32].abs() * 6  # a positive outlier in every row
    h = x.t() @ x
    lo_a, hi_a = clip_bounds(w, h, group, bits, False, grid, shrink, "absmax")
    m = clip_values(w, h, group, bits, False, grid, shrink)
    assert torch.equal(lo_a, -m) and torch.equal(hi_a, m)
    lo, hi = clip_bounds(w, h, group, bits, False, grid, shrink, "minmax")
    got, absmax = _bound_errors(w, x, lo, hi, group, bits, False), _bound_errors(w, x, -m, m, group, bits, False)
    assert (got <= absmax * (1 + 1e-4) + 1e-5).all()
    wg = w.reshape(6, -1, group)
    assert (hi >= wg.amax(-1) * (1 - shrink) - 1e-6).all() and (hi <= wg.abs().amax(-1) + 1e-6).all()
    assert (lo <= wg.amin(-1) * (1 - shrink) + 1e-6).all() and (lo >= -wg.abs().amax(-1) - 1e-6).all()
    if bits <= 3 and grid >= 8:
        assert (got < absmax * (1 - 1e-3)).any()
    lo_s, hi_s = clip_bounds(w, h, group, bits, True, grid, shrink, "minmax")
    m_s = clip_values(w, h, group, bits, True, grid, shrink)
    assert torch.equal(lo_s, -m_s) and torch.equal(hi_s, m_s)


def one_sided_outlier_model(seed=0):
    """tiny Llama with outlier input channels (with_outliers) and, in every block linear, 2 % of the weights moved
    up by 6 mean |w|: groups whose range is lopsided, where an asymmetric grid's two ends should be clipped apart."""
    model = with_outliers(tiny_model("llama"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                mod.weight += 6 * mod.weight.abs().mean() * (torch.rand(mod.weight.shape, generator=g) < 0.02)
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_minmax_clipping_lowers_the_error(seed):
    """clip_range 'minmax' against AutoAWQ's 'absmax', all else equal (3-bit, asymmetric), on lopsided weight groups:
    the logits come closer to the float model's (measured 0.979 and 0.977 of absmax's error for seeds 0 and 1;
    without the one-sided weights the two are level, 1.0005, below what a test can tell from summation order)."""
    errors = []
    for clip_range in ("minmax", "absmax"):
        model = one_sided_outlier_model(seed)
        with torch.no_grad():
            reference = model(CALIB).logits
        tquant.quantize(model, "awq", calib=CALIB, progress=False, bits=3, group_size=32, sym=False,
                        clip_range=clip_range)
        errors.append(rel_err(model, reference))
    assert errors[0] < 0.99 * errors[1]


def test_clipping_lowers_the_error():
    """Clipping on vs off, all else equal: each clipped layer's own output error on its inputs does not grow, and
    the logits come closer to the float model's."""
    clipped, reference = quantized(outliers=True, bits=3)
    plain, _ = quantized(outliers=True, bits=3, clip=False)
    report = clipped.config.quantization_config["report"]
    assert set(report["clip_ratio"]) == {f"model.layers.{i}.{m}" for i in range(2)
                                         for m in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                                                   "mlp.up_proj", "mlp.down_proj")}  # q / k: clip_skip
    assert any(r < 1 for r in report["clip_ratio"].values())
    assert "clip_ratio" not in plain.config.quantization_config["report"] or \
        not plain.config.quantization_config["report"]["clip_ratio"]
    assert rel_err(clipped, reference) < rel_err(plain, reference)


# ---- the method on whole models ----

@pytest.mark.parametrize("bits,group_size", [(3, 32), (4, 32), (4, -1)])
def test_awq_beats_rtn_with_outlier_input_channels(bits, group_size):
    """Outlier channels in the norms' outputs (as in real LLMs): AWQ's logits error at most 0.9 of RTN's (measured:
    0.86, 0.85 and 0.84 of it)."""
    awq, reference = quantized(outliers=True, bits=bits, group_size=group_size)
    rtn, _ = quantized(outliers=True, bits=bits, group_size=group_size, method="rtn")
    assert rel_err(awq, reference) < 0.9 * rel_err(rtn, reference)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_grids_sym_asym_per_group_per_channel(sym, group_size):
    """Every linear becomes a PackedLinear on the asked grid (a symmetric one's zeros all 2^(bits-1), an asymmetric
    one's integers in range), recorded in the config, and closer to the float model than RTN on that grid."""
    model, reference = quantized(outliers=True, bits=4, group_size=group_size, sym=sym)
    layers = packed_layers(model)
    assert len(layers) == 14
    for name, mod in layers.items():
        gs = mod.in_features if group_size == -1 else group_size
        assert mod.bits == 4 and mod.group_size == gs and mod.perm is None, name
        assert mod.zeros.shape == (mod.in_features // gs, mod.out_features)
        zeros = mod.zeros.float()
        assert torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() <= 15, name
        assert (zeros == 8).all() if sym else (zeros != 8).any(), name
    qc = model.config.quantization_config
    assert qc["method"] == "awq" and qc["sym"] == sym and qc["group_size"] == group_size
    rtn, _ = quantized(outliers=True, bits=4, group_size=group_size, sym=sym, method="rtn")
    assert rel_err(model, reference) < rel_err(rtn, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_model_stays_in_its_dtype_and_beats_rtn(dtype):
    """The search, the fold and the clip search run on a bf16 / fp16 model (scales and statistics in float32):
    its norms and layers stay in that dtype and its logits are closer to its float ones than RTN's."""
    def half(method, **opts):
        model = with_outliers(tiny_model("llama", dtype=dtype))
        with torch.no_grad():
            reference = model(CALIB).logits.float()
        tquant.quantize(model, method, bits=4, group_size=32, calib=CALIB, progress=False, **opts)
        return model, reference

    model, reference = half("awq")
    assert model.model.layers[0].input_layernorm.weight.dtype == dtype
    assert all(m.scales.dtype == dtype for m in packed_layers(model).values())
    assert rel_err(model, reference) < rel_err(half("rtn")[0], reference)


def test_save_load_is_bit_identical(tmp_path):
    model, _ = quantized(outliers=True)
    tquant.save(model, str(tmp_path))
    loaded = tquant.load(str(tmp_path))
    for name, mod in packed_layers(model).items():
        again = loaded.get_submodule(name)
        for buf in ("qweight", "scales", "zeros"):
            assert torch.equal(getattr(again, buf), getattr(mod, buf)), (name, buf)
    assert torch.equal(logits(loaded), logits(model))
    # the folded norms (and up_proj's rows, inside its codes) are saved with the model
    assert torch.equal(loaded.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight)
    assert loaded.config.quantization_config["report"] == model.config.quantization_config["report"]


def test_awq_is_listed_with_its_options():
    opts = tquant.methods()["awq"]
    assert {"bits", "group_size", "sym", "n_grid", "duo_scaling", "search_loss", "search_samples", "clip", "clip_grid",
            "max_shrink", "clip_range", "clip_skip"} == set(opts)
    assert "(default 20)" in opts["n_grid"] and "(default True)" in opts["duo_scaling"]


@pytest.mark.parametrize("option,value,message", [
    ("n_grid", 0, r"n_grid must be an integer >= 1, got 0"),
    ("n_grid", 2.5, r"n_grid must be an integer >= 1, got 2\.5"),
    ("clip_grid", -3, r"clip_grid must be an integer >= 1, got -3"),
    ("search_samples", -1, r"search_samples must be an integer >= 0 \(0: all\), got -1"),
    ("search_samples", 32, r"search_samples=32 limits search_loss='module''s forwards.*pass search_loss='module'"),
    ("search_loss", "block", r"search_loss must be 'linear' or 'module', got 'block'"),
    ("max_shrink", 1.0, r"max_shrink must be a number in \(0, 1\), got 1\.0"),
    ("max_shrink", 0, r"max_shrink must be a number in \(0, 1\), got 0"),
    ("duo_scaling", "yes", r"duo_scaling must be True or False, got 'yes'"),
    ("clip_range", "sym", r"clip_range must be 'absmax' or 'minmax', got 'sym'"),
    ("clip", None, r"clip must be True or False, got None"),
    ("clip_skip", ["*q_proj"], r"clip_skip must be a string of comma-separated name patterns"),
    ("bits", 5, r"bits=5 is not supported"),
    ("alpha", 0.5, r"unknown option\(s\) \['alpha'\] for method 'awq'"),
])
def test_options_are_refused_naming_the_option(option, value, message):
    with pytest.raises(ValueError, match=message):
        make_method("awq", **{option: value})


@pytest.mark.parametrize("search_loss,search_samples,seen", [
    ("module", 0, 8 + 6 * 8), ("module", 2, 8 + 2 + 6 * 2), ("module", 3, 8 + 3 + 6 * 3), ("linear", 0, 8)])
def test_search_samples_limits_the_search_to_the_first_sequences(search_loss, search_samples, seen):
    """Sequences self_attn runs on during prepare_block: all 8 once (x_mean, X^T X), then for search_loss 'module' the
    teacher, no scaling and n_grid = 4 alphas on the search sequences (a pass of their own when they are not all of
    them), the first ones; for 'linear' nothing more (its errors come from X^T X)."""
    model = with_outliers(tiny_model("llama"))
    with torch.no_grad():
        block, inputs, linears, groups = block0(model)
        method = make_method("awq", group_size=32, n_grid=4, search_loss=search_loss, search_samples=search_samples)
        hidden_seen = []

        def seen_by(module, args, kwargs):
            if module is block.self_attn:  # not find_absorber's copy of the block (deepcopy copies the hook)
                hidden_seen.append(kwargs["hidden_states"])

        handle = block.self_attn.register_forward_pre_hook(seen_by, with_kwargs=True)
        method.prepare_block(block, linears, groups, inputs, "")
        handle.remove()
    assert sum(h.shape[0] for h in hidden_seen) == seen
    assert len(inputs) == 1  # one calibration batch of 8: hidden_seen[0] is the pass over all of it
    assert torch.equal(hidden_seen[-1], hidden_seen[0][:search_samples or 8])  # the last scored forward


def test_experts_are_refused_naming_the_method():
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match=r"not supported by the weight method 'awq' on its mixture-of-experts experts"
                                         r".*block- or model-level steps \(prepare_block\)"):
        tquant.quantize(model, "awq", group_size=32, calib=CALIB, progress=False)


# ---- exports ----

def test_awq_exports_to_compressed_tensors_as_the_library_reads_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    model, _ = quantized(outliers=True, sym=False)
    tquant.export(model, str(tmp_path), format="compressed-tensors")
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), quantization_config=transformers.CompressedTensorsConfig(dequantize=True)).eval()
    for name, mod in packed_layers(model).items():
        assert torch.equal(hf.get_submodule(name).weight, dequantized(mod)), name
    assert torch.equal(logits(hf), logits(model))
    assert torch.equal(logits(tquant.load(str(tmp_path))), logits(model))


@pytest.mark.parametrize("sym,group_size", [(False, 32), (True, 32), (False, -1)])
def test_awq_layout_export_round_trips_bit_exactly(tmp_path, sym, group_size):
    model, _ = quantized(outliers=True, sym=sym, group_size=group_size)
    tquant.export(model, str(tmp_path), format="awq")
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": None}
    t = load_file(os.path.join(tmp_path, "model.safetensors"))
    q = model.get_submodule("model.layers.0.mlp.down_proj")  # its packing against AutoAWQ's loop (test_awq's awq_pack)
    assert torch.equal(t["model.layers.0.mlp.down_proj.qweight"], awq_pack(unpack_codes(q.qweight, 4, q.in_features)))
    assert torch.equal(t["model.layers.0.mlp.down_proj.qzeros"], awq_pack(q.zeros.long()))
    assert torch.equal(t["model.layers.0.mlp.down_proj.scales"], q.scales)
    loaded = tquant.load(str(tmp_path))
    for name, mod in packed_layers(model).items():
        again = loaded.get_submodule(name)
        assert isinstance(again, PackedLinear) and torch.equal(dequantized(again), dequantized(mod)), name
    assert torch.equal(logits(loaded), logits(model))


def test_awq_layout_export_refuses_what_it_cannot_hold(tmp_path):
    model, _ = quantized(bits=3)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: 3-bit weights: AWQ's GEMM layout is "
                                         r"4-bit"):
        tquant.export(model, str(tmp_path / "a"), format="awq")
    gptq, _ = quantized(method="gptq", group_size=32, group_order="act")
    with pytest.raises(ValueError, match=r"act-order storage \(a perm\): AWQ checkpoints have no g_idx"):
        tquant.export(gptq, str(tmp_path / "b"), format="awq")
    with pytest.raises(ValueError, match=r"check_tp has no rules for the awq format"):
        tquant.export(gptq, str(tmp_path / "c"), format="awq", check_tp=(2,))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")

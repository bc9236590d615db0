"""ABQ-LLM (method "abq") and its module BitPlaneLinear on tiny random models: the LWC grid against the quantizer,
LET folding exact, training lowering the block loss for each option, the quantized layer matching what training
simulated, BitPlaneLinear against float math (A16 and WpAq), save / load, and the input errors."""
import pytest
import torch

import tquant
from tquant import driver
from tquant.methods.abq import ABQ, fake_activations, lwc_quantize
from tquant.modules import BitPlaneLinear
from tquant.qweight import BitPlaneWeight, QuantizedWeight
from tiny_models import tiny_model, token_batch

CALIB = token_batch(8, 32)


def with_outliers(model, factor=20.0):
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith("layernorm"):
                mod.weight[::17] *= factor
    return model


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 96), (4, 32), (6, 96), (8, 32)])
def test_lwc_grid_without_clipping_is_the_quantizers_rtn(bits, group):
    w = torch.randn(40, 96) * 0.1
    w[::5] += 0.05  # asymmetric rows
    rtn = QuantizedWeight.from_rtn(w, bits, group, sym=False).dequantize()
    torch.testing.assert_close(lwc_quantize(w, 2**bits - 1, group), rtn, rtol=0, atol=1e-6)
    clip = (torch.full((40, 96 // group), -1.0), torch.full((40, 96 // group), 1.0))
    clipped = lwc_quantize(w, 2**bits - 1, group, clip)
    assert clipped.min() > rtn.min() * 0.5  # sigmoid(-1) = 0.27 of the negative range
    assert clipped.max() < rtn.max()


def test_lwc_gradients_reach_the_clip_factors():
    w = torch.randn(16, 64)
    clip = tuple(torch.full((16, 2), 4.0, requires_grad=True) for _ in range(2))
    lwc_quantize(w, 15, 32, clip).square().sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in clip)


def test_fake_activations_are_act_quants_grid():
    from tquant.kernels.act_quant import quantize_activations_ref

    x = torch.randn(7, 50) * 3 + 1
    xq, scale, zero = quantize_activations_ref(x, bits=4, zero_point=True)
    y = fake_activations(x, 4)
    assert ((y - x).abs() <= scale[:, None] / 2 + 1e-6).all()
    codes = torch.round(y / scale[:, None]) + zero[:, None]
    assert torch.equal(codes.int() - 8, xq.int())


def block_setup(arch="llama"):
    model = with_outliers(tiny_model(arch))
    name, blocks = driver.find_blocks(model)
    inputs = driver.capture_block_inputs(model, name, blocks, CALIB, "cpu", 8)
    block = blocks[0]
    linears = driver._linears(block)
    groups = driver._input_groups(block, linears, *inputs[0])
    return model, block, linears, groups, inputs


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_let_groups_fold_exactly(arch):
    """Random LET scales folded into the float block (no quantization) leave its output unchanged: each
    absorber (norm, v_proj under GQA, up_proj, OPT's fc1 before ReLU is not one) takes exactly 1 / s."""
    model, block, linears, groups, inputs = block_setup(arch)
    method = ABQ(wbits=4)
    names = {id(m): n for n, m in block.named_modules()}
    let = method.let_groups(block, linears, groups, inputs, names)
    assert len(let) >= 3 if arch == "llama" else len(let) >= 2
    g = torch.Generator().manual_seed(0)
    for group in let:
        group.theta = group.theta + torch.empty_like(group.theta).uniform_(-1, 1, generator=g)
    before = driver.hidden(block(*inputs[0][0], **inputs[0][1]))
    with torch.no_grad():
        method.fold(block, linears, let, {})
    after = driver.hidden(block(*inputs[0][0], **inputs[0][1]))
    assert rel(after, before) < 1e-5


@pytest.mark.parametrize("opts,beats_rtn", [
    (dict(wbits=4, abits=4), True), (dict(wbits=3, abits=16, group_size=32), True),
    (dict(wbits=2, abits=8, group_size=32, bit_balance=True), True),
    # LWC alone with OmniQuant's loss lowers both blocks' losses but not the logits' error of this random model
    (dict(wbits=4, abits=6, dlc=False, compensation=False, let=False), False)])
def test_training_lowers_each_block_loss_and_beats_rtn(opts, beats_rtn):
    model = with_outliers(tiny_model("llama"))
    with torch.no_grad():
        reference = model(CALIB).logits
    rtn = tquant.quantize(with_outliers(tiny_model("llama")), "abq", epochs=0, progress=False, **opts)
    trained = tquant.quantize(model, "abq", calib=CALIB, epochs=4, progress=False, **opts)
    log = trained.config.quantization_config["report"]["training"]
    assert set(log) == {"model.layers.0", "model.layers.1"}
    assert all(e["loss_after"] < e["loss_before"] for e in log.values())
    with torch.no_grad():
        err_trained, err_rtn = rel(trained(CALIB).logits, reference), rel(rtn(CALIB).logits, reference)
    assert err_trained < err_rtn or not beats_rtn
    layer = trained.model.layers[0].mlp.down_proj
    assert isinstance(layer, BitPlaneLinear) and layer.bits == (3 if opts.get("bit_balance") else opts["wbits"])


def test_quantized_layers_compute_what_training_simulated():
    """After tquant.quantize, each BitPlaneLinear (torch path) gives the driver's simulation of it: the folded,
    clipped weight on its grid times the fake-quantized input."""
    model = tiny_model("llama")
    sim = {}
    original = driver.linear_module

    def capture(qw, bias, dtype):
        sim[id(qw)] = qw
        return original(qw, bias, dtype)

    mp = pytest.MonkeyPatch()
    mp.setattr(driver, "linear_module", capture)
    try:
        tquant.quantize(model, "abq", wbits=3, abits=8, group_size=32, calib=CALIB, epochs=1, progress=False)
    finally:
        mp.undo()
    qw = next(iter(sim.values()))
    layer = BitPlaneLinear.from_quantized(qw, None, torch.float32)
    x = torch.randn(5, qw.codes.shape[1]) * 2
    expected = fake_activations(x, 8) @ qw.dequantize().t()
    assert rel(layer(x), expected) < 1e-5


@pytest.mark.parametrize("bits,act_bits,group", [(4, None, 32), (3, None, 96), (2, 8, 32), (5, 5, 96), (8, 8, 32)])
def test_bitplane_linear_matches_float_math(bits, act_bits, group):
    g = torch.Generator().manual_seed(bits)
    w, bias = torch.randn(40, 96, generator=g) * 0.1, torch.randn(40, generator=g)
    rtn = QuantizedWeight.from_rtn(w, bits, group, sym=False)
    qw = BitPlaneWeight(rtn.codes, rtn.scale, rtn.zero, bits, group, act_bits=act_bits)
    layer = BitPlaneLinear.from_quantized(qw, bias, torch.float32)
    x = torch.randn(3, 4, 96, generator=g)
    xf = x if act_bits is None else fake_activations(x, act_bits)
    expected = xf @ qw.dequantize().t() + bias
    assert layer(x).shape == (3, 4, 40)
    assert rel(layer(x), expected) < 1e-5


def test_kernels_bitplane_linear_triton_path_matches_torch_path():
    """backend="triton" (the Triton kernels; under the interpreter on the CPU) against the torch references."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(33, 64, generator=g) * 0.1
    for bits, act_bits in ((4, None), (2, 8), (4, 4)):
        rtn = QuantizedWeight.from_rtn(w, bits, 32, sym=False)
        layer = BitPlaneLinear.from_quantized(BitPlaneWeight(rtn.codes, rtn.scale, rtn.zero, bits, 32,
                                                             act_bits=act_bits), None, torch.float32)
        x = torch.randn(5, 64, generator=g)
        layer.backend = "torch"
        ref = layer(x)
        layer.backend = "triton"
        assert rel(layer(x), ref) < 1e-5


def test_save_load_round_trip(tmp_path):
    model = tquant.quantize(tiny_model("llama"), "abq", wbits=3, abits=6, group_size=32, calib=CALIB, epochs=1,
                            progress=False)
    with torch.no_grad():
        before = model(CALIB).logits
    tquant.save(model, tmp_path / "m")
    loaded = tquant.load(tmp_path / "m")
    assert isinstance(loaded.model.layers[1].self_attn.o_proj, BitPlaneLinear)
    with torch.no_grad():
        assert torch.equal(loaded(CALIB).logits, before)


@pytest.mark.parametrize("opts,message", [
    (dict(wbits=9), "wbits=9"), (dict(wbits=1), "wbits=1"), (dict(abits=1), "abits=1"), (dict(abits=12), "abits=12"),
    (dict(sym=True), "asymmetric"), (dict(wbits=3, bit_balance=True), "bit_balance"),
    (dict(bits=3, wbits=2), "disagree"), (dict(epochs=-1), "epochs"),
])
def test_bad_options_are_named(opts, message):
    with pytest.raises(ValueError, match=message):
        tquant.quantize(tiny_model("llama"), "abq", calib=CALIB, progress=False, **opts)


def test_group_size_the_bitplane_gemm_cannot_take_is_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        tquant.quantize(tiny_model("llama"), "abq", group_size=48, calib=CALIB, progress=False)


def test_bits_is_an_alias_of_wbits():
    assert ABQ(bits=3).wbits == 3 and ABQ(wbits=6).bits == 6

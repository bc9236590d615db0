"""ABQ-LLM (method "abq") and its module BitPlaneLinear on tiny random models: the LWC grid against the quantizer,
LET folding exact (q/k LET too, through RoPE and GQA), training lowering the block loss for each option, the quantized
layer matching what training simulated, qkv_bits' per-head output quantization in the model, BitPlaneLinear against
float math (A16 and WpAq), save / load, and the input errors."""
import pytest
import torch
import transformers

import tquant
from tquant import driver
from tquant.methods.abq import ABQ, QKGroup, fake_activations, lwc_quantize
from tquant.methods import abq as abq_method
from tquant.modules import BitPlaneLinear
from tquant.formats.weights import BitPlaneWeight, QuantizedWeight
from tests.kernel_device import DEVICE
from tests.tiny_models import tiny_model, token_batch

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


def block_setup(arch="llama", **overrides):
    model = with_outliers(tiny_model(arch, **overrides))
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
    assert folded_change(method, block, linears, let, inputs) < 1e-5


def folded_change(method, block, linears, let, inputs) -> float:
    """The block output's relative change after random thetas (uniform +-1 on top of each start) are folded."""
    g = torch.Generator().manual_seed(0)
    for group in let:
        group.theta = group.theta + torch.empty_like(group.theta).uniform_(-1, 1, generator=g)
    before = driver.hidden(block(*inputs[0][0], **inputs[0][1]))
    with torch.no_grad():
        method.fold(block, linears, let, {})
    return rel(driver.hidden(block(*inputs[0][0], **inputs[0][1])), before)


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("llama", {"num_key_value_heads": 6}), ("qwen2", {})])
def test_qk_let_folds_exactly_through_rope_and_gqa(arch, overrides):
    """With qkv_bits, let_groups adds a QKGroup (theta [KV heads, head_dim / 2]); random thetas of every group folded
    into the float block (Qwen2: q / k biases too) leave its output unchanged."""
    model, block, linears, groups, inputs = block_setup(arch, **overrides)
    method = ABQ(wbits=4, abits=4, qkv_bits=4)
    method.prepare_model(model)
    let = method.let_groups(block, linears, groups, inputs, {id(m): n for n, m in block.named_modules()})
    qk = [g for g in let if isinstance(g, QKGroup)]
    assert len(qk) == 1 and qk[0].theta.shape == (overrides.get("num_key_value_heads", 2), 8)
    assert folded_change(method, block, linears, let, inputs) < 1e-5


@pytest.mark.parametrize("rope", [True, False])
def test_qk_scales_untied_over_rope_pairs_change_the_output(rope):
    """Why QKGroup ties channel i to i + head_dim / 2: per-channel scales (q / s, k * s) leave q . k unchanged, but
    RoPE mixes each pair, so untied scales change the block's output; with RoPE off (cos 1, sin 0) they do not."""
    model, block, linears, groups, inputs = block_setup()
    args, kwargs = inputs[0]
    if not rope:
        cos, sin = kwargs["position_embeddings"]
        kwargs = kwargs | {"position_embeddings": (torch.ones_like(cos), torch.zeros_like(sin))}
    before = driver.hidden(block(*args, **kwargs))
    s = torch.exp(torch.empty(2, 16).uniform_(-1, 1, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        block.self_attn.q_proj.weight.div_(s.repeat_interleave(3, dim=0).reshape(-1, 1))
        block.self_attn.k_proj.weight.mul_(s.reshape(-1, 1))
    err = rel(driver.hidden(block(*args, **kwargs)), before)
    assert err > 1e-3 if rope else err < 1e-5


def test_qk_let_trains_through_the_output_quantizer():
    """effective() puts the q/k scales into q_proj / k_proj before LWC, so with the per-head output quantizer on,
    the block loss has a gradient in QKGroup's theta."""
    model, block, linears, groups, inputs = block_setup()
    method = ABQ(wbits=4, abits=4, qkv_bits=4)
    method.prepare_model(model)
    let = method.let_groups(block, linears, groups, inputs, {id(m): n for n, m in block.named_modules()})
    qk = next(g for g in let if isinstance(g, QKGroup))
    qk.theta.requires_grad_(True)
    hooks = [block.get_submodule(f"self_attn.{p}_proj").register_forward_hook(method.quantized_output) for p in "qkv"]
    out = torch.func.functional_call(block, method.effective(block, linears, let, {}, {}), inputs[0][0], inputs[0][1])
    driver.hidden(out).square().mean().backward()
    for h in hooks:
        h.remove()
    assert qk.theta.grad is not None and qk.theta.grad.abs().sum() > 0


def test_per_head_output_quant_is_a_per_token_per_group_min_max_grid():
    """fake_activations(y, bits, group): each token's groups of `group` channels on their own asymmetric grid
    (range widened to hold 0), against plain torch; error within half a step, a second pass a no-op."""
    y = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    yg = y.reshape(-1, 16)
    lo, hi = yg.amin(1, keepdim=True).clamp(max=0), yg.amax(1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 15
    zero = torch.round(-lo / scale)
    ref = ((torch.clamp(torch.round(yg / scale) + zero, 0, 15) - zero) * scale).reshape(y.shape)
    out = fake_activations(y, 4, 16)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert ((out - y).reshape(-1, 16).abs() <= scale / 2 + 1e-6).all()
    torch.testing.assert_close(fake_activations(out, 4, 16), out, rtol=0, atol=1e-5)
    assert not torch.equal(out, fake_activations(y, 4))  # per token over all 48 channels: another grid


def test_qkv_bits_quantize_the_models_attention_inputs_and_survive_save_load(tmp_path):
    """RTN (data-free) with qkv_bits=4: q / k / v_proj carry out_bits 4 per head of 16, o_proj none; the logits are
    the qkv_bits=16 model's with its q / k / v outputs passed through fake_activations(y, 4, 16), and reload equal."""
    opts = dict(wbits=4, abits=8, epochs=0, progress=False)
    plain = tquant.quantize(tiny_model("llama"), "abq", **opts)
    model = tquant.quantize(tiny_model("llama"), "abq", qkv_bits=4, **opts)
    attn = model.model.layers[1].self_attn
    assert (attn.q_proj.out_bits, attn.v_proj.out_group, attn.o_proj.out_bits) == (4, 16, None)
    with torch.no_grad():
        logits = model(CALIB).logits
        hooks = [m.register_forward_hook(lambda m, a, y: fake_activations(y, 4, 16).to(y.dtype))
                 for n, m in plain.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj"))]
        reference = plain(CALIB).logits
        for h in hooks:
            h.remove()
        assert torch.equal(logits, reference) and rel(plain(CALIB).logits, logits) > 1e-3
    tquant.save(model, tmp_path / "m")
    loaded = tquant.load(tmp_path / "m")
    assert loaded.model.layers[0].self_attn.k_proj.out_bits == 4
    with torch.no_grad():
        assert torch.equal(loaded(CALIB).logits, logits)


def test_qkv_bits_need_llama_style_attention():
    with pytest.raises(ValueError, match="Llama-style attention"):
        tquant.quantize(tiny_model("gpt2"), "abq", qkv_bits=4, epochs=0, progress=False)
    qwen3 = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="q_norm"):
        ABQ(qkv_bits=4).prepare_model(transformers.AutoModelForCausalLM.from_config(qwen3))


@pytest.mark.parametrize("opts,beats_rtn", [
    pytest.param(dict(wbits=4, abits=4), True, marks=pytest.mark.slow), (dict(wbits=3, abits=16, group_size=32), True),
    pytest.param(dict(wbits=2, abits=8, group_size=32, bit_balance=True), True, marks=pytest.mark.slow),
    # LWC alone with OmniQuant's loss lowers both blocks' losses but not the logits' error of this random model
    (dict(wbits=4, abits=6, dlc=False, compensation=False, let=False), False),
    pytest.param(dict(wbits=4, abits=4, qkv_bits=6), True, marks=pytest.mark.slow),
    pytest.param(dict(wbits=4, abits=4, attn_kl=1.0), True, marks=pytest.mark.slow)])
def test_training_lowers_the_block_losses_and_beats_rtn(opts, beats_rtn):
    model = with_outliers(tiny_model("llama"))
    with torch.no_grad():
        reference = model(CALIB).logits
    rtn = tquant.quantize(with_outliers(tiny_model("llama")), "abq", epochs=0, progress=False, **opts)
    trained = tquant.quantize(model, "abq", calib=CALIB, epochs=4, progress=False, **opts)
    log = trained.config.quantization_config["report"]["training"]
    assert set(log) == {"model.layers.0", "model.layers.1"}
    # the best of the checks is kept (the start included), so no block gets worse; the training must lower the
    # sum (one block may find nothing better: qkv_bits=6's first block on some CPUs' float summation order)
    assert all(e["loss_after"] <= e["loss_before"] for e in log.values())
    assert sum(e["loss_after"] for e in log.values()) < sum(e["loss_before"] for e in log.values())
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
    layer.backend = "torch"
    x = (torch.randn(5, qw.codes.shape[1]) * 2).to(qw.codes.device)  # the driver quantizes on the GPU if there is one
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
                                                             act_bits=act_bits), None, torch.float32).to(DEVICE)
        x = torch.randn(5, 64, generator=g).to(DEVICE)
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
    (dict(bits=3, wbits=2), "disagree"), (dict(epochs=-1), "epochs"), (dict(qkv_bits=1), "qkv_bits=1"),
    (dict(qkv_bits=12), "qkv_bits=12"),
])
def test_bad_options_are_named(opts, message):
    with pytest.raises(ValueError, match=message):
        tquant.quantize(tiny_model("llama"), "abq", calib=CALIB, progress=False, **opts)


def test_group_size_the_bitplane_gemm_cannot_take_is_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        tquant.quantize(tiny_model("llama"), "abq", group_size=48, calib=CALIB, progress=False)


def test_bits_is_an_alias_of_wbits():
    assert ABQ(bits=3).wbits == 3 and ABQ(wbits=6).bits == 6


def test_attention_kl_is_the_mean_row_kl():
    """attention_kl against KL(p || q) summed over keys, averaged over query rows, on random attention maps; 0 for
    q = p and positive otherwise."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 5, 5, generator=g), dim=-1)
    q = torch.softmax(torch.randn(2, 3, 5, 5, generator=g), dim=-1)
    expected = sum((p[i, h, t] * (p[i, h, t] / q[i, h, t]).log()).sum() for i in range(2) for h in range(3)
                   for t in range(5)) / 30
    assert torch.allclose(abq_method.attention_kl(p, q), expected, atol=1e-6)
    assert abq_method.attention_kl(p, p).abs() < 1e-7 and abq_method.attention_kl(p, q) > 0.01


def test_attention_kl_compares_float_and_quantized_maps(monkeypatch):
    """With attn_kl the loss gets the KL term of the float block's attention probabilities (the teacher: no fake
    quantization, its own weights) against the quantized block's; the model's attention implementation is restored."""
    model = with_outliers(tiny_model("llama"))
    terms = []
    original = abq_method.attention_kl

    def spy(p, q):
        terms.append((p.detach().clone(), q.detach().clone(), original(p, q).item()))
        return original(p, q)

    monkeypatch.setattr(abq_method, "attention_kl", spy)
    implementation = model.config._attn_implementation
    tquant.quantize(model, "abq", wbits=2, abits=4, calib=CALIB, epochs=1, attn_kl=1.0, progress=False)
    assert terms and model.config._attn_implementation == implementation
    p, q, kl = terms[0]
    assert p.shape == q.shape and p.shape[-1] == p.shape[-2] == CALIB.shape[1]
    assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5) and kl > 0 and not torch.equal(p, q)


def test_attention_kl_needs_hugging_face_attention():
    with pytest.raises(ValueError, match="attn_kl"):
        ABQ(attn_kl=-1.0)
    with pytest.raises(ValueError, match="attn_kl needs"):
        ABQ(attn_kl=1.0).prepare_model(torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(4, 4)])))

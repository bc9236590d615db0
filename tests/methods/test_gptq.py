"""GPTQ against RTN and against its own invariants, one linear at a time."""
import pytest
import torch
from torch import nn

from tquant.methods import get_method
from tquant.modules import PackedLinear


def correlated_inputs(k, t=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    return torch.randn(t, k, generator=g) @ mix + 0.2 * torch.randn(t, k, generator=g)


def quantize_layer(name, linear, x, **kw):
    method = get_method(name)(**kw)
    state = method.new_state("layer", linear)
    for chunk in x.split(512):
        state.add_batch(chunk)
    return method.quantize(state, linear, "layer")


def output_error(linear, qw, x):
    return ((x @ (qw.dequantize() - linear.weight.detach()).t()) ** 2).mean().item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,act_order,static_groups,group_order", [
    (-1, False, False, "input"), (-1, True, False, "input"), (32, False, False, "input"), (32, True, False, "input"),
    (32, True, True, "input"), (32, True, False, "act"), (32, True, True, "act")])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_beats_rtn(bits, group_size, act_order, static_groups, group_order, sym):
    torch.manual_seed(bits)
    linear = nn.Linear(128, 48, bias=False)
    x = correlated_inputs(128, seed=bits)
    kw = dict(bits=bits, group_size=group_size, sym=sym)
    rtn = quantize_layer("rtn", linear, x, **kw)
    gptq = quantize_layer("gptq", linear, x, act_order=act_order, static_groups=static_groups, group_order=group_order,
                          **kw)
    assert output_error(linear, gptq, x) < 0.85 * output_error(linear, rtn, x)
    assert gptq.codes.min() >= 0 and gptq.codes.max() < 2**bits
    assert (gptq.perm is not None) == (act_order and group_size > 0 and group_order == "act")


def test_gptq_equals_rtn_when_inputs_are_white():
    """With X^T X = I the inverse Hessian is diagonal: no error feedback, so GPTQ must round like RTN."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    x = torch.linalg.qr(torch.randn(64, 64))[0] * 8  # orthogonal rows: X^T X = 64 I
    for gs in (-1, 16):
        rtn = quantize_layer("rtn", linear, x, bits=3, group_size=gs)
        gptq = quantize_layer("gptq", linear, x, bits=3, group_size=gs, act_order=False, percdamp=0.0)
        assert torch.equal(gptq.codes, rtn.codes)
        torch.testing.assert_close(gptq.scale, rtn.scale)


@pytest.mark.parametrize("static_groups", [False, True])
@pytest.mark.parametrize("group_order", ["input", "act"])
def test_act_order_storage_matches_packed_module(static_groups, group_order):
    torch.manual_seed(1)
    linear = nn.Linear(96, 40, bias=True)
    x = correlated_inputs(96, seed=3)
    qw = quantize_layer("gptq", linear, x, bits=4, group_size=32, act_order=True, static_groups=static_groups,
                        group_order=group_order)
    module = PackedLinear.from_quantized(qw, linear.bias, torch.float32)
    expected = x[:64] @ qw.dequantize().t() + linear.bias
    torch.testing.assert_close(module(x[:64]), expected, rtol=1e-4, atol=1e-4)


def test_hessian_dtype_float64_agrees():
    torch.manual_seed(2)
    linear = nn.Linear(64, 16, bias=False)
    x = correlated_inputs(64, seed=5)
    a = quantize_layer("gptq", linear, x, bits=4, group_size=16, hessian_dtype="float32")
    b = quantize_layer("gptq", linear, x, bits=4, group_size=16, hessian_dtype="float64")
    assert (a.codes != b.codes).float().mean() < 0.02


def test_gptq_errors():
    linear = nn.Linear(32, 8)
    with pytest.raises(ValueError, match="NaN or Inf in the calibration activations entering layer 'layer'"):
        quantize_layer("gptq", linear, torch.full((4, 32), float("nan")), bits=4)
    method = get_method("gptq")(bits=4, group_size=-1)
    with pytest.raises(ValueError, match="saw no calibration data"):
        method.quantize(method.new_state("layer", linear), linear, "layer")
    # a rank-1 Hessian (one input direction) without damping; all-ones has an exactly zero second pivot (a random
    # rank-1 one leaves rounding noise there, which may come out positive and let Cholesky through)
    with pytest.raises(ValueError, match="Hessian of layer 'layer' is not positive definite even with percdamp=0.0"):
        get_method("gptq")(bits=4, percdamp=0.0)._inverse_cholesky(torch.ones(32, 32), "layer")
    with pytest.raises(ValueError, match="hessian_dtype"):
        get_method("gptq")(hessian_dtype="float16")
    with pytest.raises(ValueError, match="bits=5 is not supported"):
        get_method("gptq")(bits=5)


def _lazy_batch_case():
    torch.manual_seed(4)
    linear = nn.Linear(576, 24, bias=False)  # K = 576: a multiple of neither 128 nor (with g48) of every batch
    return linear, correlated_inputs(576, t=1024, seed=7)


@pytest.mark.parametrize("group_size,act_order,static_groups,group_order", [
    (-1, True, False, "input"), (64, True, True, "input"), (64, True, False, "input"), (64, True, False, "act"),
    (48, False, False, "input"), (48, True, False, "input"), (48, True, False, "act")])
def test_blocksize_gives_the_same_codes(group_size, act_order, static_groups, group_order):
    """Lazy batch updates are exact: blocksize 1 (every column updates the rest at once), 32 and 128 give the same
    codes. The error of a batch must reach the columns past it (w[:, i2:] -= err1 @ u[i1:i2, i2:]), and a group
    that starts inside a batch and ends past it (g48 with batches of 32 or 128) must see those pending updates."""
    linear, x = _lazy_batch_case()
    kw = dict(bits=3, group_size=group_size, act_order=act_order, static_groups=static_groups, group_order=group_order,
              hessian_dtype="float64")
    ref = quantize_layer("gptq", linear, x, blocksize=1, **kw)
    for blocksize in (32, 128):
        qw = quantize_layer("gptq", linear, x, blocksize=blocksize, **kw)
        assert torch.equal(qw.codes, ref.codes), blocksize
        torch.testing.assert_close(qw.scale, ref.scale)
        torch.testing.assert_close(qw.zero, ref.zero)


def test_damping_is_relative_to_mean_diag_h():
    """percdamp is a fraction of mean(diag H): scaling the inputs by any factor (H by its square) leaves the codes as
    they are. An absolute damping (percdamp * I) would swamp a small H (GPTQ -> RTN) and vanish in a large one."""
    torch.manual_seed(5)
    linear = nn.Linear(128, 32, bias=False)
    x = correlated_inputs(128, seed=9)
    kw = dict(bits=3, group_size=32, percdamp=0.01, hessian_dtype="float64")
    ref = quantize_layer("gptq", linear, x, **kw)
    for factor in (1e-3, 1e3):
        assert torch.equal(quantize_layer("gptq", linear, x * factor, **kw).codes, ref.codes), factor



def test_default_groups_are_input_channels():
    """Defaults: act order, groups of consecutive input channels (no perm), each group's (scale, zero) from its
    error-updated weights when GPTQ reaches the group's first column. static_groups=True takes them from the original
    weights (llm-compressor's actorder="static"); group_order="act" groups consecutive act-order columns (perm)."""
    from tquant.formats.quantizer import grouped_qparams

    gptq = get_method("gptq")()
    assert gptq.act_order and gptq.group_order == "input" and not gptq.static_groups
    torch.manual_seed(6)
    linear = nn.Linear(96, 40, bias=False)
    x = correlated_inputs(96, seed=11)
    for sym in (True, False):
        original = grouped_qparams(linear.weight.detach(), 3, 32, sym)
        default = quantize_layer("gptq", linear, x, bits=3, group_size=32, sym=sym)
        static = quantize_layer("gptq", linear, x, bits=3, group_size=32, sym=sym, static_groups=True)
        act = quantize_layer("gptq", linear, x, bits=3, group_size=32, sym=sym, group_order="act")
        assert default.perm is None and static.perm is None and act.perm is not None
        torch.testing.assert_close((static.scale, static.zero), original)
        assert not torch.allclose(default.scale, original[0])  # the first group reached is exact, later ones moved
        # the group GPTQ reaches first (it holds the largest diag(H)) still has its original weights then
        first = int(torch.argmax(torch.einsum("tk,tk->k", x, x))) // 32
        torch.testing.assert_close(default.scale[:, first], original[0][:, first])


def test_input_groups_beat_act_order_groups_on_unlike_channel_ranges():
    """What cost act-order groups 8 % at W3 g64 on SmolLM2 (o_proj, early down_proj): input channels come in blocks
    of unlike weight range (attention heads), and the act order interleaves them, so an act-order group pools large
    and small columns under one range. Groups of input channels keep each block's own range (here 0.68-0.75x the
    output error of act-order groups over three seeds)."""
    torch.manual_seed(7)
    k, gs = 256, 32
    linear = nn.Linear(k, 48, bias=False)
    linear.weight.data *= torch.tensor([2.0, 0.5]).repeat(k // gs // 2).repeat_interleave(gs)  # blocks of unlike range
    x = correlated_inputs(k, seed=13) * (torch.rand(k, generator=torch.Generator().manual_seed(14)) * 1.5 + 0.25)
    kw = dict(bits=3, group_size=gs, sym=False)
    by_input = quantize_layer("gptq", linear, x, **kw)
    by_act = quantize_layer("gptq", linear, x, group_order="act", **kw)
    assert output_error(linear, by_input, x) < 0.8 * output_error(linear, by_act, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_layer_is_solved_in_float32(dtype):
    """A bf16 / fp16 model's layer (issue 28: quantized in the checkpoint's dtype): its inputs are summed into a
    float32 H (the default hessian_dtype), within float32 rounding of the float64 sum of the same half values, where
    the same running sum kept in the half dtype is off by orders of magnitude more; and the whole solve runs in float32,
    so the codes and scales are exactly those of the float32 copy of the layer on the float32 copy of its inputs."""
    torch.manual_seed(3)
    k, t = 64, 4096
    linear = nn.Linear(k, 32, bias=False).to(dtype)
    x = correlated_inputs(k, t=t).to(dtype)
    method = get_method("gptq")(bits=4, group_size=16)
    state = method.new_state("layer", linear)
    half_sum, seen = torch.zeros(k, k, dtype=dtype), 0
    for chunk in x.split(512):
        state.add_batch(chunk)
        half_sum *= seen / (seen + len(chunk))  # HessianState's running mean, kept in the half dtype
        seen += len(chunk)
        half_sum.addmm_(chunk.t(), chunk, alpha=2.0 / seen)
    exact = 2.0 / t * x.double().t() @ x.double()

    def rel(a):
        return ((a.double() - exact).norm() / exact.norm()).item()

    assert state.hessian.dtype == torch.float32 and state.tokens == t
    assert rel(state.hessian) < 1e-6 and rel(half_sum) > 100 * rel(state.hessian)
    w, _, u = method.prepared(state, linear, "layer")
    assert w.dtype == u.dtype == torch.float32
    qw = method.quantize(state, linear, "layer")
    ref = nn.Linear(k, 32, bias=False)
    ref.weight.data = linear.weight.data.float()
    expected = quantize_layer("gptq", ref, x.float(), bits=4, group_size=16)
    assert torch.equal(qw.codes, expected.codes) and torch.equal(qw.scale, expected.scale)

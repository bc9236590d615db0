"""SmoothQuant's smoothing (tquant.calib.smoothing) on small hand-built blocks, against plain computations of the
module docstring: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (ties over GQA's KV channels), the columns of the
group times s, 1/s into the absorber (or divided at run time), and the float block unchanged. Written to kill the
mutants of tests/mutation.py that change a result."""
import pytest
import torch
from torch import nn

from tquant.calib import smoothing


class MLP(nn.Module):
    """x + down(act(up(norm(x)))): norm absorbs up's divisor, up absorbs down's when act is homogeneous (ReLU)."""

    def __init__(self, d=12, hidden=20, act=nn.ReLU, norm=nn.LayerNorm, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.norm, self.up, self.act, self.down = norm(d), nn.Linear(d, hidden), act(), nn.Linear(hidden, d)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 2.0)
            if getattr(self.norm, "bias", None) is not None:
                self.norm.bias.normal_()

    def forward(self, x, gain=1.0):
        return (x + self.down(self.act(self.up(self.norm(x)))) * gain,)


class Attn(nn.Module):
    """o_proj reads v_proj's channels repeated over rep query heads per KV head (HF's repeat_kv order)."""

    def __init__(self, d=10, kv_heads=2, rep=3, head_dim=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.kv_heads, self.rep, self.head_dim = kv_heads, rep, head_dim
        self.v_proj = nn.Linear(d, kv_heads * head_dim)
        self.o_proj = nn.Linear(kv_heads * rep * head_dim, d, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        v = self.v_proj(x).view(b, t, self.kv_heads, 1, self.head_dim)
        v = v.expand(b, t, self.kv_heads, self.rep, self.head_dim).reshape(b, t, -1)
        return self.o_proj(v)


def batches(d, n=3, seed=1, scale=None):
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(d) if scale is None else scale
    return [((torch.randn(2, 5, d, generator=g) * scale,), {}) for _ in range(n)]


def plain_scales(act_max, weights, alpha, index=None):
    """The docstring's s as Python floats, ties by an explicit loop over the channels sharing an index."""
    k = len(act_max)
    w_max = [max(abs(float(w.detach()[n, j])) for w in weights for n in range(w.shape[0])) for j in range(k)]
    a_max = [float(v) for v in act_max]
    if index is not None:
        idx = [int(i) for i in index]
        w_max = [max(w_max[c] for c in range(k) if idx[c] == idx[j]) for j in range(k)]
        a_max = [max(a_max[c] for c in range(k) if idx[c] == idx[j]) for j in range(k)]
    return torch.tensor([max(max(a, 1e-5) ** alpha / max(w, 1e-5) ** (1 - alpha), 1e-5)
                         for a, w in zip(a_max, w_max)])


def test_input_absmax_is_the_max_over_tokens_and_batches():
    block = MLP().double()
    inputs = [((a[0].double(),), k) for a, k in batches(12, scale=torch.linspace(0.1, 5, 12))]
    amax = smoothing.input_absmax(block, {"up": block.up, "down": block.down}, inputs)
    xs = [block.norm(a[0]).reshape(-1, 12) for a, _ in inputs]
    hs = [block.act(block.up(x)) for x in xs]
    assert set(amax) == {"up", "down"}
    for name, seen in (("up", xs), ("down", hs)):
        expected = torch.cat(seen).abs().amax(0).float()
        assert amax[name].dtype == torch.float32
        torch.testing.assert_close(amax[name], expected, rtol=0, atol=0)
    assert not block.up._forward_pre_hooks and not block.down._forward_pre_hooks  # the hooks are gone


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.85, 1.0])
def test_smoothing_scales_match_the_formula(alpha):
    g = torch.Generator().manual_seed(2)
    act = torch.rand(16, generator=g) * 4 + 0.01
    act[3] = 0.0  # a dead channel: clamped to 1e-5 before the power
    weights = [torch.randn(5, 16, generator=g), torch.randn(3, 16, generator=g) * 3]
    weights[0][:, 7] = 0.0
    weights[1][:, 7] = 0.0  # an all-zero column: w_max clamped to 1e-5
    weights[1][:, 9] *= 50  # the max over the group's weights comes from the second
    s = smoothing.smoothing_scales(act, weights, alpha)
    assert s.dtype == torch.float32 and s.shape == (16,)
    torch.testing.assert_close(s, plain_scales(act, weights, alpha), rtol=1e-5, atol=0)


def test_smoothing_scales_are_at_least_1e_5():
    act = torch.tensor([1e-6, 1e-5, 2.0, 1e-7])
    w = torch.tensor([[1e8, 1e4, 1e-3, 1e3]])
    s = smoothing.smoothing_scales(act, [w], 0.9)
    expected = plain_scales(act, [w], 0.9)
    assert s.min() >= 1e-5 and expected[0] == 1e-5  # the final clamp bites on channel 0
    torch.testing.assert_close(s, expected, rtol=1e-5, atol=0)


def test_smoothing_scales_with_an_index_tie_channels():
    g = torch.Generator().manual_seed(3)
    index = smoothing._gqa_index(24, 8, 4)  # 2 KV heads of 4 channels, 3 query heads each
    act = torch.rand(24, generator=g) + 0.1
    weights = [torch.randn(6, 24, generator=g)]
    s = smoothing.smoothing_scales(act, weights, 0.5, index)
    torch.testing.assert_close(s, plain_scales(act, weights, 0.5, index), rtol=1e-5, atol=0)
    for c in range(24):
        assert s[c] == s[int(index[c]) % 4 + 12 * (int(index[c]) // 4)]  # equal over the tied channels


def test_gqa_index_is_repeat_kv_order():
    for k, m, hd in ((24, 8, 4), (96, 32, 16), (12, 4, 2), (16, 8, 8)):
        rep = k // m
        expected = [kv_head * hd + d for kv_head in range(m // hd) for _ in range(rep) for d in range(hd)]
        assert smoothing._gqa_index(k, m, hd).tolist() == expected


@pytest.mark.parametrize("k,m,hd", [(24, 8, None), (24, 8, 0), (24, 24, 4), (24, 32, 4), (24, 7, 1), (24, 6, 4),
                                    (24, 12, 8)])
def test_gqa_index_is_none_where_channels_do_not_map(k, m, hd):
    assert smoothing._gqa_index(k, m, hd) is None


def test_gqa_index_of_a_single_head_dim_channel():
    assert smoothing._gqa_index(6, 2, 1).tolist() == [0, 0, 0, 1, 1, 1]  # head_dim 1: m % head_dim == 0


def test_channel_tensors():
    lin = nn.Linear(4, 6)
    assert [t is u for t, u in zip(smoothing._channel_tensors(lin, 6), (lin.weight, lin.bias))] == [True, True]
    assert smoothing._channel_tensors(lin, 4) == []  # its input size is not an output channel count
    nobias = nn.Linear(4, 6, bias=False)
    got = smoothing._channel_tensors(nobias, 6)
    assert len(got) == 1 and got[0] is nobias.weight
    ln = nn.LayerNorm(6)
    got = smoothing._channel_tensors(ln, 6)
    assert len(got) == 2 and got[0] is ln.weight and got[1] is ln.bias
    assert smoothing._channel_tensors(ln, 5) == []
    rms = nn.RMSNorm(6)
    got = smoothing._channel_tensors(rms, 6)
    assert len(got) == 1 and got[0] is rms.weight
    odd = nn.Module()
    odd.weight, odd.bias = nn.Parameter(torch.ones(6)), nn.Parameter(torch.ones(3))  # a bias of another shape
    got = smoothing._channel_tensors(odd, 6)
    assert len(got) == 1 and got[0] is odd.weight
    emb = nn.Embedding(6, 6)  # a 2-D weight that is not a linear's
    assert smoothing._channel_tensors(emb, 6) == []
    assert smoothing._channel_tensors(nn.ReLU(), 6) == []
    plain = nn.Module()
    plain.weight = torch.ones(6)  # a plain tensor attribute counts too
    assert len(smoothing._channel_tensors(plain, 6)) == 1


def test_scale_channels_multiplies_dim_0():
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    f = torch.rand(5, generator=g) + 0.5
    w0, b0 = w.clone(), b.clone()
    smoothing._scale_channels([w, b], f)
    torch.testing.assert_close(w, w0 * f[:, None], rtol=0, atol=0)
    torch.testing.assert_close(b, b0 * f, rtol=0, atol=0)


def test_restored_puts_values_back_even_after_an_error():
    t = torch.randn(4)
    saved = t.clone()
    with pytest.raises(RuntimeError, match="boom"), smoothing._restored([t]):
        t.mul_(3)
        raise RuntimeError("boom")
    assert torch.equal(t, saved)


def rel(out, reference):
    return ((out - reference).norm() / reference.norm()).item()


def block_out(block, inputs):
    with torch.no_grad():
        return torch.cat([smoothing.hidden(block(*a, **k)) for a, k in inputs])


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_find_absorber_picks_the_norm_and_the_relu_producer(norm):
    block = MLP(norm=norm)
    inputs = batches(12)
    before = {n: p.clone() for n, p in block.state_dict().items()}
    a = smoothing.find_absorber(block, [block.up], inputs)
    assert a is not None and a.module is block.norm and a.index is None
    a = smoothing.find_absorber(block, [block.down], inputs)
    assert a is not None and a.module is block.up and a.index is None
    for n, p in block.state_dict().items():  # the block itself was not touched
        assert torch.equal(p, before[n]), n


def test_find_absorber_finds_none_behind_silu():
    block = MLP(act=nn.SiLU)
    assert smoothing.find_absorber(block, [block.down], batches(12)) is None


def test_find_absorber_ties_gqa_channels_only_when_asked():
    block = Attn()
    inputs = batches(10)
    assert smoothing.find_absorber(block, [block.o_proj], inputs) is None
    a = smoothing.find_absorber(block, [block.o_proj], inputs, tied=True)
    assert a is not None and a.module is block.v_proj
    assert a.index.tolist() == smoothing._gqa_index(24, 8, 4).tolist()


def test_find_absorber_prefers_the_exact_module():
    """hidden = d: the norm has as many channels as down's input and is tried too, but only up (ReLU) is exact."""
    block = MLP(d=12, hidden=12)
    a = smoothing.find_absorber(block, [block.down], batches(12))
    assert a.module is block.up


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.8])
def test_smoothed_group_with_an_absorber_keeps_the_block(alpha):
    block = MLP().double()
    inputs = [((a[0].double(),), k) for a, k in batches(12, scale=torch.linspace(0.2, 8, 12))]
    reference = block_out(block, inputs)
    act = smoothing.input_absmax(block, {"up": block.up}, inputs)["up"]
    up_w, ln_w, ln_b = block.up.weight.clone(), block.norm.weight.clone(), block.norm.bias.clone()
    sg = smoothing.SmoothedGroup([block.up], smoothing.Absorber(block.norm), act, alpha)
    s = plain_scales(act, [up_w], alpha).double()
    torch.testing.assert_close(sg.s.double(), s, rtol=1e-5, atol=0)
    assert sg.runtime is None and not block.up._forward_pre_hooks
    torch.testing.assert_close(block.up.weight, up_w * sg.s.double(), rtol=1e-12, atol=0)
    torch.testing.assert_close(block.norm.weight, ln_w / sg.s.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(block.norm.bias, ln_b / sg.s.double(), rtol=1e-6, atol=0)
    assert rel(block_out(block, inputs), reference) < 1e-6
    sg.undo()
    assert torch.equal(block.up.weight, up_w) and torch.equal(block.norm.weight, ln_w)
    assert torch.equal(block.norm.bias, ln_b)


def test_smoothed_group_at_run_time_divides_the_input():
    block = MLP(act=nn.SiLU).double()
    g = torch.Generator().manual_seed(5)
    extra = nn.Linear(20, 7).double()  # a second linear reading down's input: one group of two
    inputs = [((a[0].double(),), k) for a, k in batches(12)]
    h = block.act(block.up(block.norm(inputs[0][0][0])))
    act = torch.rand(20, generator=g) * 3 + 0.1
    down_w, extra_w = block.down.weight.clone(), extra.weight.clone()
    with torch.no_grad():
        ref_down, ref_extra = block.down(h), extra(h)
    sg = smoothing.SmoothedGroup([block.down, extra], None, act, 0.5)
    s = plain_scales(act, [down_w, extra_w], 0.5)
    torch.testing.assert_close(sg.s, s, rtol=1e-5, atol=0)
    assert sg.runtime is sg.s
    torch.testing.assert_close(block.down.weight, down_w * sg.s.double(), rtol=1e-12, atol=0)
    torch.testing.assert_close(extra.weight, extra_w * sg.s.double(), rtol=1e-12, atol=0)
    with torch.no_grad():  # the pre-hook divides by s: the outputs stay
        torch.testing.assert_close(block.down(h), ref_down, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(extra(h), ref_extra, rtol=1e-10, atol=1e-10)
    sg.undo()
    assert not block.down._forward_pre_hooks and not extra._forward_pre_hooks
    assert torch.equal(block.down.weight, down_w) and torch.equal(extra.weight, extra_w)


def test_smoothed_group_tied_into_v_proj():
    block = Attn().double()
    inputs = [((a[0].double(),), k) for a, k in batches(10)]
    reference = block_out(block, inputs)
    act = smoothing.input_absmax(block, {"o": block.o_proj}, inputs)["o"]
    index = smoothing._gqa_index(24, 8, 4)
    v_w, v_b, o_w = block.v_proj.weight.clone(), block.v_proj.bias.clone(), block.o_proj.weight.clone()
    sg = smoothing.SmoothedGroup([block.o_proj], smoothing.Absorber(block.v_proj, index), act, 0.5)
    s = plain_scales(act, [o_w], 0.5, index).double()
    torch.testing.assert_close(sg.s.double(), s, rtol=1e-5, atol=0)
    own = torch.stack([sg.s[(index == c).nonzero()[0, 0]] for c in range(8)]).double()  # one s per KV channel
    torch.testing.assert_close(block.v_proj.weight, v_w / own[:, None], rtol=1e-6, atol=0)
    torch.testing.assert_close(block.v_proj.bias, v_b / own, rtol=1e-6, atol=0)
    torch.testing.assert_close(block.o_proj.weight, o_w * sg.s.double(), rtol=1e-12, atol=0)
    assert rel(block_out(block, inputs), reference) < 1e-6
    assert sg.runtime is None


def test_tie_is_the_max_over_channels_sharing_an_index():
    """Over signed values too (smoothing passes maxima of |.|, but _tie is a plain grouped max)."""
    g = torch.Generator().manual_seed(6)
    index = torch.tensor([2, 0, 2, 1, 0, 2, 1, 1])
    v = -torch.rand(8, generator=g) - 0.1  # all negative: a max that started from 0 would show
    v[3] = 0.7
    expected = [max(float(v[c]) for c in range(8) if index[c] == index[j]) for j in range(8)]
    assert smoothing._tie(v, index).tolist() == pytest.approx(expected, abs=0)
    assert smoothing._tie(v, None) is v


def test_run_time_smoothing_keeps_a_bfloat16_layer_in_bfloat16():
    """The pre-hook divides a bf16 input by s in bf16: the linear still gets its own dtype."""
    lin = nn.Linear(16, 6).to(torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(3, 16, generator=g) * torch.linspace(0.1, 10, 16)).to(torch.bfloat16)
    with torch.no_grad():
        reference = lin(x).float()
    act = x.float().abs().amax(0)
    sg = smoothing.SmoothedGroup([lin], None, act, 0.5)
    with torch.no_grad():
        out = lin(x)
    assert out.dtype == torch.bfloat16 and lin.weight.dtype == torch.bfloat16
    assert rel(out.float(), reference) < 2e-2
    sg.undo()

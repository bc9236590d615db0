"""GPTQ's algorithm pinned against a plain reference of the module docstring: H = 2/T X^T X with dead channels set to 1,
damping percdamp * mean(diag H), U = chol(H^-1)^T, then one column at a time in act order, e = (w_k - q_k) / U_kk and
W[:, k+1:] -= e U_k,k+1: at once (no lazy batches), each group's (scale, zero) from its current columns when GPTQ reaches
its first one (or from the original weights with static_groups). Random odd shapes, every width, group size and order,
batches that split groups; float64 so the codes must agree exactly. Written to kill the mutants of tests/mutation.py
that change a result."""
import dataclasses
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tquant.formats.quantizer import channel_scale_for_groups, dequantize, integer_group_scales, qparams, quantize
from tquant.methods import get_method
from tquant.methods.gptq import GPTQ, HessianState, error_feedback


@dataclasses.dataclass
class IntegerGroupsGPTQ(GPTQ):
    """GPTQ with QQQ's integer group scales (QQQ itself adds smoothing and a W4A8 format)."""
    integer_groups: ClassVar[bool] = True


def case(n, k, seed, dead=True):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=False)
    linear.weight.data = torch.randn(n, k, generator=g) * (torch.rand(n, 1, generator=g) + 0.2)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(300, k, generator=g) @ mix + 0.2 * torch.randn(300, k, generator=g)
    x = x * (torch.rand(k, generator=g) * 2 + 0.1)  # unlike channel scales: a nontrivial act order
    if dead:
        x[:, int(torch.randint(0, k, (1,), generator=g))] = 0  # a dead input channel: diag H = 0
    return linear, x


def ref_gptq(w, x, bits, gs, sym, act_order, static_groups, group_order, percdamp, integer_groups=False):
    w = w.double().clone()
    n, k = w.shape
    gs = k if gs == -1 else gs
    h = 2 / len(x) * x.double().t() @ x.double()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    original = w.clone()
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h = h + percdamp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    act_groups = act_order and group_order == "act" and gs != k
    group_of = [j // gs if act_groups else int(perm[j]) // gs for j in range(k)]
    position = {int(c): j for j, c in enumerate(perm)}
    members = [list(range(g * gs, (g + 1) * gs)) if act_groups else [position[c] for c in range(g * gs, (g + 1) * gs)]
               for g in range(k // gs)]
    channel = channel_scale_for_groups(qparams(w, bits, sym)[0][:, None]) if integer_groups and gs != k else None
    scale, zero = torch.zeros(n, k // gs), torch.zeros(n, k // gs)
    if static_groups and gs != k:
        source = w if act_groups else original
        for g in range(k // gs):
            scale[:, g], zero[:, g] = qparams(source[:, g * gs:(g + 1) * gs], bits, sym)
            if channel is not None:
                scale[:, g] = integer_group_scales(scale[:, g], channel)
    started = set()
    codes = torch.zeros(n, k, dtype=torch.int32)
    for j in range(k):
        g = group_of[j]
        if gs == k and j == 0:
            scale[:, 0], zero[:, 0] = qparams(w, bits, sym)
        elif gs != k and not static_groups and g not in started:
            started.add(g)
            scale[:, g], zero[:, g] = qparams(w[:, members[g]], bits, sym)
            if channel is not None:
                scale[:, g] = integer_group_scales(scale[:, g], channel)
        q = quantize(w[:, j], scale[:, g], zero[:, g], bits)
        codes[:, j] = q
        e = (w[:, j] - dequantize(q, scale[:, g], zero[:, g]).double()) / u[j, j]
        w[:, j:] -= e[:, None] * u[j, j:][None, :]
    if not act_groups:
        codes = codes[:, torch.argsort(perm)]  # back to input order
    return codes, scale, zero, (perm if act_groups else None), channel


def run(method, linear, x, chunks=(0.3, 0.7)):
    state = method.new_state("layer", linear)
    cuts = [0, *(int(c * len(x)) for c in chunks), len(x)]
    for a, b in zip(cuts, cuts[1:]):
        state.add_batch(x[a:b])
    return method.quantize(state, linear, "layer")


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(), n=st.integers(1, 6), groups=st.integers(1, 4),
       gs=st.sampled_from([-1, 4, 8, 12]), act_order=st.booleans(), static_groups=st.booleans(),
       group_order=st.sampled_from(["input", "act"]), blocksize=st.sampled_from([1, 5, 16, 128]),
       percdamp=st.sampled_from([0.01, 0.2, 0.0]), integer=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_gptq_is_the_reference_algorithm(bits, sym, n, groups, gs, act_order, static_groups, group_order, blocksize,
                                         percdamp, integer, seed):
    k = groups * (12 if gs == -1 else gs)
    linear, x = case(n, k, seed, dead=percdamp > 0)  # undamped: a dead channel's 1 on the diagonal is all H has there
    cls = IntegerGroupsGPTQ if integer else GPTQ
    method = cls(bits=bits, group_size=gs, sym=sym, act_order=act_order, static_groups=static_groups,
                 group_order=group_order, blocksize=blocksize, percdamp=percdamp, hessian_dtype="float64")
    qw = run(method, linear, x)
    codes, scale, zero, perm, channel = ref_gptq(linear.weight.detach(), x, bits, gs, sym, act_order, static_groups,
                                                 group_order, percdamp, integer)
    assert qw.bits == bits and qw.group_size == (k if gs == -1 else gs)
    assert qw.codes.dtype == torch.int32 and qw.scale.dtype == qw.zero.dtype == torch.float32
    assert torch.equal(qw.codes, codes)
    torch.testing.assert_close((qw.scale, qw.zero), (scale, zero), rtol=0, atol=0)
    assert (qw.perm is None) == (perm is None) and (perm is None or torch.equal(qw.perm, perm))
    assert (qw.channel_scale is None) == (channel is None)
    if channel is not None:
        torch.testing.assert_close(qw.channel_scale, channel, rtol=0, atol=0)


def test_the_default_options():
    m = GPTQ()
    assert (m.percdamp, m.blocksize, m.act_order, m.static_groups, m.group_order, m.hessian_dtype) == (
        0.01, 128, True, False, "input", "float32")
    linear, x = case(3, 24, 1)
    qw = run(GPTQ(bits=3, group_size=8), linear, x)
    codes, scale, zero, _, _ = ref_gptq(linear.weight.detach(), x.double(), 3, 8, m.sym, True, False, "input", 0.01)
    assert (qw.codes != codes).float().mean() < 0.05  # float32 H and solve: a few codes may round the other way


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_hessian_is_the_running_mean_of_2_x_xt(dtype):
    linear, x = case(2, 10, 3)
    state = GPTQ(hessian_dtype=dtype).new_state("layer", linear)
    assert state.hessian.dtype == getattr(torch, dtype) and state.tokens == 0 and not state.hessian.any()
    for a, b in ((0, 7), (7, 8), (8, 300)):
        state.add_batch(x[a:b].view(1, b - a, 10))
    assert state.tokens == 300
    expected = 2 / 300 * x.double().t() @ x.double()
    torch.testing.assert_close(state.hessian.double(), expected, rtol=1e-5 if dtype == "float32" else 1e-12,
                               atol=1e-6 if dtype == "float32" else 1e-12)


def test_prepared_zeroes_dead_channels_and_orders_by_diag_h():
    linear, x = case(3, 16, 4, dead=False)
    x[:, 5] = 0
    method = GPTQ(percdamp=0.05, hessian_dtype="float64")
    state = method.new_state("layer", linear)
    state.add_batch(x)
    w, perm, u = method.prepared(state, linear, "layer")
    h = 2 / 300 * x.double().t() @ x.double()
    h[5, 5] = 1
    assert torch.equal(perm, torch.argsort(h.diagonal(), descending=True))
    assert w.dtype == torch.float64 and not w[:, (perm == 5).nonzero().item()].any()
    ref_w = linear.weight.detach().double().clone()
    ref_w[:, 5] = 0
    assert torch.equal(w, ref_w[:, perm])
    hp = h[perm][:, perm] + 0.05 * h.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(u, torch.linalg.cholesky(torch.linalg.inv(hp), upper=True), rtol=1e-9, atol=1e-12)
    assert not torch.equal(state.hessian[5, 5], torch.tensor(1.0, dtype=torch.float64))  # the state is not changed
    w2, perm2, _ = GPTQ(act_order=False).prepared(state, linear, "layer")
    assert perm2 is None and w2.dtype == torch.float64


def test_inverse_cholesky_damps_relative_to_mean_diag_h():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(8, 8, generator=g, dtype=torch.float64)
    h = a @ a.t() + torch.diag(torch.rand(8, generator=g, dtype=torch.float64))
    for percdamp in (0.0, 0.01, 0.5):
        u = GPTQ(percdamp=percdamp)._inverse_cholesky(h.clone(), "l")  # it overwrites its argument
        damped = h + percdamp * h.diagonal().mean() * torch.eye(8, dtype=torch.float64)
        torch.testing.assert_close(u, torch.linalg.cholesky(torch.linalg.inv(damped), upper=True), rtol=1e-9,
                                   atol=1e-12)
        assert torch.equal(torch.triu(u), u)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 4), k=st.integers(1, 40), blocksize=st.integers(1, 50), width=st.integers(1, 12),
       seed=st.integers(0, 2**31 - 1))
def test_error_feedback_and_upcoming_are_blocksize_free(n, k, blocksize, width, seed):
    """The column callback sees every column with all earlier errors applied, and upcoming(width) / upcoming(positions)
    the error-updated columns ahead, whatever the batch; the callback runs on one CPU thread, restored after."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, k, generator=g, dtype=torch.float64)
    a = torch.randn(k, k, generator=g, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(a @ a.t() + k * torch.eye(k, dtype=torch.float64)), upper=True)
    outer = torch.get_num_threads()
    torch.set_num_threads(2)  # the loop must drop to one thread and come back to 2
    threads = torch.get_num_threads()

    def trace(bs):
        w, seen = w0.clone(), []

        def column(col, current, upcoming):
            ahead = torch.arange(col, k).flip(0)[:width]  # positions, in any order
            seen.append((current.clone(), upcoming(min(width, k - col)).clone(), upcoming(ahead).clone(),
                         torch.get_num_threads()))
            return torch.round(current * 3) / 3

        error_feedback(w, u, bs, column)
        return w, seen

    try:
        _, ref_seen = trace(1)
        _, seen = trace(blocksize)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(outer)
    for (c, up, pos, t), (rc, rup, rpos, _) in zip(seen, ref_seen):
        torch.testing.assert_close((c, up, pos), (rc, rup, rpos), rtol=1e-10, atol=1e-10)
        assert t == 1 and threads == 2
    # the reference: one column at a time, the whole rest updated at once
    w = w0.clone()
    for j in range(k):
        ahead = torch.arange(j, k).flip(0)[:width]
        torch.testing.assert_close((seen[j][0], seen[j][1], seen[j][2]),
                                   (w[:, j], w[:, j:j + min(width, k - j)], w[:, ahead]), rtol=1e-10, atol=1e-10)
        e = (w[:, j] - torch.round(w[:, j] * 3) / 3) / u[j, j]
        w[:, j:] -= e[:, None] * u[j, j:][None, :]


def test_option_errors():
    for kw, message in ((dict(percdamp=-0.01), "percdamp must be a finite number >= 0, got -0.01"),
                        (dict(percdamp=float("inf")), "percdamp must be a finite number >= 0, got inf"),
                        (dict(percdamp=float("nan")), "percdamp must be a finite number >= 0, got nan"),
                        (dict(blocksize=0), "blocksize must be positive, got 0"),
                        (dict(group_order="acts"), "group_order must be 'input' or 'act', got 'acts'"),
                        (dict(hessian_dtype="bf16"), "hessian_dtype must be one of ['float32', 'float64'], got 'bf16'")):
        with pytest.raises(ValueError) as e:
            GPTQ(**kw)
        assert str(e.value) == message
    GPTQ(percdamp=0.0, blocksize=1)
    linear = nn.Linear(8, 2)
    with pytest.raises(ValueError, match=r"^GPTQ: layer 'blk\.0' saw no calibration data$"):
        GPTQ().prepared(GPTQ().new_state("blk.0", linear), linear, "blk.0")
    with pytest.raises(ValueError) as e:
        GPTQ(percdamp=0.0)._inverse_cholesky(torch.ones(4, 4), "blk.1")
    assert str(e.value) == ("GPTQ: the Hessian of layer 'blk.1' is not positive definite even with percdamp=0.0; raise "
                            "percdamp or use more calibration data")
    assert get_method("gptq") is GPTQ and GPTQ.name == "gptq"


def test_error_feedback_stays_on_the_weights_device():
    """Its buffers are made on w's device (meta stands in for CUDA here: writing a meta column into a CPU buffer
    raises)."""
    w = torch.empty(3, 10, dtype=torch.float64, device="meta")
    u = torch.empty(10, 10, dtype=torch.float64, device="meta")
    seen = []
    error_feedback(w, u, 4, lambda col, current, upcoming: seen.append(upcoming(3).device.type) or current)
    assert seen == ["meta"] * 10


def test_hessian_and_inverse_stay_on_the_weights_device():
    """HessianState's H on the linear's device, a batch from elsewhere moved there; the inverse Cholesky's identity
    made on H's device (meta stands in for CUDA: a CPU operand would give a CPU result or raise)."""
    linear = nn.Linear(6, 2, device="meta")
    state = GPTQ().new_state("blk.0", linear)
    assert isinstance(state, HessianState) and state.linear is linear and state.name == "blk.0"
    assert state.hessian.device.type == "meta"
    state.add_batch(torch.randn(5, 6))
    assert state.hessian.device.type == "meta" and state.tokens == 5
    u = GPTQ()._inverse_cholesky(torch.empty(6, 6, dtype=torch.float64, device="meta"), "blk.0")
    assert u.device.type == "meta" and u.shape == (6, 6)


class SquareAllocations(TorchDispatchMode):
    """Counts the k x k tensors that the ops run inside it return in new memory: an output whose storage is none of
    the op's (live) inputs' storages, so neither a view nor an out= buffer."""

    def __init__(self, k):
        super().__init__()
        self.k, self.new = k, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        self.new += sum(isinstance(t, torch.Tensor) and t.shape == (self.k, self.k) and
                        t.untyped_storage().data_ptr() not in inputs for t in tree_leaves(out))
        return out


def test_inverse_cholesky_allocates_two_k_by_k_matrices():
    """Its memory bound (the docstring): the caller's h holds L afterwards, and besides h only two K x K matrices are
    made (the identity L^-1 is solved into, and L^-T L^-1, into which U is factored); each step's result written into
    a new matrix instead would hold a third (6.4 instead of 3.4 K x K matrices in prepared, commit 2a40744)."""
    k = 12
    g = torch.Generator().manual_seed(6)
    a = torch.randn(k, k, generator=g, dtype=torch.float64)
    h = a @ a.t() + torch.eye(k, dtype=torch.float64)
    work = h.clone()
    with SquareAllocations(k) as seen:
        u = GPTQ(percdamp=0.1)._inverse_cholesky(work, "l")
    damped = h + 0.1 * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(work, torch.linalg.cholesky(damped), rtol=1e-12, atol=1e-12)  # L, in h
    torch.testing.assert_close(u, torch.linalg.cholesky(torch.linalg.inv(damped), upper=True), rtol=1e-9, atol=1e-12)
    assert seen.new == 2


def test_refusals_inside_quantize_name_the_layer():
    """The errors raised below quantize (no data, a Hessian that is not positive definite, a group size that does not
    divide K) name the layer quantize was given."""
    linear = nn.Linear(12, 2)
    with pytest.raises(ValueError, match=r"^GPTQ: layer 'blk\.4' saw no calibration data$"):
        GPTQ().quantize(GPTQ().new_state("blk.4", linear), linear, "blk.4")
    state = GPTQ(hessian_dtype="float64").new_state("blk.5", linear)
    state.add_batch(torch.randn(3, 12))
    state.hessian = torch.ones(12, 12, dtype=torch.float64) * 2 - torch.eye(12, dtype=torch.float64)  # eigenvalue -1
    with pytest.raises(ValueError, match=r"^GPTQ: the Hessian of layer 'blk\.5' is not positive definite"):
        GPTQ(percdamp=0.0, hessian_dtype="float64").quantize(state, linear, "blk.5")
    state.hessian = torch.eye(12, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"group_size=5 does not divide in_features=12 of layer 'blk\.5'"):
        GPTQ(group_size=5, hessian_dtype="float64").quantize(state, linear, "blk.5")


def test_the_format_does_not_follow_torchs_default_dtype():
    """int32 codes and float32 scales and zeros (QuantizedWeight's format) also where torch's default dtype is
    float64."""
    linear, x = case(2, 16, 7)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for gs in (8, -1):
            qw = run(GPTQ(bits=4, group_size=gs, hessian_dtype="float64"), linear, x)
            assert qw.codes.dtype == torch.int32 and qw.scale.dtype == qw.zero.dtype == torch.float32
    finally:
        torch.set_default_dtype(default)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gptq_on_cuda_gives_the_cpu_result_on_cuda():
    """On a GPU every buffer of the column loop and every returned tensor is on the weights' device (the CPU cannot
    tell: a CPU buffer there takes the same values), with the CPU's result in float64 (H summed in another order:
    a code at a rounding tie may flip)."""
    linear, x = case(5, 48, 8)
    for options in (dict(group_size=8), dict(group_size=8, static_groups=True), dict(group_size=16, group_order="act"),
                    dict(group_size=-1)):
        method = GPTQ(bits=3, blocksize=20, hessian_dtype="float64", **options)
        cpu = run(method, linear, x)
        gpu = run(method, linear.cuda(), x.cuda())
        linear.cpu()
        for name in ("codes", "scale", "zero", "perm"):
            got, want = getattr(gpu, name), getattr(cpu, name)
            assert (got is None) == (want is None)
            if got is not None:
                assert got.device.type == "cuda", name
                if name == "codes":
                    assert (got.cpu() != want).float().mean() < 0.01
                else:
                    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=0)

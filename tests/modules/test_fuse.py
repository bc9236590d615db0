"""fuse_linears: the fused module's output is the parts' outputs side by side (float and packed, kernel and torch
paths), the parts become views of its tensors and still compute what they computed, and parts that cannot share a
module are refused with None and left as they were."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from tests.kernel_device import DEVICE, needs_backend
from tquant.formats.weights import QuantizedWeight
from tquant.modules import PackedLinear
from tquant.modules.fuse import fuse_linears


def packed(n, k, bits, gs, g, bias=False, perm=None, dtype=torch.float32):
    qw = QuantizedWeight.from_rtn(torch.randn(n, k, generator=g), bits, gs, sym=False)
    qw.perm = perm
    return PackedLinear.from_quantized(qw, torch.randn(n, generator=g) if bias else None, dtype).to(DEVICE)


def shares_storage(part: torch.Tensor, whole: torch.Tensor) -> bool:
    return part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()


@pytest.mark.parametrize("bias", [False, True])
def test_float_parts_fuse_into_one_linear(bias):
    g = torch.Generator().manual_seed(1)
    parts = [nn.Linear(24, n, bias=bias) for n in (24, 8, 8)]
    for p in parts:
        nn.init.normal_(p.weight, generator=g)
    x = torch.randn(3, 5, 24, generator=g)
    before = [p(x) for p in parts]
    fused = fuse_linears(parts)
    assert fused.split_sizes == [24, 8, 8]
    # one matmul against three: the CPU's BLAS may sum the 24 products in another order (an AVX-512 EPYC does), so
    # the bound is float32 rounding of the sum of |products| (Higham's gamma_K), not a fixed 1e-6
    w = torch.cat([p.weight for p in parts])
    bound = 2 * 24 * torch.finfo(torch.float32).eps * (x.abs() @ w.abs().t() + (fused.bias.abs() if bias else 0))
    assert ((fused(x) - torch.cat(before, -1)).abs() <= bound).all()
    for p, y in zip(parts, before):
        assert shares_storage(p.weight, fused.weight) and p.weight.is_contiguous()
        assert torch.equal(p(x), y)


@needs_backend
@settings(max_examples=6, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), gs=st.sampled_from([16, 48]), ns=st.sampled_from([(40, 8, 8), (24, 56)]),
       bias=st.booleans(), perm=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_kernels_packed_parts_fuse_and_stay_views(bits, gs, ns, bias, perm, dtype, seed):
    """Kernel path of the fused module (reading its [K/epw, sum N] tensors) and of each part (reading its column view
    of them in place) against the parts' own outputs before fusing."""
    g = torch.Generator().manual_seed(seed)
    k = 96
    order = torch.randperm(k, generator=g).to(torch.int32) if perm else None
    parts = [packed(n, k, bits, gs, g, bias, order, dtype) for n in ns]
    x = torch.randn(2, k, generator=g).to(DEVICE, dtype)
    for p in parts:
        p.backend = "torch"
    before = [p(x) for p in parts]
    fused = fuse_linears(parts)
    assert fused is not None and fused.split_sizes == list(ns)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    ref = torch.cat(before, -1).float()
    for backend in ("torch", "triton"):
        fused.backend = backend
        for p in parts:
            p.backend = backend
        scale = ref.abs().max().item()
        torch.testing.assert_close(fused(x).float(), ref, rtol=tol, atol=tol * scale)
        torch.testing.assert_close(torch.cat([p(x) for p in parts], -1).float(), ref, rtol=tol, atol=tol * scale)
    for p in parts:
        for name in ("qweight", "scales", "zeros"):
            assert shares_storage(getattr(p, name), getattr(fused, name))
        assert p.qweight.stride(0) == sum(ns)


def test_kernels_weight_only_matmul_reads_column_views_in_place():
    from tquant.kernels.weight_only_matmul import row_strided

    whole = [torch.zeros(6, 10, dtype=torch.int32), torch.zeros(2, 10), torch.zeros(2, 10)]
    views = [t[:, 3:7] for t in whole]
    assert all(a is b for a, b in zip(row_strided(*views), views))
    copied = row_strided(views[0], views[1], views[2].contiguous())  # scales and zeros of two layouts
    assert copied[1].is_contiguous() and copied[2].is_contiguous()


class NoBias(nn.Module):
    """A linear-like layer of another library without a `bias` attribute (as gemlite's layers)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))


@pytest.mark.parametrize("case", ["bits", "group", "bias", "perm", "types", "one", "no bias attribute"])
def test_parts_that_differ_do_not_fuse(case):
    g = torch.Generator().manual_seed(2)
    a = packed(16, 32, 4, 16, g)
    b = {"bits": lambda: packed(8, 32, 3, 16, g), "group": lambda: packed(8, 32, 4, 32, g),
         "bias": lambda: packed(8, 32, 4, 16, g, bias=True),
         "perm": lambda: packed(8, 32, 4, 16, g, perm=torch.randperm(32, generator=g).to(torch.int32)),
         "types": lambda: nn.Linear(32, 8).to(DEVICE), "one": lambda: None, "no bias attribute": NoBias}[case]()
    parts = [a] if b is None else [a, b]
    saved = [{n: t.clone() for n, t in p.state_dict().items()} for p in parts]
    assert fuse_linears(parts) is None
    for p, s in zip(parts, saved):
        assert p.state_dict().keys() == s.keys() and all(torch.equal(p.state_dict()[n], s[n]) for n in s)
        assert all(t.is_contiguous() for t in p.state_dict().values())

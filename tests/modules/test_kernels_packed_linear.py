"""PackedLinear's Triton path (under the interpreter on the CPU) against its torch path and a dense linear."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tquant.modules import PackedLinear
from tquant.formats.weights import QuantizedWeight
from tests.kernel_device import DEVICE, needs_backend



@needs_backend
@settings(max_examples=12, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), lead=st.sampled_from([(1,), (3,), (2, 9)]), gs=st.sampled_from([16, 48]),
       perm=st.booleans(), bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_kernels_packed_linear_paths_agree(bits, lead, gs, perm, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 40, 96
    w = torch.randn(n, k, generator=g)
    qw = QuantizedWeight.from_rtn(w, bits, gs, sym=False)
    if perm:
        qw.perm = torch.randperm(k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    module = PackedLinear.from_quantized(qw, b, dtype).to(DEVICE)
    x = torch.randn(*lead, k, generator=g).to(DEVICE, dtype)
    module.backend = "triton"
    y_kernel = module(x)
    module.backend = "torch"
    y_ref = module(x)
    dense = (x.float().cpu() @ qw.dequantize().t() + (b if bias else 0)).to(DEVICE)
    assert y_kernel.shape == (*lead, n) and y_kernel.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y_kernel.float(), y_ref.float(), rtol=tol, atol=tol * dense.abs().max().item())
    torch.testing.assert_close(y_ref.float(), dense, rtol=tol, atol=tol * dense.abs().max().item())


def test_kernels_packed_linear_rejects_wrong_width():
    module = PackedLinear.from_quantized(QuantizedWeight.from_rtn(torch.randn(8, 32), 4, 16, sym=True), None, torch.float32)
    with pytest.raises(ValueError, match="expects last dim 32"):
        module(torch.randn(2, 31))
    module.backend = "cuda-please"
    with pytest.raises(ValueError, match="backend must be one of"):
        module(torch.randn(2, 32))

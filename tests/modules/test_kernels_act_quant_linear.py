"""ActQuantLinear: its Triton path against its torch path for every format (W8A8, W4A8 per-channel and
per-group, W4A8 with QoQ's zero points per group and per channel, W4A4, run-time smoothing, static scales), both
against the float math, and bad formats refused."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tquant.kernels.act_quant import fake_quantize_activations
from tquant.modules import ActQuantLinear
from tquant.formats.weights import QuantizedWeight
from tests.kernel_device import DEVICE, needs_backend

FORMATS = [(8, 8, 96, "qqq"), (4, 8, 96, "qqq"), (4, 8, 32, "qqq"), (4, 4, 96, "qqq"), (4, 4, 48, "qqq"),
           (4, 8, 32, "qoq"), (4, 8, 96, "qoq"), (4, 8, 32, "qoq-perm")]  # (bits, act_bits, group_size, grid)


def quantized(bits, act_bits, gs, grid, smooth, static, g, n=40, k=96):
    w = torch.randn(n, k, generator=g)
    perm = torch.randperm(k, generator=g) if grid == "qoq-perm" else None  # QoQ's reordering: columns x[..., perm]
    qw = QuantizedWeight.from_progressive(w if perm is None else w[:, perm], gs) if grid.startswith("qoq") else \
        QuantizedWeight.from_rtn(w, bits, gs, sym=True, integer_groups=True)
    qw.perm = perm
    qw.act_bits = act_bits
    qw.smooth = 10 ** (torch.rand(k, generator=g) - 0.5) if smooth else None
    qw.act_scale = torch.tensor([0.05]) if static else None
    return qw


@needs_backend
@settings(max_examples=16, deadline=None)
@given(fmt=st.sampled_from(FORMATS), lead=st.sampled_from([(1,), (3,), (2, 9)]), smooth=st.booleans(),
       static=st.booleans(), bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_kernels_act_quant_linear_paths_agree(fmt, lead, smooth, static, bias, dtype, seed):
    bits, act_bits, gs, grid = fmt
    g = torch.Generator().manual_seed(seed)
    qw = quantized(bits, act_bits, gs, grid, smooth, static, g)
    b = torch.randn(40, generator=g) if bias else None
    module = ActQuantLinear.from_quantized(qw, b, dtype).to(DEVICE)
    assert (module.group_zero is not None) == grid.startswith("qoq")
    assert (module.perm is not None) == (grid == "qoq-perm")
    x = torch.randn(*lead, 96, generator=g).to(dtype)
    module.backend = "triton"
    y_kernel = module(x.to(DEVICE))
    module.backend = "torch"
    y_ref = module(x.to(DEVICE))
    # float math: fake-quantized (smoothed) activations times the de-quantized (smoothed) weight
    xf = fake_quantize_activations(x.float().reshape(-1, 96), bits=act_bits, smooth=qw.smooth, scale=qw.act_scale)
    dense = (xf.double() @ qw.dequantize().double().t() + (b.double() if bias else 0)).reshape(*lead, 40)
    assert y_kernel.shape == (*lead, 40) and y_kernel.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    scale = dense.abs().max().item()
    torch.testing.assert_close(y_kernel.float().cpu(), y_ref.float().cpu(), rtol=tol, atol=tol * scale)
    torch.testing.assert_close(y_ref.double().cpu(), dense, rtol=tol, atol=tol * scale)


def test_kernels_act_quant_linear_refuses_bad_formats():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))  # a few seeds keep the group below in range
    qw = QuantizedWeight.from_rtn(w, 8, 32, sym=False)
    qw.act_bits = 8
    with pytest.raises(ValueError, match="symmetric"):
        ActQuantLinear.from_quantized(qw, None, torch.float32)
    w[0, :16] = torch.linspace(-1, 1, 16) * 127  # a group spanning [-127, 127]: beyond the protective range
    qw = QuantizedWeight.from_progressive(w, 16, protect=127)
    qw.act_bits = 8
    with pytest.raises(ValueError, match="outside int8"):
        ActQuantLinear.from_quantized(qw, None, torch.float32)
    qw = QuantizedWeight.from_rtn(w, 4, 16, sym=True)  # plain float group scales, not QQQ's grid
    qw.act_bits = 8
    with pytest.raises(ValueError, match="integer group scales"):
        ActQuantLinear.from_quantized(qw, None, torch.float32)
    qw = QuantizedWeight.from_rtn(w, 4, 32, sym=False)  # zero points on a float scale: no integer grid
    qw.act_bits = 8
    with pytest.raises(ValueError, match="integer group scales"):
        ActQuantLinear.from_quantized(qw, None, torch.float32)
    with pytest.raises(ValueError, match="W8A4 has no int8 GEMM"):
        ActQuantLinear(32, 8, bits=8, act_bits=4, group_size=32)
    with pytest.raises(ValueError, match="8-bit: per-channel only"):
        ActQuantLinear(32, 8, bits=8, act_bits=8, group_size=16)
    module = ActQuantLinear(32, 8, bits=4, act_bits=8, group_size=32)
    with pytest.raises(ValueError, match="expects last dim 32"):
        module(torch.randn(2, 31))

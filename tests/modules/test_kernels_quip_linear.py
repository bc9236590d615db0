"""QuipLinear's kernel path (Hadamard + E8P matmul kernels) against its torch reference."""
import pytest
import torch

from tquant.modules import QuipLinear
from tests.kernel_device import DEVICE, needs_backend

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def random_layer(k, n, bits, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mod = QuipLinear(k, n, bits=bits, bias=bias, dtype=dtype)
    mod.codes.copy_(torch.randint(-(1 << 15), 1 << 15, mod.codes.shape, generator=g))
    if bits == 3:
        mod.codes2.copy_(torch.randint(0, 256, mod.codes2.shape, generator=g))
    elif bits == 4:
        mod.codes2.copy_(torch.randint(-(1 << 15), 1 << 15, mod.codes2.shape, generator=g))
    mod.su.copy_(torch.randn(k, generator=g).sign())
    mod.sv.copy_(torch.randn(n, generator=g) * 0.05)
    if bias:
        mod.bias.copy_(torch.randn(n, generator=g))
    return mod.to(DEVICE)


@needs_backend
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k,n,m,dtype", [(96, 40, 1, torch.float16), (64, 24, 5, torch.float32),
                                           (96, 36, 3, torch.bfloat16)])
def test_quip_linear_kernels_match_reference(bits, k, n, m, dtype):
    mod = random_layer(k, n, bits, bias=m > 1, dtype=dtype, seed=bits * k + m)
    x = torch.randn(2, m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    mod.backend = "triton"
    y = mod(x)
    mod.backend = "torch"
    ref = mod(x)
    assert y.shape == ref.shape == (2, m, n) and y.dtype == dtype
    err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < TOL[dtype], err


"""Issue 28: models are quantized in their checkpoint's dtype (bf16 / fp16), so every quantized module must take and
give that dtype on both its paths. One layer per module type, quantized by its method from a half nn.Linear and half
inputs: the Triton path (under the interpreter on the CPU) and the torch path both return the layer's dtype and
agree."""
import pytest
import torch
from torch import nn

from tquant.methods import get_method
from tquant.modules import (ActQuantLinear, BCQLinear, BitPlaneLinear, PackedLinear, QuipLinear, SpQRLinear,
                            linear_module)
from tests.kernel_device import DEVICE, needs_backend

CASES = {  # method, options -> the module its weights become
    "rtn": (dict(bits=4, group_size=32), PackedLinear),
    "gptq": (dict(bits=3, group_size=32), PackedLinear),
    "smoothquant": (dict(), ActQuantLinear),
    "qqq": (dict(group_size=32), ActQuantLinear),
    "bcq": (dict(bits=3, group_size=32, grid="rtn"), BCQLinear),
    "spqr": (dict(bits=3, group_size=16), SpQRLinear),
    "abq": (dict(wbits=4, abits=16, group_size=32, lwc=False, let=False), BitPlaneLinear),
    "quip#": (dict(bits=2), QuipLinear),
}


@needs_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", list(CASES))
def test_kernels_modules_keep_a_half_dtype(method, dtype):
    options, module_type = CASES[method]
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(96, 64, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 96, generator=g) * 0.1)
    x = (torch.randn(4, 8, 96, generator=g) * torch.linspace(0.2, 3, 96)).to(dtype)
    chosen = get_method(method)(**options)
    state = chosen.new_state("layer", linear)
    state.add_batch(x)
    module = linear_module(chosen.quantize(state, linear, "layer"), linear.bias, dtype).to(DEVICE)
    assert type(module) is module_type and module.bias.dtype == dtype
    module.backend = "triton"
    y_kernel = module(x.to(DEVICE))
    module.backend = "torch"
    y_ref = module(x.to(DEVICE))
    assert y_kernel.dtype == y_ref.dtype == dtype and y_kernel.shape == (4, 8, 64)
    scale = y_ref.float().abs().max().item()
    torch.testing.assert_close(y_kernel.float(), y_ref.float(), rtol=3e-2, atol=3e-2 * scale)

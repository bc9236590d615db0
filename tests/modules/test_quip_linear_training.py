"""QuipLinear.trainable(): su, sv and the bias as parameters whose gradients are those of the dense layer
y = ((x * su) @ A^T) * sv + bias (A = H_N^T D H_K, D the decoded codes), buffers again after; with dense=True the
same function through the held A^T (rotated_back), equal to the transforms' order."""
import pytest
import torch

from tquant.formats import e8p_codebook
from tquant.formats.incoherence import unrotate_weight
from tquant.modules import QuipLinear
from tests.modules.test_kernels_quip_linear import random_layer


def dense(mod):
    """A [N, K] float64: the layer's weight with unit sign vectors."""
    stages = [mod.codes.t().long() & 0xFFFF]
    if mod.bits > 2:
        stages.append(mod.codes2.t().long() & (0xFF if mod.bits == 3 else 0xFFFF))
    d = e8p_codebook.rvq_decode(torch.stack(stages, dim=-1), mod.bits).reshape(mod.out_features, mod.in_features)
    return unrotate_weight(d.double(), torch.ones(mod.in_features, dtype=torch.float64),
                           torch.ones(mod.out_features, dtype=torch.float64))


@pytest.mark.parametrize("dense_order", [False, True], ids=["transforms", "dense"])
@pytest.mark.parametrize("bits,k,n", [(2, 96, 40), (3, 64, 24), (4, 24, 36)])
def test_trainable_gives_the_dense_layers_gradients(bits, k, n, dense_order):
    mod = random_layer(k, n, bits, True, torch.float32, seed=bits + k).cpu()  # the dense reference is on the CPU
    mod.backend = "triton"
    g = torch.Generator().manual_seed(n)
    x, r = torch.randn(3, 5, k, generator=g), torch.randn(3, 5, n, generator=g)
    su, sv, b = (t.clone().double().requires_grad_(True) for t in (mod.su, mod.sv, mod.bias))
    (((x.double() * su) @ dense(mod).t() * sv + b) * r).sum().backward()
    keys = list(mod.state_dict())
    with mod.trainable(dense=dense_order):
        assert mod.backend == "torch" and [n for n, _ in mod.named_parameters()] == ["su", "sv", "bias"]
        assert (mod._dense is not None) == dense_order
        (mod(x) * r).sum().backward()
        for mine, ref in ((mod.su, su), (mod.sv, sv), (mod.bias, b)):
            torch.testing.assert_close(mine.grad.double(), ref.grad, rtol=1e-4, atol=1e-4 * ref.grad.abs().max())
        with torch.no_grad():
            mod.su.mul_(0.75)
        tuned = mod.su.detach().clone()
    assert mod.backend == "triton" and list(mod.parameters()) == [] and list(mod.state_dict()) == keys
    assert mod._dense is None
    assert mod.su.dtype == torch.float32 and not mod.su.requires_grad and torch.equal(mod.su, tuned)


def test_trainable_without_bias_and_after_an_error():
    mod = QuipLinear(16, 8, bits=2, bias=False, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="inside"):
        with mod.trainable():
            assert [n for n, _ in mod.named_parameters()] == ["su", "sv"]
            raise RuntimeError("inside")
    assert mod.bias is None and list(mod.parameters()) == [] and set(mod._buffers) >= {"su", "sv"}
    assert mod.backend == "auto"


@pytest.mark.parametrize("bits,k,n,rows", [(2, 96, 40, 4096), (3, 64, 24, 24), (4, 24, 36, 16)])
def test_dense_order_equals_the_transforms(bits, k, n, rows):
    mod = random_layer(k, n, bits, True, torch.float32, seed=7 * bits + n).cpu()
    torch.testing.assert_close(mod.rotated_back(rows=rows).double(), dense(mod).t(), rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, 7, k, generator=g)
    with torch.no_grad():
        mod.su.mul_(torch.empty(k).uniform_(0.5, 1.5, generator=g))  # real-valued, as after tuning
    outputs = []
    for dense_order in (False, True):
        with mod.trainable(dense=dense_order):
            outputs.append(mod(x))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5 * outputs[0].abs().max().item())

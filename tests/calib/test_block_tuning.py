"""float32_training: float32 and grad only for the given parameters inside, every tensor's own dtype back after."""
import torch
from torch import nn

from tquant.calib.block_tuning import float32_training


class Mixed(nn.Module):
    """bf16 weights with a float32 buffer and a float32 parameter (as QuipLinear's signs in a half model)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 5, dtype=torch.bfloat16)
        self.norm = nn.LayerNorm(5, dtype=torch.bfloat16)
        self.signs = nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("table", torch.randn(5, generator=torch.Generator().manual_seed(1)))
        self.register_buffer("count", torch.tensor(3))

    def forward(self, x):
        return self.norm(self.linear(x * self.signs)) * self.table


def test_float32_training_restores_each_tensors_dtype_and_flags():
    block = Mixed()
    block.norm.bias.requires_grad_(False)
    before = {n: (t.dtype, t.requires_grad) for n, t in [*block.named_parameters(), *block.named_buffers()]}
    table = block.table.clone()
    with float32_training(block, [block.signs, block.norm.weight]):
        assert {t.dtype for t in block.parameters()} == {torch.float32} and block.table.dtype == torch.float32
        assert [n for n, p in block.named_parameters() if p.requires_grad] == ["signs", "norm.weight"]
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
        block(x).square().sum().backward()
        assert block.signs.grad is not None and block.linear.weight.grad is None
        with torch.no_grad():
            block.signs.mul_(1.5)
    after = {n: (t.dtype, t.requires_grad) for n, t in [*block.named_parameters(), *block.named_buffers()]}
    assert after == before
    assert torch.equal(block.table, table) and block.count.dtype == torch.int64


class RefusesFloat(Mixed):
    """As transformers' models loaded through a quantizer (the de-quantized GGUF file): .float() raises."""

    def float(self):
        raise ValueError("`.float()` is not supported for quantized model")


def test_float32_training_casts_a_model_that_refuses_float():
    block = RefusesFloat()
    with float32_training(block, [block.norm.weight]):
        assert block.linear.weight.dtype == torch.float32
    assert block.linear.weight.dtype == torch.bfloat16 and block.signs.dtype == torch.float32


def test_a_tensor_added_inside_gets_the_dtype_of_most_parameters():
    block = Mixed()
    with float32_training(block, [block.signs]):
        block.norm.register_buffer("added", torch.ones(5))  # float32 while inside, as everything
        block.linear.register_buffer("index", torch.arange(3))
    assert block.norm.added.dtype == torch.bfloat16 and block.linear.index.dtype == torch.int64
    assert block.table.dtype == torch.float32

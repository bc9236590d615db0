"""nn.Module replacements that hold packed tensors and call kernels."""
from .act_quant_linear import ActQuantLinear
from .packed_embedding import PackedEmbedding
from .packed_linear import PackedLinear

MODULE_TYPES = {"packed_linear": PackedLinear, "packed_embedding": PackedEmbedding,
                "act_quant_linear": ActQuantLinear}


def linear_module(qw, bias, dtype):
    """The module storing a method's QuantizedWeight: ActQuantLinear when it quantizes activations, else
    PackedLinear (weight-only)."""
    cls = PackedLinear if qw.act_bits is None else ActQuantLinear
    return cls.from_quantized(qw, bias, dtype)


__all__ = ["ActQuantLinear", "PackedEmbedding", "PackedLinear", "MODULE_TYPES", "linear_module"]

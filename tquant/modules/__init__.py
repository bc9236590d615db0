"""nn.Module replacements that hold packed tensors and call kernels."""
from ..qweight import LatticeWeight
from .act_quant_linear import ActQuantLinear
from .kv_cache import QuantizedKVCache
from .packed_embedding import PackedEmbedding
from .packed_linear import PackedLinear
from .quip_linear import QuipLinear

MODULE_TYPES = {"packed_linear": PackedLinear, "packed_embedding": PackedEmbedding,
                "act_quant_linear": ActQuantLinear, "quip_linear": QuipLinear}


def linear_module(qw, bias, dtype):
    """The module storing a method's weight: QuipLinear for lattice codes (LatticeWeight), ActQuantLinear
    when it quantizes activations, else PackedLinear (weight-only)."""
    if isinstance(qw, LatticeWeight):
        return QuipLinear.from_quantized(qw, bias, dtype)
    cls = PackedLinear if qw.act_bits is None else ActQuantLinear
    return cls.from_quantized(qw, bias, dtype)


__all__ = ["ActQuantLinear", "PackedEmbedding", "PackedLinear", "QuantizedKVCache", "QuipLinear", "MODULE_TYPES", "linear_module"]

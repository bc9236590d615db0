"""nn.Module replacements that hold packed tensors and call kernels."""
from ..formats.weights import BCQWeight, BitPlaneWeight, LatticeWeight, SpQRWeight
from .act_quant_linear import ActQuantLinear
from .bcq_linear import BCQLinear
from .bitplane_linear import BitPlaneLinear
from ..kv.cache import QuantizedKVCache
from .packed_embedding import PackedEmbedding
from .packed_linear import PackedLinear
from .quip_linear import QuipLinear
from .spqr_linear import SpQRLinear

MODULE_TYPES = {"packed_linear": PackedLinear, "packed_embedding": PackedEmbedding,
                "act_quant_linear": ActQuantLinear, "quip_linear": QuipLinear, "bcq_linear": BCQLinear,
                "spqr_linear": SpQRLinear, "bitplane_linear": BitPlaneLinear}


def linear_module(qw, bias, dtype):
    """The module storing a method's weight: QuipLinear for lattice codes (LatticeWeight), BCQLinear for binary
    codes (BCQWeight), SpQRLinear for SpQR's (SpQRWeight), BitPlaneLinear for bit-plane weights (BitPlaneWeight,
    ABQ-LLM), ActQuantLinear when it quantizes activations, else PackedLinear (weight-only)."""
    if isinstance(qw, LatticeWeight):
        return QuipLinear.from_quantized(qw, bias, dtype)
    if isinstance(qw, BCQWeight):
        return BCQLinear.from_quantized(qw, bias, dtype)
    if isinstance(qw, SpQRWeight):
        return SpQRLinear.from_quantized(qw, bias, dtype)
    if isinstance(qw, BitPlaneWeight):
        return BitPlaneLinear.from_quantized(qw, bias, dtype)
    cls = PackedLinear if qw.act_bits is None else ActQuantLinear
    return cls.from_quantized(qw, bias, dtype)


__all__ = ["ActQuantLinear", "BCQLinear", "BitPlaneLinear", "PackedEmbedding", "PackedLinear", "QuantizedKVCache", "QuipLinear", "SpQRLinear", "MODULE_TYPES", "linear_module"]

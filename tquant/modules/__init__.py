"""nn.Module replacements that hold packed tensors and call kernels.

Every quantized linear derives from QuantizedLinear (tquant.modules.base) and registers its spec type and the weight
class it stores: module_for_weight(qw) picks the module for a method's weight (linear_module builds it),
module_for_spec(spec) the one that rebuilds a saved layer (PackedEmbedding and PackedExperts, the mixture-of-experts
experts module, included)."""
from .base import QuantizedLinear, linear_module, module_for_spec, module_for_weight, register, spec_types
from .act_quant_linear import ActQuantLinear
from .bcq_linear import BCQLinear
from .bitplane_linear import BitPlaneLinear
from .fp8_linear import FP8Linear
from ..kv.cache import QuantizedKVCache
from .packed_embedding import PackedEmbedding
from .packed_experts import PackedExperts
from .packed_linear import PackedLinear
from .quip_linear import QuipLinear
from .spqr_linear import SpQRLinear

__all__ = ["ActQuantLinear", "BCQLinear", "BitPlaneLinear", "FP8Linear", "PackedEmbedding", "PackedExperts", "PackedLinear", "QuantizedKVCache",
           "QuantizedLinear", "QuipLinear", "SpQRLinear", "linear_module", "module_for_spec", "module_for_weight",
           "register", "spec_types"]

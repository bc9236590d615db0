"""nn.Module replacements that hold packed tensors and call kernels."""
from .packed_linear import PackedLinear

MODULE_TYPES = {"packed_linear": PackedLinear}

__all__ = ["PackedLinear", "MODULE_TYPES"]

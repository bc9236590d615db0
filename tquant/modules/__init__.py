"""nn.Module replacements that hold packed tensors and call kernels."""
from .packed_embedding import PackedEmbedding
from .packed_linear import PackedLinear

MODULE_TYPES = {"packed_linear": PackedLinear, "packed_embedding": PackedEmbedding}

__all__ = ["PackedEmbedding", "PackedLinear", "MODULE_TYPES"]

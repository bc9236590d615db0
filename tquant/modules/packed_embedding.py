"""PackedEmbedding: an nn.Embedding replacement with a 2/3/4/8-bit table, quantized per row.

The table E [V, H] is stored like a weight with N = V rows and K = H input channels (tquant.formats.packing):
    qweight int32 [ceil(H / (32 // bits)), V], scales [G, V], zeros [G, V], G = H // group_size
    E[v, h] = (code(h, v) - zeros[h // group_size, v]) * scales[h // group_size, v]
A lookup gathers the ids' columns and de-quantizes only those (plain torch: a gather, not a matmul).
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats.packing import dequantize_packed
from ..formats.weights import QuantizedWeight
from .base import DAMAGED, Check, build_checked, check_spec, register
from .packed_weight import check_grid, load_packed, register_packed


@register("packed_embedding")  # rebuilt by tquant.load; the driver builds it itself (not a linear)
class PackedEmbedding(nn.Module):
    def __init__(self, num_embeddings, embedding_dim, *, bits, group_size, padding_idx=None,
                 dtype=torch.float16, device=None):
        super().__init__()
        register_packed(self, embedding_dim, num_embeddings, bits=bits, group_size=group_size, dtype=dtype,
                        device=device, k_name="embedding_dim")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.padding_idx = bits, group_size, padding_idx

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, padding_idx, dtype) -> "PackedEmbedding":
        v, h = qw.codes.shape
        mod = cls(v, h, bits=qw.bits, group_size=qw.group_size, padding_idx=padding_idx, dtype=dtype,
                  device=qw.codes.device)
        load_packed(mod, qw)
        return mod

    def layer_spec(self) -> dict:
        return {"type": self.spec_type, "bits": self.bits, "group_size": self.group_size,
                "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype) -> "PackedEmbedding":
        return cls(spec["num_embeddings"], spec["embedding_dim"], bits=spec["bits"], group_size=spec["group_size"],
                   padding_idx=spec["padding_idx"], dtype=dtype, device="meta")

    @classmethod
    def check_spec(cls, name: str, spec: dict, dtype: torch.dtype) -> "PackedEmbedding":
        """from_spec of a saved spec, checked first (tquant.load; QuantizedLinear.check_spec's rules)."""
        check_spec(name, spec, ("bits", "group_size", "num_embeddings", "embedding_dim", "padding_idx"), {}, (),
                   optional=("padding_idx",))
        v, pad = spec["num_embeddings"], spec["padding_idx"]
        if v < 1 or spec["embedding_dim"] < 1 or (pad is not None and pad >= v):
            raise ValueError(f"{name}: layer spec num_embeddings={v}, embedding_dim={spec['embedding_dim']}, "
                             f"padding_idx={pad}: expected sizes >= 1 and padding_idx < num_embeddings: {DAMAGED}")
        return build_checked(cls, name, spec, dtype)

    def validate(self, name: str) -> None:
        """The saved tensors' dtypes, finite scales and every code's grid point finite in their dtype
        (QuantizedLinear.validate's rules, packed_weight.check_grid); ValueError naming them."""
        check = Check(name)
        check("qweight", self.qweight, torch.int32)
        check("scales", self.scales, "model")
        check("zeros", self.zeros, "model")
        check_grid(check, "qweight", self.qweight, self.scales, self.zeros, self.bits, self.group_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        cols = ids.reshape(-1)
        rows = dequantize_packed(self.qweight[:, cols], self.scales[:, cols], self.zeros[:, cols], self.bits,
                                 self.group_size, self.embedding_dim)  # [H, T] in fp32
        return rows.t().to(self.scales.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"

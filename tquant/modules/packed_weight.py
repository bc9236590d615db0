"""The packed-weight buffers every weight-only module holds, in tquant.formats.packing's layout:
    qweight int32 [ceil(K / (32 // bits)), N], scales [G, N], zeros [G, N] (float, G = K // group_size)."""
from __future__ import annotations

import torch
from torch import nn

from ..formats.packing import pack_codes, values_per_word
from ..formats.weights import QuantizedWeight


def register_packed(module: nn.Module, k: int, n: int, *, bits: int, group_size: int, dtype, device,
                    k_name: str = "in_features") -> None:
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide {k_name}={k}")
    rows, groups = -(-k // values_per_word(bits)), k // group_size
    module.register_buffer("qweight", torch.zeros(rows, n, dtype=torch.int32, device=device))
    module.register_buffer("scales", torch.zeros(groups, n, dtype=dtype, device=device))
    module.register_buffer("zeros", torch.zeros(groups, n, dtype=dtype, device=device))


def load_packed(module: nn.Module, qw: QuantizedWeight) -> None:
    """Fill the buffers from a method's codes [N, K], scale and zero [N, G]."""
    module.qweight.copy_(pack_codes(qw.codes, qw.bits))
    module.scales.copy_(qw.scale.t())
    module.zeros.copy_(qw.zero.t())

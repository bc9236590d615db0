"""One projection for several that read the same input (q / k / v, gate / up): one launch instead of two or three.

    fused = fuse_linears([q_proj, k_proj, v_proj])    # None where they cannot share one module
    q, k, v = fused(x).split(fused.split_sizes, dim=-1)

The fused module holds the concatenation of the parts' tensors along the output dimension N, and each part's tensors
become views into it (same memory as before; each part still computes its own output alone):
    nn.Linear     weight [sum N, K] (row blocks, each part's view contiguous), bias [sum N] if every part has one
    PackedLinear  qweight int32 [K / (32 / bits), sum N], scales / zeros [G, sum N] (column blocks: each part's view
                  has row stride sum N, which the weight-only kernels read as it is), perm shared, bias as above
Parts fuse when they are all nn.Linear, or all PackedLinear with one K, bits, group size, dtype, device, backend
and the same perm (the default GPTQ storage has none; act-order storage fuses when the parts' perms are equal, as
they are for layers quantized from one Hessian), and all or none have a bias.
"""
from __future__ import annotations

import torch
from torch import nn

from .packed_linear import PackedLinear


def _same(mods, attr) -> bool:
    first = getattr(mods[0], attr)
    return all(getattr(m, attr) == first for m in mods[1:])


def _share(parts, fused: torch.Tensor, dim: int) -> list[torch.Tensor]:
    """Views of fused, one per part, cut along dim at the parts' sizes."""
    return list(fused.split([p.shape[dim] for p in parts], dim=dim))


def _fuse_float(mods: list[nn.Linear]) -> nn.Linear:
    w = mods[0].weight
    fused = nn.Linear(w.shape[1], sum(m.out_features for m in mods), bias=mods[0].bias is not None,
                      dtype=w.dtype, device="meta")
    for name in ("weight", "bias"):
        parts = [getattr(m, name) for m in mods]
        if parts[0] is None:
            continue
        setattr(fused, name, nn.Parameter(torch.cat([p.data for p in parts]), requires_grad=parts[0].requires_grad))
        for m, view in zip(mods, _share(parts, getattr(fused, name).data, 0)):
            setattr(m, name, nn.Parameter(view, requires_grad=parts[0].requires_grad))
    return fused


def _fusable_packed(mods: list[PackedLinear]) -> bool:
    perms = [m.perm for m in mods]
    same_perm = all(p is None for p in perms) or (
        all(p is not None for p in perms) and all(torch.equal(perms[0], p) for p in perms[1:]))
    return (same_perm and all(_same(mods, a) for a in ("in_features", "bits", "group_size", "backend"))
            and len({(m.scales.dtype, m.qweight.device) for m in mods}) == 1)


def _fuse_packed(mods: list[PackedLinear]) -> PackedLinear:
    first = mods[0]
    fused = PackedLinear(first.in_features, sum(m.out_features for m in mods), bits=first.bits,
                         group_size=first.group_size, bias=first.bias is not None, has_perm=first.perm is not None,
                         dtype=first.scales.dtype, device="meta")
    fused.backend = first.backend
    for name, dim in (("qweight", 1), ("scales", 1), ("zeros", 1), ("bias", 0)):
        parts = [getattr(m, name) for m in mods]
        if parts[0] is None:
            continue
        whole = torch.cat(parts, dim=dim)
        setattr(fused, name, whole)
        for m, view in zip(mods, _share(parts, whole, dim)):
            setattr(m, name, view)
    if first.perm is not None:
        fused.perm = first.perm
    return fused


def fuse_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing torch.cat([m(x) for m in mods], -1), with `split_sizes` (each part's N) set on it; the
    parts' tensors become views of its tensors (module docstring). None, leaving the parts untouched, where they do
    not fuse (other module types, differing formats, bias on some parts only)."""
    floats, packed = (all(type(m) is kind for m in mods) for kind in (nn.Linear, PackedLinear))
    if len(mods) < 2 or not (floats or packed) or len({m.bias is None for m in mods}) != 1:
        return None  # other module types may have no `bias` at all (gemlite's layers)
    if floats and len({(m.in_features, m.weight.dtype, m.weight.device) for m in mods}) == 1:
        fused = _fuse_float(mods)
    elif packed and _fusable_packed(mods):
        fused = _fuse_packed(mods)
    else:
        return None
    fused.split_sizes = [m.out_features for m in mods]
    return fused.eval()

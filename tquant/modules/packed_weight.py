"""The packed-weight buffers every weight-only module holds, in tquant.formats.packing's layout:
    qweight int32 [ceil(K / (32 // bits)), N], scales [G, N], zeros [G, N] (float, G = K // group_size).

check_grid (tquant.load, through each module's validate): every code present names a grid point
(code - zeros) * scales that is a finite value of the scales' dtype, the one the kernels dequantize into."""
from __future__ import annotations

import torch
from torch import nn

from ..formats.packing import pack_codes, unpack_codes, values_per_word
from ..formats.quantizer import code_range_within_dtype
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


def check_grid(check, tensor: str, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               group_size: int) -> None:
    """Refuse (check.fail(tensor, ...), tensor naming qweight) a packed weight with a code whose grid point
    w = (code - zero) * scale passes M = torch.finfo(scales.dtype).max: the kernels would dequantize it to inf.
    qweight int32 [E..., ceil(K / epw), N], scales and zeros [E..., G, N] (leading dims: PackedExperts' experts,
    named tensor[e]), finite (checked before).
    Cheap: first the whole grid, max over groups of |scale| max(|zero|, |2^bits - 1 - zero|) <= M (one product
    and one reduction over scales, K / group_size of them per output); only when a group's grid passes M (a group
    near M, rare) does quantizer.code_range_within_dtype give per group the codes [lo, hi] within M (what the driver
    clamps codes to when quantizing, so a checkpoint tquant saved passes) and are the codes unpacked, and then per
    group only its extreme codes present, min and max over the group, are compared with lo and hi."""
    maxq = 2**bits - 1
    z, s = zeros.double(), scales.double().abs()  # |w| only depends on |scale|
    if (torch.maximum(z.abs(), (maxq - z).abs()) * s).amax() <= torch.finfo(scales.dtype).max:
        return  # every group's whole grid is inside (float64 products, exact for integer-valued zeros)
    lo, hi = code_range_within_dtype(s, z, bits, scales.dtype)
    short = (lo > 0) | (hi < maxq)
    if scales.dim() > 2:
        for e in short.flatten(1).any(dim=1).nonzero().flatten().tolist():
            check_grid(check, f"{tensor}[{e}]", qweight[e], scales[e], zeros[e], bits, group_size)
        return
    groups = scales.shape[0]
    cols = short.any(dim=0).nonzero().flatten()  # only the outputs with such a group are unpacked
    codes = unpack_codes(qweight[:, cols], bits, groups * group_size).view(groups, group_size, len(cols))
    cmin, cmax = codes.amin(dim=1).double(), codes.amax(dim=1).double()
    lo, hi, z, s = lo[:, cols], hi[:, cols], z[:, cols], scales[:, cols].double()
    bad = (cmin < lo) | (cmax > hi)
    if not bad.any():
        return
    code = torch.where((cmin - z).abs() > (cmax - z).abs(), cmin, cmax)  # the group's extreme code present
    peak = torch.where(bad, ((code - z) * s).abs(), torch.zeros_like(s))
    g, c = divmod(int(peak.flatten().argmax()), len(cols))
    w = (code[g, c] - z[g, c]) * s[g, c]
    check.fail(tensor, f"code {int(code[g, c])} names the grid point (code - zero {z[g, c].item():g}) * scale "
                       f"{s[g, c].item():.6g} = {w.item():.6g}, past {scales.dtype}'s largest value "
                       f"{torch.finfo(scales.dtype).max:.6g} (group {g} of output {int(cols[c])}, the largest such "
                       f"value; {int(bad.sum())} groups reach past it)")

"""Binary-coding quantization (BCQ, the format LUT-GEMM runs): the search, the uniform-grid conversion, and the
decoder.

A weight W [N, K] is split into groups of g input channels (g = K: per output channel). Each group w [g] of an
output row is approximated by q binary vectors b_i in {-1, +1}^g and scales alpha_i:
    w ~= sum_{i < q} alpha_i b_i + offset          (offset: LUT-GEMM's extension; 0 in plain BCQ)
Search (Xu et al. 2018, LUT-GEMM's reference search), all groups at once:
    greedy       (rounds = 0): r = w (- offset = mean w); for each i: b_i = sign(r), alpha_i = mean |r|,
                 r -= alpha_i b_i
    refined      (rounds = 1): greedy, then the alphas (and offset) refit by least squares on the fixed b_i
    alternating  (rounds >= 2): refined, then rounds - 1 times: every weight takes the nearest of the 2^q values
                 sum_i +-alpha_i (+ offset) (its b_i), then the alphas (and offset) are refit by least squares
The 2^q values of plain BCQ are symmetric about 0; the offset lets a group's levels follow an asymmetric range.
Uniform grids convert exactly: w = s (c - z) with c = sum_i 2^i u_i, u_i in {0, 1}; b_i = 2 u_i - 1 gives
    alpha_i = s 2^(i - 1),   offset = s ((2^q - 1) / 2 - z)
Tensors: alphas float32 [N, G, q], bits uint8 [q, N, K] (u_i: 1 where b_i = +1), offset float32 [N, G] or None.
"""
from __future__ import annotations

import torch

BCQ_BITS = (1, 2, 3, 4)


def check_bcq_bits(bits: int) -> None:
    if bits not in BCQ_BITS:
        raise ValueError(f"BCQ takes 1-4 binary planes, not bits={bits}")


def _signs(q: int, device) -> torch.Tensor:
    """All 2^q sign patterns [2^q, q]: row j has b_i = +1 where bit i of j is set."""
    j = torch.arange(2**q, device=device)[:, None]
    return ((j >> torch.arange(q, device=device)) & 1).float() * 2 - 1


def _refit(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Least-squares alphas [R, q] of groups w [R, g] on fixed signs b [R, g, q]: the normal equations
    (B^T B + eps I) a = B^T w with eps = 1e-6 g, so that planes that came out equal share their weight (a batched
    Cholesky solve; a pseudo-inverse takes one SVD a group, 50x slower)."""
    gram = b.transpose(1, 2) @ b
    gram.diagonal(dim1=1, dim2=2).add_(1e-6 * b.shape[1])
    return torch.cholesky_solve(b.transpose(1, 2) @ w[..., None], torch.linalg.cholesky(gram))[..., 0]


def _nearest_signs(w: torch.Tensor, alphas: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """Signs [R, g, q] giving each weight of w [R, g] the nearest of its group's 2^q values sum_i +-alpha_i
    (+ offset [R])."""
    patterns = _signs(alphas.shape[1], w.device)
    values = alphas @ patterns.T  # [R, 2^q]
    if offset is not None:
        values = values + offset[:, None]
    values, order = torch.sort(values, dim=1)
    mid = (values[:, 1:] + values[:, :-1]) / 2
    idx = torch.searchsorted(mid.contiguous(), w.contiguous()).clamp_(max=values.shape[1] - 1)
    return patterns[torch.gather(order, 1, idx)]


def search(w: torch.Tensor, bits: int, group_size: int, rounds: int, offset: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(alphas float32 [N, G, q], bits uint8 [q, N, K], offset float32 [N, G] or None) of w [N, K] by the search
    above; rounds >= 0; offset: search one per group too."""
    check_bcq_bits(bits)
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0 (0 greedy, 1 refined greedy, >= 2 alternating); got {rounds}")
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide K={k}")
    groups = w.detach().float().reshape(-1, group_size)  # [R = N * G, g]
    z = groups.mean(dim=1) if offset else None
    r, planes, alphas = groups - (0 if z is None else z[:, None]), [], []
    for _ in range(bits):
        b = torch.where(r >= 0, 1.0, -1.0)
        a = r.abs().mean(dim=1, keepdim=True)
        r -= a * b
        planes.append(b)
        alphas.append(a[:, 0])
    b, a = torch.stack(planes, dim=-1), torch.stack(alphas, dim=-1)  # [R, g, q], [R, q]
    for i in range(rounds):
        if i > 0:
            b = _nearest_signs(groups, a, z)
        if z is None:
            a = _refit(groups, b)
        else:  # the offset is the weight of an all-ones plane
            a = _refit(groups, torch.cat([b, torch.ones_like(b[..., :1])], dim=-1))
            a, z = a[:, :-1], a[:, -1]
    bits_ = (b > 0).permute(2, 0, 1).reshape(bits, n, k).to(torch.uint8)
    return a.reshape(n, k // group_size, bits), bits_, None if z is None else z.reshape(n, k // group_size)


def from_uniform(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alphas [N, G, q], bits uint8 [q, N, K], offset [N, G]) of a uniform grid w = scale (codes - zero): codes
    int [N, K] in [0, 2^bits), scale / zero [N, G] (tquant.formats.weights.QuantizedWeight's); exact."""
    check_bcq_bits(bits)
    s = scale.float()
    alphas = s[..., None] * 2.0 ** (torch.arange(bits, device=s.device) - 1)
    planes = ((codes.long()[None] >> torch.arange(bits, device=codes.device)[:, None, None]) & 1).to(torch.uint8)
    return alphas, planes, s * ((2**bits - 1) / 2 - zero.float())


def dequantize(alphas: torch.Tensor, bits: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 [N, K] = sum_i alpha_i b_i (+ offset) of alphas [N, G, q], bits [q, N, K], offset [N, G] or None."""
    q, n, k = bits.shape
    g = k // alphas.shape[1]
    signs = bits.float() * 2 - 1  # [q, N, K]
    w = (signs.reshape(q, n, -1, g) * alphas.permute(2, 0, 1)[..., None].float()).sum(0)
    if offset is not None:
        w = w + offset.float()[..., None]
    return w.reshape(n, k)

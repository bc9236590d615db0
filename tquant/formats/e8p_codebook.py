"""QuIP#'s lattice codebooks for 8 weights at a time: E8P12 (2 bits a weight) and E81B (1 bit a weight).

E8P12 (2^16 points of the shifted lattice E8 + 1/4, 16-bit index):
    A       = 256 "absolute" vectors: the 227 |v| of D8^ = {v in (Z + 1/2)^8, sum(v) even, |v|^2 <= 10}
              and 29 vectors of five 3/2 and three 1/2 (|v|^2 = 12); ABS_GRID [256, 8], entries in {1/2..7/2}
    point   = s * A[a] + t / 4, sign pattern s in {+1, -1}^8 with #(s = -1) = sum(A[a]) (mod 2) (so the
              signed vector has an even sum and lies in E8), t in {+1, -1}
    index   = a << 8 | s_0..6 << 1 | (t < 0)        bit 1 + j = (s_j < 0) for j < 7; s_7 follows from parity:
              (s_7 < 0) = (popcount(s_0..6 bits) + ODD[a]) mod 2,  ODD[a] = sum(A[a]) mod 2
    Stored as int16 (two's complement of the 16-bit index).
    PACKED_ABS int32 [256]: nibble j (bits 4j..4j+3) = 2 * A[a][j] (an odd integer 1..7), so a kernel
    decodes a point from one table word and bit operations.
E81B (E8 points of |v|^2 <= 2, the origin, and 15 of the 16 points 2 e_i (-2 e_7 left out); 8-bit index):
    E81B_GRID [256, 8], searched by brute force.
RVQ (QuIP#'s 3 and 4 bits): stage 1 = E8P12(x); stage 2 quantizes the residual (x - stage1) * r with
E81B (3 bits, r = 2.04) or E8P12 (4 bits, r = 3.45); the value is stage1 + stage2 / r.
OPT_SCALE: QuIP#'s RMS of the unit-variance weight the codebooks fit best (weights are divided by
RMS / OPT_SCALE before rounding).
"""
from __future__ import annotations

import functools

import torch

CODE_DIM = 8
OPT_SCALE = {2: 1.03, 3: 0.98, 4: 1.03}
RESID_SCALE = {3: 2.04, 4: 3.45}


def _norm12() -> torch.Tensor:
    # the 29 vectors of five 3/2 and three 1/2 in QuIP#'s E8P12 (numbers of the codebook definition)
    rows = ["31113333", "13113333", "11313333", "11133333", "33313311", "33313131", "33311331", "33313113",
            "33311313", "33311133", "33133311", "33133131", "33131331", "33133113", "33131313", "33131133",
            "31333311", "31333131", "31331331", "31333113", "31331313", "13331133", "13333311", "13333131",
            "13331331", "13333113", "13331313", "11331333", "33113331"]
    return torch.tensor([[int(c) for c in r] for r in rows], dtype=torch.float32) / 2


def _abs_grid() -> torch.Tensor:
    # |v| of D8^'s points with |v|^2 <= 10: every a in {1/2, 3/2, 5/2, 7/2}^8 with |a|^2 <= 10 is one (flipping one
    # sign changes sum(v) by the odd integer 2 a_j, so some sign pattern makes the sum even); enumerated in ascending
    # lexicographic order, the order torch.unique gave over all of (Z + 1/2)^8 (8^8 rows, seconds at every import)
    half = torch.tensor([0.5, 1.5, 2.5, 3.5])
    absolute = torch.cartesian_prod(*[half] * CODE_DIM)
    d8abs = absolute[absolute.square().sum(-1) <= 10]
    grid = torch.cat([d8abs, _norm12()])
    assert grid.shape == (256, CODE_DIM) and len(d8abs) == 227
    return grid


def _e81b_grid() -> torch.Tensor:
    ints = torch.tensor([-1.0, 0.0, 1.0])  # an integer point of |v|^2 <= 2 has no entry +-2 but 2 e_i (added below)
    pts = torch.cat([torch.cartesian_prod(*[ints] * CODE_DIM),
                     torch.cartesian_prod(*[torch.tensor([-0.5, 0.5])] * CODE_DIM)])
    keep = (pts.sum(-1) % 2 == 0) & (pts.square().sum(-1) <= 2)
    two = [2 * torch.eye(CODE_DIM)[i] for i in range(CODE_DIM)] + [-2 * torch.eye(CODE_DIM)[i] for i in range(7)]
    grid = torch.cat([pts[keep], torch.stack(two)])
    assert grid.shape == (256, CODE_DIM)
    return grid


ABS_GRID = _abs_grid()
ODD = (ABS_GRID.sum(-1) % 2).to(torch.int64)  # 1 where sum(A[a]) is odd
PACKED_ABS = sum(((2 * ABS_GRID[:, j]).to(torch.int64) << (4 * j)) for j in range(CODE_DIM))
PACKED_ABS = torch.where(PACKED_ABS >= 2**31, PACKED_ABS - 2**32, PACKED_ABS).to(torch.int32)
E81B_GRID = _e81b_grid()
_BITS = 1 << torch.arange(CODE_DIM)


@functools.lru_cache(maxsize=8)
def _tables(device: torch.device) -> dict[str, torch.Tensor]:
    """The codebook tensors on a device, copied there once (a copy per call would synchronize the GPU)."""
    grid = ABS_GRID.to(device)
    return {"grid": grid, "grid_norm": grid.square().sum(-1), "odd": ODD.to(device), "e81b": E81B_GRID.to(device),
            "e81b_norm": E81B_GRID.square().sum(-1).to(device), "bits": _BITS.to(device),
            "lanes": torch.arange(CODE_DIM, device=device), "shifts": torch.tensor([0.25, -0.25], device=device)}


def _sign_bits(index: torch.Tensor) -> torch.Tensor:
    """[..., 8] bool, True where the point's coordinate is negative (parity rule fills in coordinate 7)."""
    t = _tables(index.device)
    a = (index >> 8) & 255
    low = (index >> 1) & 127
    neg = ((low[..., None] >> t["lanes"][:7]) & 1).bool()
    last = (neg.sum(-1) + t["odd"][a]) % 2 == 1
    return torch.cat([neg, last[..., None]], dim=-1)


def e8p_decode(codes: torch.Tensor) -> torch.Tensor:
    """int16/int32/int64 E8P12 indices [...] -> float32 points [..., 8]."""
    index = codes.to(torch.int64) & 0xFFFF
    vals = _tables(codes.device)["grid"][(index >> 8) & 255]
    vals = torch.where(_sign_bits(index), -vals, vals)
    return vals + torch.where(index & 1 == 1, -0.25, 0.25)[..., None]


def e8p_quantize(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest E8P12 point to each row of x [..., 8] (exact): (points float32 [..., 8], indices int64 [...]).

    For a shift t: y = x - t/4 and each absolute vector a, the best signs are sign(y) (distance
    || |y| - a ||^2); if their parity is wrong for a, one sign must flip, cheapest where |y_j| a_j is
    least (cost 4 |y_j| a_j). The minimum over (t, a) (both shifts in one pass, ties to t = +1/4 and the
    lower a) is the nearest point."""
    shape = x.shape
    flat = x.reshape(-1, CODE_DIM).float()
    t = _tables(x.device)
    grid = t["grid"]
    points = torch.empty_like(flat)
    index = torch.empty(flat.shape[0], dtype=torch.int64, device=x.device)
    for s in range(0, flat.shape[0], chunk):
        y = flat[None, s : s + chunk] - t["shifts"][:, None, None]  # [2, B, 8]
        rows = torch.arange(y.shape[1], device=x.device)
        ay, neg = y.abs(), y < 0
        flip_cost = (ay[:, :, None, :] * grid).amin(-1)  # [2, B, 256]
        wrong = (neg.sum(-1, keepdim=True) + t["odd"]) % 2 == 1
        dist = ay.square().sum(-1, keepdim=True) + t["grid_norm"] - 2 * ay @ grid.t() + wrong * 4 * flip_cost
        best = dist.transpose(0, 1).reshape(-1, 2 * 256).argmin(-1)  # [B] over (shift, a)
        t_bit, a = best // 256, best % 256
        ay, neg, wrong = ay[t_bit, rows], neg[t_bit, rows], wrong[t_bit, rows, a]
        flip_at = (ay * grid[a]).argmin(-1)
        neg = neg ^ (wrong[:, None] & (t["lanes"] == flip_at[:, None]))
        index[s : s + chunk] = (a << 8) | ((neg[:, :7].long() * t["bits"][:7]).sum(-1) << 1) | t_bit
        points[s : s + chunk] = torch.where(neg, -grid[a], grid[a]) + t["shifts"][t_bit][:, None]
    return points.reshape(shape), index.reshape(shape[:-1])


def e81b_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8/int E81B indices [...] -> float32 points [..., 8]."""
    return _tables(codes.device)["e81b"][codes.to(torch.int64) & 255]


def e81b_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest E81B point (brute force over 256): (points float32 [..., 8], indices int64 [...])."""
    t = _tables(x.device)
    grid = t["e81b"]
    flat = x.reshape(-1, CODE_DIM).float()
    idx = (2 * flat @ grid.t() - t["e81b_norm"]).argmax(-1)
    return grid[idx].reshape(x.shape), idx.reshape(x.shape[:-1])


def check_bits(bits: int) -> None:
    if bits not in OPT_SCALE:
        raise ValueError(f"E8P lattice codebooks support 2, 3 or 4 bits per weight, not {bits}")


def rvq_quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., 8] -> (values float32 [..., 8], codes int64 [..., stages]); stages 1 (2-bit) or 2 (3-, 4-bit)."""
    check_bits(bits)
    v1, c1 = e8p_quantize(x)
    if bits == 2:
        return v1, c1[..., None]
    r = RESID_SCALE[bits]
    v2, c2 = (e81b_quantize if bits == 3 else e8p_quantize)((x - v1) * r)
    return v1 + v2 / r, torch.stack([c1, c2], dim=-1)


def rvq_decode(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., stages] -> values float32 [..., 8] (the inverse of rvq_quantize's codes)."""
    check_bits(bits)
    v = e8p_decode(codes[..., 0])
    if bits == 2:
        return v
    second = e81b_decode if bits == 3 else e8p_decode
    return v + second(codes[..., 1]) / RESID_SCALE[bits]


def brute_force_e8p(x: torch.Tensor) -> torch.Tensor:
    """Nearest of all 2^16 E8P12 points to each row of x [B, 8] by exhaustive search (tests only)."""
    allpts = e8p_decode(torch.arange(1 << 16, device=x.device))
    return (2 * x.float() @ allpts.t() - allpts.square().sum(-1)).argmax(-1)


__all__ = ["ABS_GRID", "CODE_DIM", "E81B_GRID", "ODD", "OPT_SCALE", "PACKED_ABS", "RESID_SCALE", "brute_force_e8p",
           "e81b_decode", "e81b_quantize", "e8p_decode", "e8p_quantize", "rvq_decode", "rvq_quantize"]

"""Hadamard matrices for randomized Hadamard incoherence (QuIP#): constructions and conventions, in torch.

    n = m * p,   p = 2^k,   m in KNOWN_ORDERS          (hadamard_factors(n) -> (m, p))
    H_n = (H_m ⊗ H_p) / sqrt(n),   H_n @ H_n.T = I    (hadamard_dense; H_p Sylvester, H_m from hadamard_matrix)
A transform of x along its last dim is y = x @ H_n^T (each row vector v -> H_n v); transpose=True is
y = x @ H_n (v -> H_n^T v), its inverse. With index i = i_m * p + i_p, v -> H_n v is V -> H_m V H_p^T on the
[m, p] view of v (H_p is symmetric; H_m in general is not).

hadamard_matrix(m): the unnormalized ±1 matrix of order m, H H^T = m I:
    2^k                         Sylvester, H[i, j] = (-1)^popcount(i & j) (symmetric)
    12, 20, 60, 108, 140        Paley I from GF(q), q = 11, 19, 59, 107, 139 (q ≡ 3 mod 4; order q + 1)
    28, 36, 52                  Paley II from GF(q), q = 13, 17, 25 = 5^2 (q ≡ 1 mod 4; order 2 (q + 1))
    40                          H_2 ⊗ H_20
    156, 172                    no Paley construction: the published matrices (Sloane's library), hadamard_data
random_signs(n, seed): the ±1 diagonal that makes the transform random, from a seeded CPU generator.
"""
from __future__ import annotations

import functools
import math

import torch

from .hadamard_data import HAD156, HAD172

KNOWN_ORDERS = (1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)
PALEY_I = {12: 11, 20: 19, 60: 59, 108: 107, 140: 139}  # order -> q, q ≡ 3 mod 4
PALEY_II = {28: 13, 36: 17, 52: 25}  # order -> q, q ≡ 1 mod 4
DATA = {156: HAD156, 172: HAD172}


def is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard_factors(n: int) -> tuple[int, int]:
    """(m, p) with n = m * p, p a power of two and m the largest of KNOWN_ORDERS that fits (1 for n = 2^k)."""
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        for m in sorted(KNOWN_ORDERS, reverse=True):
            if n % m == 0 and is_power_of_2(n // m):
                return m, n // m
    raise ValueError(f"no Hadamard matrix construction for n={n!r}: n must be 2^k or m*2^k with m in "
                     f"{KNOWN_ORDERS[1:]}")


def hadamard_matrix(m: int) -> torch.Tensor:
    """float32 [m, m] of ±1 with H H^T = m I, for m in KNOWN_ORDERS or a power of two."""
    return _matrix(m).clone()


def hadamard_dense(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal H_n = (H_m ⊗ H_p) / sqrt(n) [n, n] (H_n @ H_n.T = I), in dtype."""
    m, p = hadamard_factors(n)
    return torch.kron(_matrix(m).to(dtype), _matrix(p).to(dtype)) * (1.0 / math.sqrt(n))


def transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x @ H_n^T along the last dim (or x @ H_n with transpose), in x's dtype (float32 or float64): Sylvester
    butterflies for H_p, then H_m on the [m, p] view; no n x n matrix is formed."""
    n = x.shape[-1]
    m, p = hadamard_factors(n)
    y = x.reshape(-1, m, p)
    h = 1
    while h < p:  # Sylvester H_p: butterflies (a, b) -> (a + b, a - b) at distance h
        y = y.reshape(-1, m, p // (2 * h), 2, h)
        y = torch.stack((y[:, :, :, 0] + y[:, :, :, 1], y[:, :, :, 0] - y[:, :, :, 1]), dim=3)
        h *= 2
    y = y.reshape(-1, m, p)
    if m > 1:
        hm = _matrix(m).to(x.device, x.dtype)
        y = (hm.T if transpose else hm) @ y
    return (y * (1.0 / math.sqrt(n))).reshape(x.shape)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """float32 [n] of ±1, the same for the same (n, seed) on every machine (torch.Generator().manual_seed)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int; got {n!r}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float32) * 2 - 1


@functools.cache
def _matrix(m: int) -> torch.Tensor:
    """hadamard_matrix, cached (callers must not modify it)."""
    if is_power_of_2(m):
        return sylvester(m)
    if m in PALEY_I:
        return paley_i(PALEY_I[m])
    if m in PALEY_II:
        return paley_ii(PALEY_II[m])
    if m == 40:
        return torch.kron(sylvester(2), _matrix(20))
    if m in DATA:
        return from_hex_rows(DATA[m], m)
    raise ValueError(f"no Hadamard matrix construction of order m={m!r}: m must be a power of two or one of "
                     f"{KNOWN_ORDERS[1:]}")


def sylvester(p: int) -> torch.Tensor:
    """H_p[i, j] = (-1)^popcount(i & j), p a power of two: H_2 ⊗ ... ⊗ H_2 in natural order."""
    i = torch.arange(p)
    both = i[:, None] & i[None, :]
    parity = torch.zeros(p, p, dtype=torch.int64)
    for bit in range(max(p - 1, 0).bit_length()):
        parity ^= (both >> bit) & 1
    return (1 - 2 * parity).to(torch.float32)


def from_hex_rows(rows: tuple[str, ...], m: int) -> torch.Tensor:
    """Rows stored as hex integers: bit j set (LSB = column 0) means entry -1."""
    bits = [[(int(row, 16) >> j) & 1 for j in range(m)] for row in rows]
    return 1 - 2 * torch.tensor(bits, dtype=torch.float32)


# ---- finite fields GF(q), q = p^k: the quadratic character for the Paley constructions ----

def _prime_power(q: int) -> tuple[int, int]:
    """(p, k) with q = p^k, p prime."""
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k, r = 0, q
    while r % p == 0:
        r, k = r // p, k + 1
    if r != 1:
        raise ValueError(f"q={q} is not a prime power")
    return p, k


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p) (coefficient lists, lowest degree first; f monic)."""
    a = list(a)
    for top in range(len(a) - 1, len(f) - 2, -1):
        c = a[top] % p
        if c:
            for i, fi in enumerate(f):
                a[top - len(f) + 1 + i] = (a[top - len(f) + 1 + i] - c * fi) % p
    return [c % p for c in a[: len(f) - 1]]


def _poly_mul(a: list[int], b: list[int], p: int) -> list[int]:
    out = [0] * (len(a) + len(b) - 1)
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            out[i + j] = (out[i + j] + ai * bj) % p
    return out


def _monic(degree: int, code: int, p: int) -> list[int]:
    """The monic polynomial of the given degree whose lower coefficients are code's base-p digits."""
    return [(code // p**i) % p for i in range(degree)] + [1]


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p) (no monic factor of degree 1..k/2)."""
    for code in range(p**k):
        f = _monic(k, code, p)
        if all(any(_poly_mod(f, _monic(d, c, p), p)) for d in range(1, k // 2 + 1) for c in range(p**d)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")


def quadratic_character(q: int) -> tuple[list[int], list[list[int]]]:
    """(chi, sub) on GF(q), elements coded 0..q-1 by their polynomial coefficients (base-p digits):
    chi[a] = 0, 1 or -1 as a is zero, a nonzero square or a non-square; sub[a][b] = a - b."""
    p, k = _prime_power(q)
    f = _irreducible(p, k)

    def digits(a):
        return [(a // p**i) % p for i in range(k)]

    def code(d):
        return sum(c * p**i for i, c in enumerate(d))

    squares = {code(_poly_mod(_poly_mul(digits(a), digits(a), p), f, p)) for a in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    sub = [[code([(x - y) % p for x, y in zip(digits(a), digits(b))]) for b in range(q)] for a in range(q)]
    return chi, sub


def jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = chi(a - b) on GF(q): Q Q^T = q I - J, rows sum to 0; antisymmetric for q ≡ 3 mod 4, symmetric
    for q ≡ 1 mod 4."""
    chi, sub = quadratic_character(q)
    return torch.tensor([[chi[sub[a][b]] for b in range(q)] for a in range(q)], dtype=torch.float32)


def paley_i(q: int) -> torch.Tensor:
    """Order q + 1 (q ≡ 3 mod 4): H = I + S, S = [[0, 1^T], [-1, Q]] skew with S S^T = q I."""
    s = torch.zeros(q + 1, q + 1)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal(q)
    return torch.eye(q + 1) + s


def paley_ii(q: int) -> torch.Tensor:
    """Order 2 (q + 1) (q ≡ 1 mod 4): C = [[0, 1^T], [1, Q]] symmetric with C C^T = q I, then
    H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]."""
    c = torch.zeros(q + 1, q + 1)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, jacobsthal(q)
    return (torch.kron(c, torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
            + torch.kron(torch.eye(q + 1), torch.tensor([[1.0, -1.0], [-1.0, -1.0]])))

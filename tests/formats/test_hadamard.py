"""Hadamard constructions: every known order is a ±1 matrix with H H^T = m I, the normalized H_n is orthonormal,
factorization and its errors, the random signs."""
import math

import pytest
import torch

from tquant.formats.hadamard import (
    KNOWN_ORDERS,
    hadamard_dense,
    hadamard_factors,
    hadamard_matrix,
    jacobsthal,
    quadratic_character,
    random_signs,
)


@pytest.mark.parametrize("m", KNOWN_ORDERS + (2, 4, 8, 64, 256))
def test_hadamard_matrix_is_hadamard(m):
    h = hadamard_matrix(m)
    assert h.dtype == torch.float32 and h.shape == (m, m)
    assert ((h == 1) | (h == -1)).all()
    torch.testing.assert_close(h @ h.T, m * torch.eye(m), rtol=0, atol=0)


def test_hadamard_matrix_is_a_copy():
    h = hadamard_matrix(12)
    h.zero_()
    assert (hadamard_matrix(12).abs() == 1).all()


@pytest.mark.parametrize("m", [3, 24, 100, 0, -4])
def test_hadamard_matrix_unknown_order_raises(m):
    with pytest.raises(ValueError, match=f"order m={m}"):
        hadamard_matrix(m)


def test_sylvester_is_symmetric_and_natural_order():
    h8 = hadamard_matrix(8)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    torch.testing.assert_close(h8, torch.kron(h2, torch.kron(h2, h2)), rtol=0, atol=0)
    torch.testing.assert_close(h8, h8.T, rtol=0, atol=0)


@pytest.mark.parametrize("q", [5, 7, 9, 11, 13, 25, 27, 49])
def test_quadratic_character_of_gf_q(q):
    """Half the nonzero elements are squares; chi is multiplicative on a - b differences (chi(b - a) =
    chi(-1) chi(a - b), chi(-1) = 1 exactly when q ≡ 1 mod 4); Q Q^T = q I - J and rows of Q sum to 0."""
    chi, sub = quadratic_character(q)
    assert chi[0] == 0 and sorted(chi[1:]).count(1) == (q - 1) // 2
    minus_one = 1 if q % 4 == 1 else -1
    assert all(chi[sub[b][a]] == minus_one * chi[sub[a][b]] for a in range(q) for b in range(q))
    assert all(sub[sub[a][b]][sub[0][b]] == a for a in range(q) for b in range(q))  # (a - b) - (-b) = a
    jq = jacobsthal(q)
    torch.testing.assert_close(jq @ jq.T, q * torch.eye(q) - torch.ones(q, q), rtol=0, atol=0)
    assert (jq.sum(dim=1) == 0).all()


@pytest.mark.parametrize("n", [1, 2, 64, 576, 1536, 40 * 4, 156 * 2, 172, 12, 20 * 8, 52 * 2, 108, 140])
def test_hadamard_dense_is_orthonormal(n):
    h = hadamard_dense(n, torch.float64)
    assert h.shape == (n, n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)))


def test_hadamard_dense_is_the_kronecker_product():
    m, p = hadamard_factors(36 * 4)
    expected = torch.kron(hadamard_matrix(m), hadamard_matrix(p)) / 12
    torch.testing.assert_close(hadamard_dense(144), expected, rtol=1e-7, atol=0)
    assert hadamard_dense(144, torch.float16).dtype == torch.float16


@pytest.mark.parametrize("n,factors", [(1, (1, 1)), (4096, (1, 4096)), (576, (36, 16)), (1536, (12, 128)),
                                       (11008, (172, 64)), (14336, (28, 512)), (40, (40, 1)), (80, (40, 2)),
                                       (20, (20, 1)), (156 * 4, (156, 4)), (140 * 256, (140, 256))])
def test_hadamard_factors(n, factors):
    assert hadamard_factors(n) == factors


@pytest.mark.parametrize("n", [100, 7, 0, -8, 6, 44, 2.0, True])
def test_hadamard_factors_without_construction_raises(n):
    with pytest.raises(ValueError, match=rf"no Hadamard matrix construction for n={n!r}: n must be 2\^k or m\*2\^k "
                                         r"with m in \(12, 20, 28"):
        hadamard_factors(n)


def test_random_signs():
    a, b, c = random_signs(1000, 0), random_signs(1000, 0), random_signs(1000, 1)
    assert a.dtype == torch.float32 and a.shape == (1000,)
    assert ((a == 1) | (a == -1)).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a != c).any()
    assert 400 < (a == 1).sum() < 600
    assert random_signs(0, 3).shape == (0,)
    with pytest.raises(ValueError, match="non-negative"):
        random_signs(-1, 0)

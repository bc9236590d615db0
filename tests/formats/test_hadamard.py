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


# ---- the constructions and the fast transform against plain references (kills tests/mutation.py's mutants) ----

from hypothesis import given, settings, strategies as st  # noqa: E402

from tquant.formats import hadamard as hd  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 8, 64, 12, 24, 20 * 4, 28 * 2, 36, 40 * 2, 52, 60, 108 * 2, 140, 156, 172 * 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transform_is_x_times_the_dense_matrix(n, dtype):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(3, 2, n, generator=g) * 10 ** torch.randint(-3, 4, (3, 2, 1), generator=g)).to(dtype)
    h = hadamard_dense(n, torch.float64)
    for transpose, expected in ((False, x.double() @ h.T), (True, x.double() @ h)):
        y = hd.transform(x, transpose=transpose)
        assert y.dtype == dtype and y.shape == x.shape
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    torch.testing.assert_close(hd.transform(hd.transform(x), transpose=True), x, rtol=tol, atol=tol * x.abs().max())


def test_sylvester_is_the_popcount_formula():
    for p in (1, 2, 4, 16, 64):
        expected = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(p)] for i in range(p)],
                                dtype=torch.float32)
        assert torch.equal(hd.sylvester(p), expected)


def test_paley_and_product_constructions_are_the_documented_ones():
    for m, q in hd.PALEY_I.items():
        s = torch.zeros(q + 1, q + 1)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal(q)
        # called directly: hadamard_matrix caches, so mutmut would not see a test reach paley_i through it
        assert torch.equal(hd.paley_i(q), torch.eye(q + 1) + s) and torch.equal(hadamard_matrix(m), hd.paley_i(q))
    for m, q in hd.PALEY_II.items():
        c = torch.zeros(q + 1, q + 1)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, jacobsthal(q)
        h = torch.empty(m, m)
        for a in range(q + 1):
            for b in range(q + 1):
                block = (c[a, b] * torch.tensor([[1.0, 1.0], [1.0, -1.0]])
                         + float(a == b) * torch.tensor([[1.0, -1.0], [-1.0, -1.0]]))
                h[2 * a:2 * a + 2, 2 * b:2 * b + 2] = block
        assert torch.equal(hd.paley_ii(q), h) and torch.equal(hadamard_matrix(m), h)
    assert torch.equal(hadamard_matrix(40), torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), hadamard_matrix(20)))
    for m in (156, 172):  # the published rows, bit j (LSB first) set means -1
        rows = hd.DATA[m]
        expected = torch.tensor([[-1.0 if int(r, 16) >> j & 1 else 1.0 for j in range(m)] for r in rows])
        assert torch.equal(hd.from_hex_rows(rows, m), expected) and torch.equal(hadamard_matrix(m), expected)
    assert torch.equal(hd.from_hex_rows(("0", "3", "2"), 3), torch.tensor([[1.0, 1, 1], [-1, -1, 1], [1, -1, 1]]))


def test_jacobsthal_is_chi_of_the_difference():
    """Over a prime field GF(p) the character is Legendre's symbol: chi(a) = a^((p-1)/2) mod p."""
    for p in (11, 13, 19):
        legendre = [0] + [1 if pow(a, (p - 1) // 2, p) == 1 else -1 for a in range(1, p)]
        expected = torch.tensor([[legendre[(a - b) % p] for b in range(p)] for a in range(p)], dtype=torch.float32)
        assert torch.equal(jacobsthal(p), expected)


def ref_poly_mul(a, b, p):
    out = [0] * (len(a) + len(b) - 1)
    for i in range(len(a)):
        for j in range(len(b)):
            out[i + j] += a[i] * b[j]
    return [c % p for c in out]


def ref_poly_mod(a, f, p):
    """Long division by monic f: the remainder, padded to degree(f) coefficients."""
    r = [c % p for c in a]
    while len(r) >= len(f):
        c = r[-1]
        shift = len(r) - len(f)
        r = [(r[i] - c * (f[i - shift] if i >= shift else 0)) % p for i in range(len(r))][:-1]
    return r + [0] * (len(f) - 1 - len(r))


@settings(max_examples=60, deadline=None)
@given(p=st.sampled_from([2, 3, 5, 7]), a=st.lists(st.integers(0, 6), min_size=1, max_size=7),
       b=st.lists(st.integers(0, 6), min_size=1, max_size=4), f=st.lists(st.integers(0, 6), min_size=0, max_size=3))
def test_polynomial_arithmetic_over_gf_p(p, a, b, f):
    a, b, f = [c % p for c in a], [c % p for c in b], [c % p for c in f] + [1]
    a += [0] * (len(f) - 1 - len(a))  # as its callers use it: at least degree(f) coefficients
    assert hd._poly_mul(a, b, p) == ref_poly_mul(a, b, p)
    assert hd._poly_mod(a, f, p) == ref_poly_mod(a, f, p)
    assert hd._monic(len(f) - 1, sum(c * p**i for i, c in enumerate(f[:-1])), p) == f


def test_prime_powers_and_irreducible_polynomials():
    assert [hd._prime_power(q) for q in (2, 11, 25, 27, 49, 128)] == [(2, 1), (11, 1), (5, 2), (3, 3), (7, 2), (2, 7)]
    for q in (12, 6, 100):
        with pytest.raises(ValueError, match=f"^q={q} is not a prime power$"):
            hd._prime_power(q)
    for p, k in ((2, 1), (2, 2), (2, 3), (3, 2), (5, 2), (3, 3), (2, 4)):
        f = hd._irreducible(p, k)
        # the first monic polynomial of degree k (in code order) with no monic factor of degree 1..k/2
        for code in range(p**k):
            g = hd._monic(k, code, p)
            divisible = any(not any(ref_poly_mod(g, hd._monic(d, c, p), p))
                            for d in range(1, k // 2 + 1) for c in range(p**d))
            if not divisible:
                assert f == g, (p, k)
                break


def test_random_signs_argument_errors_and_seeds():
    for bad in (2.0, "3", None):
        with pytest.raises(ValueError, match=f"^n must be a non-negative int; got {bad!r}$"):
            random_signs(bad, 0)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(random_signs(50, 7), torch.randint(0, 2, (50,), generator=g).float() * 2 - 1)


def test_is_power_of_2():
    assert [n for n in range(-4, 70) if hd.is_power_of_2(n)] == [1, 2, 4, 8, 16, 32, 64]


def test_unknown_order_message():
    with pytest.raises(ValueError, match=r"^no Hadamard matrix construction of order m=24: m must be a power of two or "
                                         r"one of \(12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172\)$"):
        hd._matrix(24)


def test_transform_stays_on_the_inputs_device():
    """The result stays on x's device (meta stands in for CUDA). Where H_m itself lives is not seen here: a CPU matrix
    times a meta tensor gives a meta tensor, where on CUDA it raises."""
    for n in (24, 64):
        y = hd.transform(torch.empty(3, n, device="meta"), transpose=n == 24)
        assert y.device.type == "meta" and y.shape == (3, n)

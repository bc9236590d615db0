"""QuIP#'s lattice codebooks (tquant.formats.e8p_codebook) against plain constructions of the module docstring: the
absolute vectors and E81B's points built from their definitions, every E8P12 index decoded bit by bit, nearest points
found by exhaustive search in float64, and the residual stages composed by hand. Written to kill the mutants of
tests/mutation.py that change a result."""
import itertools

import pytest
import torch

from tquant.formats import e8p_codebook as cb

HALF = (0.5, 1.5, 2.5, 3.5)


def plain_abs_set():
    """|v| of D8^ = {v in (Z + 1/2)^8, sum(v) even, |v|^2 <= 10}: every sign pattern of a half-integer vector has an
    odd-sum twin one flip away, so these are the vectors of {1/2, 3/2, 5/2}^8 with |v|^2 <= 10."""
    return {v for v in itertools.product(HALF[:3], repeat=8) if sum(x * x for x in v) <= 10}


def plain_e81b_set():
    """E8 points with |v|^2 <= 2 (even sum; integer or all-half-integer) and 2 e_i for all i, -2 e_i for i < 7."""
    ints = [v for v in itertools.product(range(-2, 3), repeat=8) if sum(v) % 2 == 0 and sum(x * x for x in v) <= 2]
    halves = [v for v in itertools.product((-0.5, 0.5), repeat=8) if sum(v) % 2 == 0]
    two = [tuple(2.0 * (j == i) for j in range(8)) for i in range(8)]
    two += [tuple(-2.0 * (j == i) for j in range(8)) for i in range(7)]
    return {tuple(float(x) for x in v) for v in ints + halves + two}


def plain_decode(index: int) -> list[float]:
    """The docstring's index = a << 8 | s_0..6 << 1 | (t < 0), s_7 from parity, point = s * A[a] + t / 4."""
    index &= 0xFFFF
    a, t = index >> 8, -0.25 if index & 1 else 0.25
    row = [float(x) for x in cb.ABS_GRID[a]]
    neg = [(index >> (1 + j)) & 1 for j in range(7)]
    neg.append((sum(neg) + int(sum(row)) % 2) % 2)
    return [(-x if n else x) + t for x, n in zip(row, neg)]


@pytest.fixture(scope="module")
def all_points():
    """[65536, 8] float64: every E8P12 point decoded by plain_decode (vectorized the same way)."""
    idx = torch.arange(1 << 16)
    grid = cb.ABS_GRID.double()
    a = idx >> 8
    neg = torch.stack([(idx >> (1 + j)) & 1 for j in range(7)], -1)
    parity = (neg.sum(-1) + grid[a].sum(-1).long() % 2) % 2
    neg = torch.cat([neg, parity[:, None]], -1).bool()
    shift = torch.where(idx & 1 == 1, -0.25, 0.25).double()
    return torch.where(neg, -grid[a], grid[a]) + shift[:, None]


def nearest(x, points):
    """Index of the nearest of `points` to each row of x, exhaustive in float64."""
    d = (x.double()[:, None, :] - points[None]).square().sum(-1)
    return d.argmin(-1), d.amin(-1)


def test_abs_grid_is_the_docstring_set():
    grid = cb.ABS_GRID
    assert grid.shape == (256, 8) and grid.dtype == torch.float32
    rows = [tuple(float(x) for x in r) for r in grid]
    assert len(set(rows)) == 256
    assert set(rows[:227]) == plain_abs_set() and rows[:227] == sorted(rows[:227])  # torch.unique's order
    for r in rows[227:]:  # five 3/2 and three 1/2
        assert sorted(r) == [0.5] * 3 + [1.5] * 5
    assert all(x in HALF for r in rows for x in r)
    assert torch.equal(cb.ODD, (grid.sum(-1) % 2).long()) and cb.ODD.sum() > 0


def test_packed_abs_nibbles_are_twice_the_absolute_vectors():
    assert cb.PACKED_ABS.dtype == torch.int32
    words = cb.PACKED_ABS.long() & 0xFFFFFFFF
    for a in range(256):
        nibbles = [(int(words[a]) >> (4 * j)) & 15 for j in range(8)]
        assert nibbles == [int(2 * x) for x in cb.ABS_GRID[a]]


def test_e81b_grid_is_the_docstring_set():
    grid = cb.E81B_GRID
    assert grid.shape == (256, 8)
    rows = [tuple(float(x) for x in r) for r in grid]
    assert len(set(rows)) == 256 and set(rows) == plain_e81b_set()
    assert rows[-15:] == [tuple(2.0 * (j == i) for j in range(8)) for i in range(8)] + \
        [tuple(-2.0 * (j == i) for j in range(8)) for i in range(7)]


def test_e8p_decode_of_every_index(all_points):
    got = cb.e8p_decode(torch.arange(1 << 16))
    assert got.dtype == torch.float32 and got.shape == (1 << 16, 8)
    assert torch.equal(got.double(), all_points)
    for i in (0, 1, 2, 255, 256, 0x1234, 0xABCD, 0xFFFF):  # the loop form of the docstring
        assert got[i].tolist() == plain_decode(i)
    # the points are distinct and lie in E8 + 1/4: v - t/4 half-integer with an even sum
    assert len(torch.unique(got, dim=0)) == 1 << 16
    shift = torch.where(torch.arange(1 << 16) & 1 == 1, -0.25, 0.25)
    lattice = got.double() - shift[:, None]
    assert torch.equal(lattice * 2 % 2, torch.ones_like(lattice)) and torch.equal(lattice.sum(-1) % 2, 0 * shift.double())


def test_e8p_decode_reads_the_low_16_bits_of_any_integer_type(all_points):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 1 << 16, (40,), generator=g)
    as_int16 = torch.where(idx >= 1 << 15, idx - (1 << 16), idx).to(torch.int16)  # two's complement storage
    for codes in (as_int16, idx.to(torch.int32), idx + (5 << 16), idx - (3 << 16)):
        assert torch.equal(cb.e8p_decode(codes).double(), all_points[idx])
    assert cb.e8p_decode(idx.view(5, 8)).shape == (5, 8, 8)


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_e8p_quantize_is_the_nearest_point(all_points, scale):
    g = torch.Generator().manual_seed(int(scale * 10))
    x = torch.randn(3, 17, 8, generator=g) * scale
    points, index = cb.e8p_quantize(x, chunk=13)  # several chunks, the last partial
    assert points.shape == x.shape and index.shape == (3, 17) and index.dtype == torch.int64
    expected, dist = nearest(x.reshape(-1, 8), all_points)
    assert torch.equal(index.reshape(-1), expected)
    assert torch.equal(points.reshape(-1, 8).double(), all_points[expected])
    torch.testing.assert_close(((x.reshape(-1, 8).double() - points.reshape(-1, 8)) ** 2).sum(-1), dist)


def test_e8p_quantize_flips_the_cheapest_sign(all_points):
    """Where sign(y)'s parity is wrong for the best a, the sign flipped is the one of least |y_j| a_j (the distance
    grows by 4 |y_j| a_j): on wide inputs (many such rows with coordinates of several a_j) no row is farther than the
    nearest point."""
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(5)) * 2.5
    points, _ = cb.e8p_quantize(x)
    xd, norms = x.double(), all_points.square().sum(-1)
    for s in range(0, 512, 128):
        best = (xd[s : s + 128].square().sum(-1, keepdim=True) + norms - 2 * xd[s : s + 128] @ all_points.t()).amin(-1)
        got = (xd[s : s + 128] - points[s : s + 128].double()).square().sum(-1)
        assert (got <= best + 1e-6).all()


def test_e8p_quantize_at_lattice_points_and_in_float16(all_points):
    g = torch.Generator().manual_seed(1)
    idx = torch.cat([torch.arange(256), torch.randint(0, 1 << 16, (64,), generator=g)])  # a = 0 both shifts, any
    x = all_points[idx].float()
    points, index = cb.e8p_quantize(x)
    assert torch.equal(index, idx) and torch.equal(points, x)  # a codebook point is its own nearest
    y = (torch.randn(30, 8, generator=g) * 1.5).half()
    points, index = cb.e8p_quantize(y)
    assert points.dtype == torch.float32
    assert torch.equal(index, nearest(y.float(), all_points)[0])


def test_brute_force_e8p_is_the_nearest(all_points):
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(2)) * 1.3
    assert torch.equal(cb.brute_force_e8p(x), nearest(x, all_points)[0])


def test_e81b_decode_and_quantize():
    grid = cb.E81B_GRID.double()
    codes = torch.randint(0, 256, (6, 7), generator=torch.Generator().manual_seed(3))
    for c in (codes, codes.to(torch.uint8), codes + 256 * 3):
        assert torch.equal(cb.e81b_decode(c), cb.E81B_GRID[codes])
    x = torch.randn(4, 25, 8, generator=torch.Generator().manual_seed(4)) * 0.8
    points, index = cb.e81b_quantize(x)
    assert points.shape == x.shape and index.shape == (4, 25)
    expected, _ = nearest(x.reshape(-1, 8), grid)
    assert torch.equal(index.reshape(-1), expected)
    assert torch.equal(points.reshape(-1, 8).double(), grid[expected])


def test_check_bits():
    for bits in (2, 3, 4):
        cb.check_bits(bits)
    for bits in (1, 5, 8):
        with pytest.raises(ValueError, match=f"2, 3 or 4 bits per weight, not {bits}"):
            cb.check_bits(bits)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rvq_is_two_nearest_stages(all_points, bits):
    """stage 1 = nearest E8P12 point, stage 2 = nearest point (E81B for 3 bits, E8P12 for 4) of the residual times
    r, value = stage 1 + stage 2 / r; rvq_decode inverts the codes."""
    x = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(bits))
    values, codes = cb.rvq_quantize(x, bits)
    flat = x.reshape(-1, 8)
    c1, _ = nearest(flat, all_points)
    v1 = all_points[c1]
    expected = v1
    assert codes.shape == (2, 9, 1 if bits == 2 else 2) and codes.dtype == torch.int64
    assert torch.equal(codes.reshape(-1, codes.shape[-1])[:, 0], c1)
    if bits != 2:
        r = {3: 2.04, 4: 3.45}[bits]
        second = cb.E81B_GRID.double() if bits == 3 else all_points
        c2, _ = nearest(((flat.double() - v1) * r).float(), second)
        assert torch.equal(codes.reshape(-1, 2)[:, 1], c2)
        expected = v1 + second[c2] / r
    torch.testing.assert_close(values.reshape(-1, 8).double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(cb.rvq_decode(codes, bits), values, rtol=0, atol=1e-6)
    if bits > 2:  # more bits, closer
        assert (values - x).square().sum() < (cb.rvq_quantize(x, bits - 1)[0] - x).square().sum()


def test_rvq_rejects_other_bits():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError):
        cb.rvq_quantize(x, 1)
    with pytest.raises(ValueError):
        cb.rvq_decode(torch.zeros(2, 2, dtype=torch.int64), 5)

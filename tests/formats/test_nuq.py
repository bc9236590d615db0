"""NUQ's weighted histogram and k-means against a plain-Python reference of the module docstring (bins over [-1, 1],
one point per bin at its weighted mean, weighted-quantile start, Lloyd to a fixed point), on random data, weights,
bin counts and codebook sizes. Written to kill the mutants of tests/mutation.py that change a result."""
import bisect

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tquant.formats.nuq import WeightedHistogram


def ref_points(xs, ws, bins):
    """(weights, means) of the non-empty bins, ascending: bin = floor((x + 1) / 2 * bins), the top edge in the last."""
    w, wx = [0.0] * bins, [0.0] * bins
    for x, v in zip(xs, ws):
        x = min(max(x, -1.0), 1.0)
        b = min(int((x + 1) / 2 * bins), bins - 1)
        w[b] += v
        wx[b] += v * x
    keep = [b for b in range(bins) if w[b] > 0]
    return [w[b] for b in keep], [wx[b] / w[b] for b in keep]


def ref_codebook(xs, ws, bins, k, iters=200):
    w, x = ref_points(xs, ws, bins)
    total, cum, acc = sum(w), [], 0.0
    for v in w:
        acc += v
        cum.append(acc / total)
    start = [min(bisect.bisect_left(cum, (j + 0.5) / k), len(x) - 1) for j in range(k)]
    run, idx = -10**9, []
    for j, i in enumerate(start):  # distinct: i_j = min(max_{l <= j}(i_l - l) + j, len - k + j)
        run = max(run, i - j)
        idx.append(min(run + j, len(x) - k + j))
    c = [x[i] for i in idx]
    for _ in range(iters):
        edges = [(c[j + 1] + c[j]) / 2 for j in range(k - 1)]
        sw, swx = [0.0] * k, [0.0] * k
        for v, p in zip(w, x):
            j = bisect.bisect_left(edges, p)  # a point on an edge joins the lower cluster
            sw[j] += v
            swx[j] += v * p
        new = [swx[j] / sw[j] if sw[j] > 0 else c[j] for j in range(k)]
        if new == c:
            break
        c = new
    return sorted(c)


def data(n, seed, weighted):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.4 + (torch.rand(n, generator=g) < 0.3) * 0.5
    x[: max(1, n // 50)] *= 4  # some outside [-1, 1]: clamped
    w = torch.rand(n, generator=g) ** 3 * 10 + 1e-3 if weighted else None
    return x, w


@settings(max_examples=25, deadline=None)
@given(n=st.integers(30, 400), bins=st.sampled_from([16, 64, 100, 4096]), k=st.sampled_from([2, 3, 4, 8, 16]),
       weighted=st.booleans(), iters=st.sampled_from([0, 1, 2, 200]), seed=st.integers(0, 2**31 - 1))
def test_codebook_matches_the_reference(n, bins, k, weighted, iters, seed):
    x, w = data(n, seed, weighted)
    h = WeightedHistogram(bins)
    h.add(x, w)
    points = len(ref_points(x.tolist(), [1.0] * n, bins)[0])
    if points < k:
        with pytest.raises(ValueError, match=f"^too little calibration data for a {k}-entry codebook: the data fills "
                                             f"{points} of {bins} histogram bins$"):
            h.codebook(k, iters)
        return
    c = h.codebook(k, iters) if iters != 200 else h.codebook(k)
    assert c.dtype == torch.float32 and c.shape == (k,)
    ref = ref_codebook(x.double().tolist(), w.double().tolist() if weighted else [1.0] * n, bins, k, iters)
    torch.testing.assert_close(c, torch.tensor(ref, dtype=torch.float32), rtol=0, atol=1e-6)
    assert (c[1:] >= c[:-1]).all()


@settings(max_examples=20, deadline=None)
@given(bins=st.sampled_from([8, 50, 4096]), seed=st.integers(0, 2**31 - 1))
def test_add_streams_and_clamps(bins, seed):
    x, w = data(300, seed, True)
    once, twice, unweighted, ones = (WeightedHistogram(bins) for _ in range(4))
    once.add(x.view(10, 30), w.view(30, 10))  # any shapes: flattened
    twice.add(x[:120], w[:120])
    twice.add(x[120:], w[120:])
    torch.testing.assert_close((once.w, once.wx), (twice.w, twice.wx), rtol=1e-12, atol=1e-12)
    ref_w, ref_mean = ref_points(x.double().tolist(), w.double().tolist(), bins)
    keep = once.w > 0
    assert once.w.dtype == once.wx.dtype == torch.float64 and once.w.shape == (bins,)
    torch.testing.assert_close(once.w[keep], torch.tensor(ref_w, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(once.wx[keep] / once.w[keep], torch.tensor(ref_mean, dtype=torch.float64), rtol=1e-9,
                               atol=1e-12)
    unweighted.add(x)
    ones.add(x, torch.ones(300))
    assert torch.equal(unweighted.w, ones.w) and torch.equal(unweighted.wx, ones.wx)


def test_edges_fall_in_the_end_bins():
    h = WeightedHistogram(4)
    h.add(torch.tensor([-1.0, -3.0, 1.0, 7.0, -0.5, 0.0, 0.375]))
    assert h.w.tolist() == [2.0, 1.0, 2.0, 2.0]
    assert h.wx.tolist() == [-2.0, -0.5, 0.375, 2.0]
    assert WeightedHistogram().bins == 4096 and WeightedHistogram().w.shape == (4096,)


def test_two_tight_clusters_get_their_weighted_means():
    x = torch.tensor([-0.5, -0.5001, 0.25, 0.2501, 0.9])
    h = WeightedHistogram()
    h.add(x, torch.tensor([1.0, 3.0, 2.0, 2.0, 1e-9]))
    c = h.codebook(2)
    torch.testing.assert_close(c[0], torch.tensor(-0.500075), rtol=0, atol=1e-6)
    assert 0.25 < c[1] < 0.2502


def test_as_many_points_as_centroids_is_enough():
    """k filled bins make a k-entry codebook (the points themselves); k - 1 do not."""
    h = WeightedHistogram(8)
    h.add(torch.tensor([-0.9, -0.8, 0.1, 0.3, 0.95]), torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0]))  # bins 0, 4, 5, 7
    assert h.codebook(4).tolist() == torch.tensor([-0.825, 0.1, 0.3, 0.95]).tolist()
    with pytest.raises(ValueError, match="^too little calibration data for a 5-entry codebook: the data fills 4 of 8 "
                                         "histogram bins$"):
        h.codebook(5)


def test_start_quantiles_are_float64():
    """Six equal points and k = 3: the first quantile 1/6 equals the first cumulative fraction exactly in float64,
    so the start is point 0 (a float32 target, 0.16666667, would start at point 1)."""
    h = WeightedHistogram(8)
    xs = [-0.9, -0.6, -0.3, 0.1, 0.4, 0.8]
    h.add(torch.tensor(xs, dtype=torch.float64))
    start = h.codebook(3, iters=0)
    assert start.tolist() == torch.tensor([-0.9, -0.3, 0.4]).tolist()
    assert start.tolist() == torch.tensor(ref_codebook(xs, [1.0] * 6, 8, 3, iters=0), dtype=torch.float32).tolist()


@pytest.mark.parametrize("factor", [1e-3, 0.5, 1e3])
def test_scaling_every_weight_leaves_the_codebook(factor):
    """k-means of weighted points depends on the weights' ratios only: clusters of total weight below 1 move like any
    other (no clamp of the weight sum at 1)."""
    x, w = data(400, 11, True)
    a, b = WeightedHistogram(256), WeightedHistogram(256)
    a.add(x, w)
    b.add(x, w * factor)
    torch.testing.assert_close(b.codebook(8), a.codebook(8), rtol=0, atol=1e-6)

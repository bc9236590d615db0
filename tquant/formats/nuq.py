"""Non-uniform 1-D codebooks (KVQuant's NUQ): weighted k-means of normalized values in [-1, 1].

    h = WeightedHistogram()
    h.add(x, w)              # x in [-1, 1] (clamped), weights w >= 0 (KVQuant: Fisher information g^2; None: 1)
    c = h.codebook(k)        # k sorted centroids, a local minimum of sum_i w_i (x_i - c[nearest(x_i)])^2
Each of the `bins` equal bins over [-1, 1] keeps sum w and sum w x, and stands for one point at its weighted mean
with its total weight, so data of any size streams in and k-means (Lloyd) runs on at most `bins` points; the
result is within one bin width (2 / bins) of k-means on the raw points. Lloyd starts at the weighted quantiles
(i + 1/2) / k (made distinct) and stops when the centroids stop moving.
"""
from __future__ import annotations

import torch


class WeightedHistogram:
    def __init__(self, bins: int = 4096):
        self.bins = bins
        self.w = torch.zeros(bins, dtype=torch.float64)
        self.wx = torch.zeros(bins, dtype=torch.float64)

    def add(self, x: torch.Tensor, w: torch.Tensor | None = None) -> None:
        x = x.detach().flatten().double().clamp(-1, 1)
        w = torch.ones_like(x) if w is None else w.detach().flatten().double()
        idx = ((x + 1) / 2 * self.bins).long().clamp_(max=self.bins - 1)
        self.w += torch.bincount(idx, weights=w, minlength=self.bins).cpu()
        self.wx += torch.bincount(idx, weights=w * x, minlength=self.bins).cpu()

    def codebook(self, k: int, iters: int = 200) -> torch.Tensor:
        """k sorted centroids (float32) of the weighted points added so far."""
        keep = self.w > 0
        if int(keep.sum()) < k:
            raise ValueError(f"too little calibration data for a {k}-entry codebook: the data fills "
                             f"{int(keep.sum())} of {self.bins} histogram bins")
        w, x = self.w[keep], self.wx[keep] / self.w[keep]  # points at the bins' weighted means, ascending
        i = torch.searchsorted(w.cumsum(0) / w.sum(), (torch.arange(k, dtype=torch.float64) + 0.5) / k)
        ar = torch.arange(k)
        i = torch.minimum(torch.cummax(i.clamp(max=len(x) - 1) - ar, 0).values + ar, len(x) - k + ar)  # distinct
        c = x[i]
        for _ in range(iters):
            cluster = torch.bucketize(x, (c[1:] + c[:-1]) / 2)
            sw = torch.zeros(k, dtype=torch.float64).index_add_(0, cluster, w)
            new = torch.where(sw > 0, torch.zeros_like(c).index_add_(0, cluster, w * x) / sw.clamp(min=1e-300), c)
            if torch.equal(new, c):
                break
            c = new
        return c.sort().values.float()

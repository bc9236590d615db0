"""Randomized Hadamard incoherence processing (QuIP#), in plain torch for methods and references.

H_n = (H_m ⊗ H_p) / sqrt(n) is the orthonormal Hadamard matrix of tquant.formats.hadamard (tquant.formats.hadamard.transform
applies it along the last dim). With sign vectors su [K] (inputs) and sv [N] (outputs) of a weight W [N, K]
and its Hessian H [K, K]:
    W_r = H_N diag(sv) W diag(su) H_K^T          H_r = H_K diag(su) H diag(su) H_K^T
so tr((W - W') H (W - W')^T) = tr((W_r - W'_r) H_r (W_r - W'_r)^T): quantizing W_r against H_r is the
same problem, with the weight's outliers spread over all coordinates.
"""
from __future__ import annotations

import torch

from .hadamard import transform


def rotate_weight(w: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """W_r = H_N diag(sv) W diag(su) H_K^T."""
    a = transform(w * su[None, :])
    return transform((a * sv[:, None]).t()).t()


def unrotate_weight(wr: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """W = diag(sv) H_N^T W_r H_K diag(su) (the inverse of rotate_weight for +-1 signs; with real-valued su,
    sv after fine-tuning it is the weight the module computes)."""
    a = transform(wr, transpose=True)
    return transform(a.t(), transpose=True).t() * sv[:, None] * su[None, :]


def rotate_hessian(h: torch.Tensor, su: torch.Tensor) -> torch.Tensor:
    """H_r = H_K diag(su) H diag(su) H_K^T."""
    a = transform(h * su[None, :] * su[:, None])
    return transform(a.t()).t()

"""Tune some parameters of one block against its float self (ZeroQuant's LKD, QuIP#'s fine-tuning).

    min_P  mean || block_P(X) - teacher(X) ||^2      Adam over random slices of `batch` sequences
X are the block's calibration inputs, teacher its float outputs on them. The error on every input is
checked `checks` times, evenly spread, and the best parameters so far are kept (the start included), so
tuning never raises the error it optimizes.
"""
from __future__ import annotations

import contextlib

import torch

from .block_io import fp32, hidden, output_mse, rows


@contextlib.contextmanager
def float32_training(block, params):
    """The block in float32 (Adam's moments underflow in fp16) with only `params` requiring grad; on exit
    its dtype and requires_grad flags come back."""
    dtype = next(block.parameters()).dtype
    flags = {p: p.requires_grad for p in block.parameters()}
    block.float()
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        block.to(dtype)


def distill(block, param_groups: list[dict], inputs, teacher, *, steps: int, batch: int, checks: int = 4,
            seed: int = 0) -> tuple[float, float]:
    """Run inside float32_training. param_groups: torch.optim param groups ({"params": [...], "lr": ...}).
    Returns (error before, error after)."""
    inputs = [fp32(i) for i in inputs]
    params = [p for g in param_groups for p in g["params"]]
    before = output_mse(block, inputs, teacher)
    best = (before, [p.detach().clone() for p in params])
    opt = torch.optim.Adam(param_groups)
    g = torch.Generator().manual_seed(seed)
    every = max(1, steps // checks)
    for step in range(1, steps + 1):
        b = int(torch.randint(len(inputs), (1,), generator=g))
        n = inputs[b][0][0].shape[0]
        start = int(torch.randint(max(1, n - batch + 1), (1,), generator=g))
        index = slice(start, start + batch)
        args, kwargs = rows(*inputs[b], index)
        loss = torch.nn.functional.mse_loss(hidden(block(*args, **kwargs)), teacher[b][index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            error = output_mse(block, inputs, teacher)
            if error < best[0]:
                best = (error, [p.detach().clone() for p in params])
    with torch.no_grad():
        for p, saved in zip(params, best[1]):
            p.copy_(saved)
    return before, best[0]

"""Tune some parameters of one block against its float self (ZeroQuant's LKD, QuIP#'s fine-tuning).

    min_P  mean || block_P(X) - teacher(X) ||^2      Adam over random slices of `batch` sequences
(distill; `optimize` is the loop for any loss, e.g. ABQ-LLM's).
X are the block's calibration inputs, teacher its float outputs on them. The error on every input is
checked `checks` times, evenly spread, and the best parameters so far are kept (the start included), so
tuning never raises the error it optimizes.
"""
from __future__ import annotations

import collections
import contextlib

import torch

from .block_io import fp32, hidden, output_mse, rows


@contextlib.contextmanager
def float32_training(block, params):
    """The block (or a whole model) in float32 (Adam's moments underflow in fp16) with only `params` requiring grad;
    on exit every parameter and buffer gets its own dtype back (float32 ones, e.g. QuipLinear's sign vectors in a
    half model, stay float32; a floating one added inside gets the dtype of most parameter elements) and the
    requires_grad flags come back."""
    dtypes = _dtypes(block)
    sizes = collections.Counter()
    for p in block.parameters():
        sizes[p.dtype] += p.numel()
    default = sizes.most_common(1)[0][0]
    flags = {p: p.requires_grad for p in block.parameters()}
    for (mod, name), dtype in dtypes.items():  # tensor by tensor: transformers refuses .float() on a model loaded
        if dtype.is_floating_point:              # through a quantizer (a de-quantized GGUF file)
            _cast(mod, name, torch.float32)
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
        for (mod, name), dtype in _dtypes(block).items():
            if dtype.is_floating_point:
                _cast(mod, name, dtypes.get((mod, name), default))


def _dtypes(block) -> dict:
    """{(module, name): dtype} of every parameter and buffer (not None) of block's modules."""
    return {(mod, name): t.dtype for mod in block.modules()
            for name, t in [*mod._parameters.items(), *mod._buffers.items()] if t is not None}


def _cast(mod, name: str, dtype: torch.dtype) -> None:
    """Parameter or buffer `name` of module mod in dtype (a parameter keeps its identity, as Module.to does)."""
    if name in mod._parameters and mod._parameters[name].dtype != dtype:
        mod._parameters[name].data = mod._parameters[name].data.to(dtype)
    elif name in mod._buffers and mod._buffers[name].dtype != dtype:
        mod._buffers[name] = mod._buffers[name].to(dtype)


def optimize(param_groups: list[dict], step_loss, error, *, steps: int, checks: int = 4,
             seed: int = 0) -> tuple[float, float]:
    """Adam over param_groups (torch.optim groups) for `steps` steps of step_loss(generator), a loss on one random
    mini-batch drawn with the generator. error() (no grad) is measured at the start and `checks` times, evenly
    spread; the best parameters seen are restored at the end. Returns (error before, best error)."""
    params = [p for g in param_groups for p in g["params"]]
    with torch.no_grad():
        before = error()
    best = (before, [p.detach().clone() for p in params])
    opt = torch.optim.Adam(param_groups)
    g = torch.Generator().manual_seed(seed)
    every = max(1, steps // checks)
    for step in range(1, steps + 1):
        loss = step_loss(g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                err = error()
            if err < best[0]:
                best = (err, [p.detach().clone() for p in params])
    with torch.no_grad():
        for p, saved in zip(params, best[1]):
            p.copy_(saved)
    return before, best[0]


def random_rows(inputs, batch: int, g: torch.Generator):
    """(batch index b, sequence slice, (args, kwargs) of those rows): `batch` consecutive sequences of a random
    calibration batch."""
    b = int(torch.randint(len(inputs), (1,), generator=g))
    n = inputs[b][0][0].shape[0]
    start = int(torch.randint(max(1, n - batch + 1), (1,), generator=g))
    index = slice(start, start + batch)
    return b, index, rows(*inputs[b], index)


def distill(block, param_groups: list[dict], inputs, teacher, *, steps: int, batch: int, checks: int = 4,
            seed: int = 0) -> tuple[float, float]:
    """Run inside float32_training. param_groups: torch.optim param groups ({"params": [...], "lr": ...}).
    Returns (error before, error after)."""
    inputs = [fp32(i) for i in inputs]

    def step_loss(g):
        b, index, (args, kwargs) = random_rows(inputs, batch, g)
        return torch.nn.functional.mse_loss(hidden(block(*args, **kwargs)), teacher[b][index])

    return optimize(param_groups, step_loss, lambda: output_mse(block, inputs, teacher), steps=steps, checks=checks,
                    seed=seed)

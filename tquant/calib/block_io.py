"""What a decoder block takes and gives during quantization.

The driver calls each block as block(*args, **kwargs), one (args, kwargs) per calibration batch (args[0]:
hidden states [B, T, D]; kwargs: masks, position tables, ...). Blocks return a tensor or a tuple whose
first element is the new hidden states.
"""
from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import CacheLayerMixin


def hidden(out):
    """The hidden states a block returned (its first output)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def rows(args, kwargs, index: slice):
    """The calibration batch (args, kwargs) restricted to sequences `index`: every tensor whose first dim is
    the batch size is sliced (masks, hidden states); others (shared position tables) are kept."""
    batch = args[0].shape[0]

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch:
            return v[index]
        if isinstance(v, (tuple, list)):
            return type(v)(cut(e) for e in v)
        return v

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def fp32(v):
    """v with every floating tensor in it (nested in tuples / lists / dicts) as float32."""
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.float()
    if isinstance(v, (tuple, list)):
        return type(v)(fp32(e) for e in v)
    if isinstance(v, dict):
        return {k: fp32(e) for k, e in v.items()}
    return v


@contextlib.contextmanager
def hooked(handles):
    """Keep hook handles registered for the duration of the block."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def outputs(block, inputs) -> list[torch.Tensor]:
    """The block's hidden-state outputs on each (args, kwargs), in float32 (a teacher to compare against)."""
    return [hidden(block(*a, **k)).float() for a, k in inputs]


@torch.no_grad()
def output_mse(block, inputs, teacher) -> float:
    """Mean squared error of the block's outputs on `inputs` against `teacher`, over all their elements."""
    total = sum(torch.nn.functional.mse_loss(hidden(block(*a, **k)).float(), t, reduction="sum").item()
                for (a, k), t in zip(inputs, teacher))
    return total / sum(t.numel() for t in teacher)


class PrefillProbe(CacheLayerMixin):
    """A cache layer for calibration forwards, each call a fresh prefill: it stores nothing, hands each call's K, V
    back unchanged, and shows them to observe(keys, values, args, kwargs) (what a subclass records)."""
    is_compileable = False
    is_sliding = False

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self.observe(key_states, value_states, args, kwargs)
        return key_states, value_states

    def observe(self, keys: torch.Tensor, values: torch.Tensor, args: tuple, kwargs: dict) -> None:
        raise NotImplementedError

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1

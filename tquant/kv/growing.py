"""Growing storage for the dynamic KV caches (tquant.kv.cache, tquant.kv.kvquant_cache): tensors that gain tokens at
their end, appended in O(new tokens) amortized instead of re-concatenated in O(length) on every call.

Growing(template, dim): one tensor growing along `dim`; the other dims, dtype and device are the template's. Its
buffer `buf` holds `capacity` entries along dim, the first `n` filled; `view` is buf.narrow(dim, 0, n) (a view: no
copy; not contiguous unless dim is the outermost non-unit dim). When an append does not fit, the buffer is
reallocated with capacity max(needed, 2 * capacity) and its filled part copied once, so the capacity stays at most
twice the filled length (after the first call) and each entry is moved O(1) times on average.

A store (a NamedTuple of tensors, nested, None parts kept None: uniform_format.PackedKV, the kvquant_format tuples) is
held as the same NamedTuple of Growing (grow()); append() / extend() / view() / nbytes() act on every part. The token
dim of a part is dim 2 of [B, H, T, ...] parts and the last dim of parts of fewer dims (CSR arrays [nnz], positions
[B, T]): token_dim.

COPIED counts the elements written by appends and moved by reallocations (a test reads it: per append it must not
grow with the length).
"""
from __future__ import annotations

import torch

COPIED = [0]


def copied_elements() -> int:
    """Elements written into or moved within every Growing so far (instrumentation)."""
    return COPIED[0]


def token_dim(x: torch.Tensor) -> int:
    return min(2, x.dim() - 1)


class Growing:
    __slots__ = ("buf", "dim", "n")

    def __init__(self, template: torch.Tensor, dim: int | None = None):
        self.dim = token_dim(template) if dim is None else dim % template.dim()
        shape = list(template.shape)
        shape[self.dim] = 0
        self.buf, self.n = template.new_empty(shape), 0

    @property
    def capacity(self) -> int:
        return self.buf.shape[self.dim]

    @property
    def view(self) -> torch.Tensor:
        return self.buf.narrow(self.dim, 0, self.n)

    def extend(self, t: int) -> int:
        """Room for t more entries, counted as filled (the caller writes them into buf); returns where they start."""
        start, need = self.n, self.n + t
        if need > self.capacity:
            shape = list(self.buf.shape)
            shape[self.dim] = max(need, 2 * self.capacity)
            buf = self.buf.new_empty(shape)
            buf.narrow(self.dim, 0, start).copy_(self.view)
            COPIED[0] += self.view.numel()
            self.buf = buf
        self.n = need
        return start

    def append(self, x: torch.Tensor) -> None:
        t = x.shape[self.dim]
        start = self.extend(t)
        self.buf.narrow(self.dim, start, t).copy_(x)
        COPIED[0] += x.numel()

    def nbytes(self) -> int:
        """Bytes of the whole buffer (capacity, not only the filled part)."""
        return self.buf.numel() * self.buf.element_size()


def _map(fn, *trees):
    first = trees[0]
    if first is None:
        return None
    if isinstance(first, (torch.Tensor, Growing)):
        return fn(*trees)
    return type(first)(*(_map(fn, *parts) for parts in zip(*trees)))


def _leaves(tree):
    if tree is None:
        return []
    if isinstance(tree, (torch.Tensor, Growing)):
        return [tree]
    return [leaf for part in tree for leaf in _leaves(part)]


def grow(template):
    """The store `template` (a NamedTuple of tensors) as the same NamedTuple of empty Growing."""
    return _map(Growing, template)


def append(store, new) -> None:
    """new's tokens (a NamedTuple of tensors of the store's structure) appended to every part."""
    _map(lambda g, x: g.append(x), store, new)


def extend(store, t: int):
    """Room for t more tokens in every part, counted as filled; (the NamedTuple of whole buffers to write them into
    in place, the token index where they start)."""
    starts = {g.extend(t) for g in _leaves(store)}
    if len(starts) != 1:
        raise ValueError(f"the parts of a store hold different numbers of tokens: {sorted(starts)}")
    return _map(lambda g: g.buf, store), starts.pop()


def view(store):
    """The filled part of every part of the store, as the store's NamedTuple (views, no copies)."""
    return _map(lambda g: g.view, store)


def nbytes(store) -> int:
    """Bytes the store's buffers take (their capacity)."""
    return sum(g.nbytes() for g in _leaves(store))

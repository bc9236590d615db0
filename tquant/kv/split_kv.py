"""Split-KV (flash-decoding) pieces shared by the decode-attention kernels over KIVI / QoQ stores (attention.py) and
KVQuant's store (kvquant_attention.py).

A decode step's query rows [R, D] (the rep query heads of one KV head, padded to R = REP_PAD rows for tl.dot) walk
their share of the cached tokens BLOCK_T at a time with an online softmax in fp32:
    s = q k^T (scores), m' = max(m, max_t s), p = e^(s - m'), alpha = e^(m - m')   (softmax_step)
    l' = alpha l + sum_t p,  acc' = (alpha l / l') acc + (p / l') v                  (accumulate)
acc is the share's output so far, sum_t p_t v_t / l (a convex combination of its values), not the sum itself: bf16 /
fp32 values reach 3e38, and p v summed over a few tokens of equal score would pass fp32's 3.4e38 where the output
does not (each coefficient is at most 1 and they sum to 1, so |acc| <= max |v| up to rounding). Each program stores
its (m, l, acc) (store_partial); combine_kernel merges the SPLITS partials of a row the same way:
    o = sum_s c_s acc_s,   c_s = e^(m_s - M) l_s / sum_s' e^(m_s' - M) l_s',   M = max_s m_s
A fully masked share contributes nothing (its max is -inf, its l 0). dense_tokens runs the same loop over full-precision
keys / values (the residual window, a ring of it, a whole float cache, or an fp8 one times its heads' scales);
reference_attention is the torch reference of the softmax they compute.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kernels.runtime import DTYPES, interpreter_on

REP_PAD = 16  # tl.dot needs M >= 16: the rep query heads of one KV head are padded to this many rows
INTERPRETER_CONFIG = {"BLOCK_T": 16, "SPLITS": 3, "num_warps": 4, "num_stages": 1}


def reference_attention(q, k, v, sm_scale: float, start=None, unread=None) -> torch.Tensor:
    """softmax(sm_scale q K^T + mask) V in fp32 for q [B, Hq, D] and float32 k, v [B, Hkv, T, D] (GQA), tokens
    before start[b] and where unread [B, T] is True masked; in q's dtype."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, Hq, T, D]
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k) * sm_scale
    masked = unread
    if start is not None:
        before = torch.arange(k.shape[2], device=q.device)[None, :] < start.to(q.device)[:, None]
        masked = before if masked is None else masked | before
    if masked is not None:
        scores = scores.masked_fill(masked[:, None, :], float("-inf"))
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), v).to(q.dtype)


@triton.jit
def scores(q, k, live, m, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax, first half: (p, new running max, rescale factor) for the BLOCK_T keys k [BLOCK_T, D]
    (live [BLOCK_T]: the tokens that attend)."""
    return softmax_step(tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION), live, m)


@triton.jit
def softmax_step(s, live, m):
    """Online softmax, first half, from the scores s [R, BLOCK_T] of a tile (live [BLOCK_T]: the tokens that
    attend): (p, new running max, rescale factor)."""
    s = tl.where(live[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # every token masked so far
    return tl.exp(s - m_safe[:, None]), m_new, tl.exp(m - m_safe)


@triton.jit
def initial_state(start_ptr, b, HAS_START: tl.constexpr, R: tl.constexpr, D: tl.constexpr):
    """(first attended cache position of row b: start[b] or 0, and the empty online softmax: running max -inf,
    sum 0, accumulator [R, D] 0)."""
    first = 0
    if HAS_START:
        first = tl.load(start_ptr + b)
    return first, tl.full([R], float("-inf"), dtype=tl.float32), tl.zeros([R], dtype=tl.float32), \
        tl.zeros([R, D], dtype=tl.float32)


@triton.jit
def accumulate(p, v, alpha, l, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax, second half: (l', acc') with the tile's p [R, BLOCK_T] and values v [BLOCK_T, D] added, acc
    kept as the output so far (module docstring). fp16 values (|v| <= 65504) take the dot on p * 2^15, whose sum
    (at most BLOCK_T 2^15 65504) fits fp32, and divide after: in fp16, p itself would lose every p below the
    smallest subnormal 6e-8 (a token e^-17 below the top score), though p v may be as large as the output (6e4 x
    1e-9 = 6e-5 beside values of 0); p * 2^15 keeps p down to 1.8e-12 and p = 1 stays below 65504 (dividing p by l'
    instead would lose long contexts' p to subnormals). bf16 / fp32 ones divide p first (fp32's exponent range), so
    no partial sum passes max |v|. A row with no live token yet keeps l = 0 and acc = 0."""
    l_new = l * alpha + tl.sum(p, axis=1)
    inv = tl.where(l_new > 0, 1.0 / l_new, 0.0)
    if DOT_DTYPE == tl.float16:
        pv = tl.dot((p * 32768.0).to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION) * \
            (inv * (1.0 / 32768.0))[:, None]
    else:
        pv = tl.dot((p * inv[:, None]).to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
    return l_new, acc * (alpha * l * inv)[:, None] + pv


@triton.jit
def store_partial(m_ptr, l_ptr, acc_ptr, m, l, acc, first_row, rows, row_ok, chan, split, splits,
                   D: tl.constexpr):
    """One program's (max, sum, accumulator) of query rows first_row + rows into the workspaces (row-major over
    (query row, split)), which combine_kernel merges."""
    out = (first_row + rows) * splits + split
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(l_ptr + out, l, mask=row_ok)
    tl.store(acc_ptr + out[:, None] * D + chan[None, :], acc, mask=row_ok[:, None])


@triton.jit
def dense_tokens(q, k_ptr, v_ptr, n, pos0, first, newest, m, l, acc, chan, D: tl.constexpr, BLOCK_T: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, RING: tl.constexpr, k_scale=None, v_scale=None):
    """Online softmax over n full-precision tokens, keys / values [n, D] at k_ptr / v_ptr: the updated (m, l, acc).
    Not RING: at cache positions pos0 ... pos0 + n - 1, those before `first` masked. RING: slot s holds the newest
    position p <= newest with p % n == s, and only p in [max(first, pos0), newest] is attended. k_scale, v_scale
    (fp32 scalars; an fp8 store): keys and values are read as k_scale * float(k), v_scale * float(v)."""
    for t0 in range(0, n, BLOCK_T):
        tok = t0 + tl.arange(0, BLOCK_T)
        ok = (tok < n)[:, None]
        k = tl.load(k_ptr + tok[:, None] * D + chan[None, :], mask=ok, other=0.0)
        if k_scale is not None:
            k = k.to(tl.float32) * k_scale
        if RING:
            pos = newest - ((newest - tok) % n + n) % n
            live = (tok < n) & (pos >= first) & (pos >= pos0)
        else:
            live = (tok < n) & (pos0 + tok >= first)
        p, m, alpha = scores(q, k, live, m, DOT_DTYPE, PRECISION)
        v = tl.load(v_ptr + tok[:, None] * D + chan[None, :], mask=ok, other=0.0)
        if v_scale is not None:
            v = v.to(tl.float32) * v_scale
        l, acc = accumulate(p, v, alpha, l, acc, DOT_DTYPE, PRECISION)
    return m, l, acc


@triton.jit
def combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, D: tl.constexpr):
    """o[row] = sum_s c_s acc_s, c_s = e^(m_s - M) l_s / sum_s' e^(m_s' - M) l_s', over the SPLITS partials of one
    query row (each acc_s its share's output, so no sum passes the largest value)."""
    row = tl.program_id(0)
    s = tl.arange(0, SPLITS_PAD)
    ok = s < SPLITS
    m = tl.load(m_ptr + row * SPLITS + s, mask=ok, other=float("-inf"))
    l = tl.load(l_ptr + row * SPLITS + s, mask=ok, other=0.0)
    big = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - big))
    chan = tl.arange(0, D)
    acc = tl.load(acc_ptr + (row * SPLITS + s)[:, None] * D + chan[None, :], mask=ok[:, None], other=0.0)
    c = l * w / tl.sum(l * w, axis=0)
    o = tl.sum(acc * c[:, None], axis=0)
    tl.store(o_ptr + row * D + chan, o.to(o_ptr.dtype.element_ty))


def check_heads(q, kv, name: str) -> tuple[int, int, int, int, int]:
    """(B, Hq, D, Hkv, T) of a query q [B, Hq, D] and a full-precision part kv [B, Hkv, T, D] named `name`; raise
    ValueError naming the problem (dtype, shapes, GQA grouping)."""
    if q.dim() != 3 or q.dtype not in DTYPES:
        raise ValueError(f"q must be [B, Hq, D] fp16 / bf16 / fp32; got {q.dtype} {tuple(q.shape)}")
    b, hq, d = q.shape
    if kv.dim() != 4 or kv.shape[0] != b or kv.shape[-1] != d:
        raise ValueError(f"{name} must be [B={b}, Hkv, T, D={d}]; got {tuple(kv.shape)}")
    hkv = kv.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if hq // hkv > REP_PAD:
        raise ValueError(f"at most {REP_PAD} query heads per KV head; got {hq // hkv}")
    return b, hq, d, hkv, kv.shape[2]


def configs(tokens: int) -> list[dict]:
    """Candidates for a packed store of `tokens` (rounded up to a power of two): BLOCK_T 64 / 128, 4 or 8 warps,
    1 or 2 pipeline stages (more stages hold more tiles in shared memory and cut the programs an SM runs), and
    splits that give the grid about 1-4 programs per SM (132 on an H100) for B * Hkv = 8 and 64 (a split is at
    least 256 tokens); the first is the default."""
    if interpreter_on():
        return [INTERPRETER_CONFIG]
    out = []
    for splits in sorted({max(1, min(64, tokens // 256 // f)) for f in (1, 2, 4, 8)}, reverse=True):
        for block_t in (64, 128):
            for warps in (4, 8):
                for stages in (1, 2):
                    out.append({"BLOCK_T": block_t, "SPLITS": splits, "num_warps": warps, "num_stages": stages})
    return out

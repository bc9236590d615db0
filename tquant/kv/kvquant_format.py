"""KVQuant's KV-cache format (Hooper et al., 2024) in plain torch: what KVQuantLayer stores and what a decode-attention
kernel reads. X [B, H, T, D]: batch rows, KV heads, tokens, head size; epw = 32 // bits codes per int32 word.

Per layer, calibrated offline (LayerParams; the method's JSON-able fields):
    key_offset, key_scale  fp32 [H, D]     each key channel's dense range [lo, hi] (calibration quantiles) as
                                           offset = (hi + lo) / 2, scale = (hi - lo) / 2
    key_codebook           fp32 [2^bits]   sorted non-uniform centroids in [-1, 1] (NUQ; a uniform grid is
    value_codebook         fp32 [2^bits]   linspace(-1, 1, 2^bits))
Keys (pre-RoPE), per channel, each token quantized on arrival:
    kn = (k - key_offset) / key_scale,  code = the nearest centroid of kn (ties to the lower),
    k_hat = key_codebook[code] * key_scale + key_offset
    outliers: the entries with |kn| > 1 (outside the calibrated range) when the layer keeps outliers; without,
    they take the edge centroids
Values, per token, scaling computed online for each (b, h, t) vector:
    offset, scale  fp16 [B, H, T]  the vector's dense range [mn, mx] without its outliers as (mx + mn) / 2 and
                                   (mx - mn) / 2, rounded to fp16 first (the codes are chosen against them)
    vn = (v - offset) / scale,  code as for keys,  v_hat = value_codebook[code] * scale + offset (fp32)
    outliers: the n_outliers = ceil(outliers * D) entries of each vector farthest from the vector's median
Codes (keys and values): int32 [B, H, T, W], W = ceil(D / epw): one vector's D codes packed along its channels by
    tquant.formats.packing (channel d: word d // epw, bits (d % epw) * bits), so codes[b, h, t0:t1] is a [tokens, W] tile.
Outliers (None when the layer keeps none); each replaces the dense decode at its position:
    keys (a variable number per token): Sparse, CSR with one row per (t, b, h) vector, rows r = (t * B + b) * H + h
    (tokens outermost, so appending tokens appends rows; a (b, h) decode program reads rows t * B * H + b * H + h):
        row_ptr  int32 [T * B * H + 1]  row r's outliers are entries row_ptr[r] : row_ptr[r + 1]
        index    int16 [nnz]            their channel d in [0, D), ascending within a row
        value    fp16  [nnz]            the key entries themselves (pre-RoPE keys unless pre_rope=False)
    values (exactly n_outliers per vector): Outliers, dense, no row pointers
        channel  int16 [B, H, T, n_outliers]  ascending channels d of each vector's outliers
        value    fp16  [B, H, T, n_outliers]  the entries themselves
Pre-RoPE keys: the model caches k_rot = k * cos + rotate_half(k) * sin (cos, sin [B or 1, T, D] of each token's
position, a * cos(angle) with a the RoPE attention scaling); unrotate() gives back
k = (k_rot * cos - rotate_half(k_rot) * sin) / (cos^2 + sin^2) and apply_rope() re-applies each token's own.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half

from ..formats.packing import pack_codes, unpack_codes

KVQUANT_BITS = (2, 3, 4)


class LayerParams(NamedTuple):
    key_offset: torch.Tensor
    key_scale: torch.Tensor
    key_codebook: torch.Tensor
    value_codebook: torch.Tensor


class Sparse(NamedTuple):
    row_ptr: torch.Tensor
    index: torch.Tensor
    value: torch.Tensor


class Outliers(NamedTuple):
    channel: torch.Tensor
    value: torch.Tensor


class PackedKeys(NamedTuple):
    codes: torch.Tensor
    sparse: Sparse | None


class PackedValues(NamedTuple):
    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    sparse: Outliers | None


def nbytes(part) -> int:
    """Bytes of the tensors in a (nested) NamedTuple of this format."""
    if part is None:
        return 0
    if isinstance(part, torch.Tensor):
        return part.numel() * part.element_size()
    return sum(nbytes(x) for x in part)


def check_bits(bits: int) -> None:
    if bits not in KVQUANT_BITS:
        raise ValueError(f"kvquant: kv_bits={bits} is not supported; choose one of {KVQUANT_BITS}")


def value_outliers(fraction: float, head_dim: int) -> int:
    """Outliers kept per value vector: the top `fraction` of its head_dim entries, rounded up."""
    return math.ceil(fraction * head_dim - 1e-9)


def uniform_codebook(bits: int) -> torch.Tensor:
    return torch.linspace(-1, 1, 2**bits)


def _encode(xn: torch.Tensor, codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """Normalized x [..., D] -> packed codes int32 [..., W] of the nearest centroids."""
    *lead, d = xn.shape
    codes = torch.bucketize(xn.contiguous(), (codebook[1:] + codebook[:-1]) / 2)
    return pack_codes(codes.reshape(-1, d), bits).t().reshape(*lead, -1)


def _decode(codes: torch.Tensor, codebook: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    *lead, w = codes.shape
    return codebook[unpack_codes(codes.reshape(-1, w).t(), bits, d).t().long()].reshape(*lead, d)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [T * B * H, D]: the key CSR's rows."""
    return x.permute(2, 0, 1, 3).reshape(-1, x.shape[-1])


def _sparse(x: torch.Tensor, mask: torch.Tensor) -> Sparse:
    """The entries of x [B, H, T, D] where mask, as CSR by (t, b, h) vector."""
    xr, mr = _rows(x), _rows(mask)
    row_ptr = F.pad(mr.sum(-1).cumsum(0), (1, 0)).to(torch.int32)
    return Sparse(row_ptr, mr.nonzero()[:, 1].to(torch.int16), xr[mr].to(torch.float16))


def _scatter(x: torch.Tensor, sp: Sparse) -> torch.Tensor:
    """x [B, H, T, D] float32 with the CSR entries written in."""
    b, h, t, d = x.shape
    rows = _rows(x).clone()
    which = torch.repeat_interleave(torch.arange(rows.shape[0], device=x.device), sp.row_ptr.diff())
    rows[which, sp.index.long()] = sp.value.float()
    return rows.view(t, b, h, d).permute(1, 2, 0, 3).contiguous()


def _outliers(x: torch.Tensor, mask: torch.Tensor, n: int) -> Outliers:
    """The n entries of each vector of x [B, H, T, D] where mask (exactly n per vector), channels ascending."""
    channel = mask.nonzero()[:, -1].view(*x.shape[:-1], n)
    return Outliers(channel.to(torch.int16), x.gather(-1, channel).to(torch.float16))


def appendable(b, a):
    """b (PackedKeys or PackedValues) as its parts follow a's in one store: the key CSR's row pointers past a's
    entries, without their leading 0; every other part as it is (tokens: dim 2 of codes [B, H, T, W], scale / offset
    [B, H, T], outliers [B, H, T, n]; the CSR's index and value arrays [nnz])."""
    def part(y, x):
        if isinstance(y, Sparse):
            return Sparse(y.row_ptr[1:] + x.row_ptr[-1], y.index, y.value)
        return y

    return type(b)(*(part(y, x) for y, x in zip(b, a)))


def quantize_keys(k: torch.Tensor, p: LayerParams, bits: int, outliers: bool) -> PackedKeys:
    """Pre-RoPE keys [B, H, T, D] -> codes (per channel, calibrated ranges) and, with outliers, the sparse part."""
    kn = (k.float() - p.key_offset[:, None]) / p.key_scale[:, None]
    return PackedKeys(_encode(kn, p.key_codebook, bits), _sparse(k, kn.abs() > 1) if outliers else None)


def dequantize_keys(pk: PackedKeys, p: LayerParams, bits: int) -> torch.Tensor:
    k = _decode(pk.codes, p.key_codebook, bits, p.key_offset.shape[-1]) * p.key_scale[:, None] + p.key_offset[:, None]
    return k if pk.sparse is None else _scatter(k, pk.sparse)


def value_ranges(v: torch.Tensor, n_outliers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offset, scale) fp16 [B, H, T] of each vector's dense range, and its outlier mask [B, H, T, D]."""
    v = v.float()
    mask = torch.zeros_like(v, dtype=torch.bool)
    if n_outliers:
        far = (v - v.median(dim=-1, keepdim=True).values).abs()
        mask.scatter_(-1, far.topk(n_outliers, dim=-1).indices, True)
    mx, mn = v.masked_fill(mask, -math.inf).amax(-1), v.masked_fill(mask, math.inf).amin(-1)
    scale = ((mx - mn) / 2).half()
    return ((mx + mn) / 2).half(), torch.where(scale > 0, scale, torch.ones_like(scale)), mask


def normalize_values(v: torch.Tensor, n_outliers: int):
    """(vn = (v - offset) / scale float32 [B, H, T, D], offset, scale, outlier mask): value_ranges applied."""
    offset, scale, mask = value_ranges(v, n_outliers)
    return (v.float() - offset.float()[..., None]) / scale.float()[..., None], offset, scale, mask


def quantize_values(v: torch.Tensor, codebook: torch.Tensor, bits: int, n_outliers: int) -> PackedValues:
    """Values [B, H, T, D] -> codes and fp16 scale / offset per vector, and the n_outliers per vector (Outliers)."""
    vn, offset, scale, mask = normalize_values(v, n_outliers)
    return PackedValues(_encode(vn, codebook, bits), scale, offset, _outliers(v, mask, n_outliers) if n_outliers
                        else None)


def dequantize_values(pv: PackedValues, codebook: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    v = _decode(pv.codes, codebook, bits, head_dim) * pv.scale.float()[..., None] + pv.offset.float()[..., None]
    return v if pv.sparse is None else v.scatter(-1, pv.sparse.channel.long(), pv.sparse.value.float())


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype):
    """cos, sin [B or 1, T, D] of positions [B or 1, T], as transformers' rotary embeddings compute them."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device, torch.float32)
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated by cos, sin [B or 1, T, D] (float32)."""
    cos, sin = cos.float()[:, None], sin.float()[:, None]
    return x.float() * cos + rotate_half(x.float()) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of apply_rope (float32)."""
    cos, sin = cos.float()[:, None], sin.float()[:, None]
    return (x.float() * cos - rotate_half(x.float()) * sin) / (cos * cos + sin * sin)

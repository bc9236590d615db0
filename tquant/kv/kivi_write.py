"""KIVI's static-cache decode write (tquant.kv.static_cache.StaticKiviCache) in one launch a layer: the step's token
into the full-precision ring, then the pending group quantized from the ring into its store rows.

    k, v         [B, H, 1, D] float, any strides with D contiguous: the decode step's token
    ring_k/v     [B, H, W, D] the model's dtype, contiguous: position p at slot p % W (W = residual + G >= G)
    k_store      PackedKV per channel (uniform_format.quantize_keys): codes int32 [B, H, NG * wpg, D],
                 scale, mn fp16 [B, H, NG, D]; token i of a group at word i // epw, bits (i % epw) * bits
    v_store      PackedKV per token (quantize_values): codes int32 [B, H, NG * G, D / G * wpg], scale, mn fp16
                 [B, H, NG * G, D / G]; channel c of a group at word c // epw of the group's wpg, bits (c % epw) * bits
    slot         int64 [1]: the ring slot of the token (prepare's newest position % W)
    flushed      int64 [1]: flushed(n) after the token, a multiple of G (prepare's)
epw = 32 // bits codes a word, wpg = ceil(G / epw) words a group (3 bits: 10 codes, 2 bits unused).

Step (as StaticKiviCache.write's torch path for t = 1, kivi_write_ref, does it):
    ring[b, h, slot] = x[b, h, 0] (converted to the ring's dtype), for x = k into ring_k and v into ring_v
    X = ring[b, h, (flushed + i) % W] for i = 0 ... G - 1: the pending group, the token just written included
    keys:   per channel c over the G tokens of X (NG row flushed / G, words flushed / G * wpg + w)
    values: per token i over each group of G channels of X (row flushed + i)
    each group: scale = (max - min) / L, L = 2^bits - 1, by IEEE division in fp32 (past fp32's range: max / L -
    min / L), scale and mn = min rounded to fp16, an fp16 scale of 0 -> 1, code = clamp(round_half_even((x - mn) /
    scale), 0, L) against the rounded parameters: minmax_quantize's codes and parameters bit for bit.
The slot and the store rows are read from device tensors, so the launch is the same at every position (a CUDA graph
replays it); the rows are within the store by the cache's construction (NG = ceil(max_len / G) + 1: one spare group
for the pending one), which the kernel cannot check without a host sync. Nor does it check that a bf16 / fp32 group's
fp16 parameters are finite: the cache's check_range reads what was stored.

Kernel: grid (B * H, 2), one program the keys (axis 1 = 0: _write_keys) or values (1: _write_values) of one
(sequence, KV head), in G * D / 1024 warps (1 to 16: no spill at G = D = 128 on sm_90): it stores the token into its
ring slot and loads the other G - 1 pending slots (masked off the token's slot, whose value it has in registers: no
read of its own store), so no program waits on another. Min and max in registers ([G, D] for keys reduced over
tokens, [G, D / G, G] for values reduced over each group's channels), IEEE divisions (tl.div_rn, as torch divides),
the codes packed by an integer sum of disjoint bit fields, one word of each group at a time. A token wider than a
bf16 ring is rounded to it by integer rounding of its fp32 bits, as torch's .to rounds (the interpreter's conversion
truncates). Replaces the ~15 torch launches of the torch path (two ring index_copy_, two index_select, quantize_keys
/ quantize_values, six index_copy_ into the stores); a prefill (t > 1) keeps that path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .uniform_format import KV_BITS, PackedKV, quantize_keys, quantize_values, words_per_group
from .write import _minmax_codes
from ..kernels.runtime import check_device


def store_pending_group(ring_k, ring_v, k_store: PackedKV, v_store: PackedKV, pending, key_rows, value_rows,
                        bits: int, group: int) -> None:
    """KIVI's pending group (ring slots `pending`, int64 [G]) quantized into one layer's stores: keys per channel
    into code rows key_rows[0] (int64 [wpg]) and parameter row key_rows[1] / key_rows[2] ([1]), values per token
    into rows value_rows (int64 [G])."""
    for part, x, index in zip(k_store, quantize_keys(ring_k.index_select(2, pending), bits, group), key_rows):
        part.index_copy_(2, index, x)
    for part, x in zip(v_store, quantize_values(ring_v.index_select(2, pending), bits, group)):
        part.index_copy_(2, value_rows, x)


def kivi_write_ref(k, v, ring_k, ring_v, k_store: PackedKV, v_store: PackedKV, slot, flushed, bits: int,
                   group: int) -> None:
    """The torch path of StaticKiviCache.write for one decode token (module docstring): ring index_copy_, then the
    pending group quantized into the stores (store_pending_group)."""
    w, wpg = ring_k.shape[2], words_per_group(bits, group)
    offsets = torch.arange(group, device=ring_k.device)
    pending = (flushed + offsets) % w
    ring_k.index_copy_(2, slot, k.to(ring_k.dtype))
    ring_v.index_copy_(2, slot, v.to(ring_v.dtype))
    first = flushed // group
    key_rows = (first * wpg + torch.arange(wpg, device=ring_k.device), first, first)
    store_pending_group(ring_k, ring_v, k_store, v_store, pending, key_rows, flushed + offsets, bits, group)


@triton.jit
def _to_ring(x, DTYPE: tl.constexpr):
    """x in the ring's dtype, rounded to nearest even as torch's .to: to bf16 from a wider float by integer rounding
    of the fp32 bits (the interpreter's conversion truncates; on the GPU both round the same)."""
    if DTYPE == tl.bfloat16 and x.dtype != tl.bfloat16:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # the low half rounded away, half to even
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _pending_group(x_ptr, ring_ptr, slot, rows, ch, D: tl.constexpr):
    """The token x (channels ch) stored at its ring slot, and the pending group (ring slots rows, broadcast against
    ch) as fp32, the token's slot taken from registers."""
    new = _to_ring(tl.load(x_ptr + ch), ring_ptr.dtype.element_ty)
    tl.store(ring_ptr + slot * D + ch, new)
    mine = rows == slot
    old = tl.load(ring_ptr + rows * D + ch, mask=~mine, other=0.0)
    return tl.where(mine, new, old).to(tl.float32)


@triton.jit
def _write_keys(x_ptr, ring_ptr, codes_ptr, scale_ptr, mn_ptr, slot, pending, group, D: tl.constexpr,
                BITS: tl.constexpr, WPG: tl.constexpr):
    """Keys: the pending group [G tokens (pending: their ring slots), D channels], per channel over the tokens, into
    parameter row `group` of the (sequence, head)'s store and its code rows group * WPG ... + WPG - 1."""
    EPW: tl.constexpr = 32 // BITS
    c = tl.arange(0, D)[None, :]
    code, scale, mn = _minmax_codes(_pending_group(x_ptr, ring_ptr, slot, pending[:, None], c, D), 0, BITS)
    tl.store(scale_ptr + group * D + c, scale)
    tl.store(mn_ptr + group * D + c, mn)
    i = tl.arange(0, pending.shape[0])
    shift = ((i % EPW) * BITS)[:, None]
    for w in tl.static_range(WPG):
        word = tl.sum(tl.where((i // EPW == w)[:, None], code << shift, 0), axis=0)  # disjoint fields: an OR
        tl.store(codes_ptr + (group * WPG + w) * D + c, word[None, :])


@triton.jit
def _write_values(x_ptr, ring_ptr, codes_ptr, scale_ptr, mn_ptr, slot, pending, first_row, D: tl.constexpr,
                  G: tl.constexpr, BITS: tl.constexpr, WPG: tl.constexpr):
    """Values: the pending group [G tokens, D / G groups, G channels], per token over each group's channels, into
    rows first_row ... first_row + G - 1 of the (sequence, head)'s store."""
    EPW: tl.constexpr = 32 // BITS
    j = tl.arange(0, D // G)[None, :, None]
    ci = tl.arange(0, G)[None, None, :]
    x = _pending_group(x_ptr, ring_ptr, slot, pending[:, None, None], j * G + ci, D)
    code, scale, mn = _minmax_codes(x, 2, BITS)
    row = (first_row + tl.arange(0, G))[:, None]  # [G, 1]: the store's row of each pending token
    params = row * (D // G) + tl.reshape(j, (1, D // G))
    tl.store(scale_ptr + params, tl.reshape(scale, (G, D // G)))
    tl.store(mn_ptr + params, tl.reshape(mn, (G, D // G)))
    shift = (ci % EPW) * BITS
    for w in tl.static_range(WPG):
        word = tl.sum(tl.where(ci // EPW == w, code << shift, 0), axis=2)  # [G, D / G]
        tl.store(codes_ptr + params * WPG + w, word)


@triton.jit
def _kivi_write_kernel(k_ptr, v_ptr, rk_ptr, rv_ptr, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, slot_ptr,
                       flushed_ptr, H, sk_b, sk_h, sv_b, sv_h, W, NG, D: tl.constexpr, G: tl.constexpr,
                       BITS: tl.constexpr, WPG: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    slot = tl.load(slot_ptr)
    flushed = tl.load(flushed_ptr)
    pending = (flushed + tl.arange(0, G)) % W  # the ring slots of positions flushed ... flushed + G - 1
    if tl.program_id(1) == 0:
        _write_keys(k_ptr + b * sk_b + h * sk_h, rk_ptr + bh * W * D, kc_ptr, ks_ptr, km_ptr, slot, pending,
                    bh * NG + flushed // G, D, BITS, WPG)
    else:
        _write_values(v_ptr + b * sv_b + h * sv_h, rv_ptr + bh * W * D, vc_ptr, vs_ptr, vm_ptr, slot, pending,
                      bh * NG * G + flushed, D, G, BITS, WPG)


def kivi_write(k, v, ring_k, ring_v, k_store: PackedKV, v_store: PackedKV, slot, flushed, bits: int,
               group: int) -> None:
    """One decode token k, v [B, H, 1, D] into the ring and the pending group into the stores (module docstring)."""
    if bits not in KV_BITS:
        raise ValueError(f"bits={bits} is not supported by KIVI's static write; use one of {KV_BITS}")
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 4 or x.shape[2] != 1 or not x.dtype.is_floating_point or x.stride(-1) != 1:
            raise ValueError(f"{name} must be one decode token [B, H, 1, D], floating point with D contiguous; got "
                             f"{x.dtype} {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape; got {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, _, d = k.shape
    if d & (d - 1) or d < 1:
        raise ValueError(f"head size {d} must be a power of two")
    if group < 1 or group & (group - 1) or d % group:
        raise ValueError(f"group={group} must be a power of two dividing the head size {d}")
    w = ring_k.shape[2] if ring_k.dim() == 4 else 0
    for name, ring in (("ring_k", ring_k), ("ring_v", ring_v)):
        if ring.shape != (b, h, w, d) or w < group or ring.dtype != ring_k.dtype \
                or ring.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not ring.is_contiguous():
            raise ValueError(f"{name} must be contiguous [B, H, W >= group, D] fp16 / bf16 / fp32 (ring_k's dtype) "
                             f"for k {tuple(k.shape)} and group {group}; got {ring.dtype} {tuple(ring.shape)}")
    wpg = words_per_group(bits, group)
    ng = k_store.scale.shape[2] if k_store.scale.dim() == 4 else 0
    expected = {"k_store": (k_store, [(b, h, ng * wpg, d), (b, h, ng, d), (b, h, ng, d)],
                            "codes int32 [B, H, NG * wpg, D] and fp16 scale, mn [B, H, NG, D]"),
                "v_store": (v_store, [(b, h, ng * group, d // group * wpg), *[(b, h, ng * group, d // group)] * 2],
                            "codes int32 [B, H, NG * G, D / G * wpg] and fp16 scale, mn [B, H, NG * G, D / G]")}
    for name, (store, shapes, what) in expected.items():
        got = [tuple(p.shape) for p in store]
        if ng < 1 or got != shapes or store.codes.dtype != torch.int32 or store.scale.dtype != torch.float16 \
                or store.mn.dtype != torch.float16 or not all(p.is_contiguous() for p in store):
            raise ValueError(f"{name} must be contiguous {what} (wpg = {wpg} words a group of {group} at "
                             f"{bits} bits) for k {tuple(k.shape)}; got {[p.dtype for p in store]} {got}")
    for name, index in (("slot", slot), ("flushed", flushed)):
        if index.shape != (1,) or index.dtype != torch.int64:
            raise ValueError(f"{name} must be int64 [1] (StaticKiviCache.prepare's); got {index.dtype} "
                             f"{tuple(index.shape)}")
    check_device({"k": k, "v": v, "ring_k": ring_k, "ring_v": ring_v, "k_store": k_store.codes,
                  "v_store": v_store.codes, "slot": slot, "flushed": flushed})
    if b * h == 0:
        return
    _kivi_write_kernel[(b * h, 2)](k, v, ring_k, ring_v, *k_store, *v_store, slot, flushed, h, k.stride(0),
                                   k.stride(1), v.stride(0), v.stride(1), w, ng, D=d, G=group, BITS=bits, WPG=wpg,
                                   num_warps=max(1, min(16, group * d // 1024)))


__all__ = ["kivi_write", "kivi_write_ref", "store_pending_group"]

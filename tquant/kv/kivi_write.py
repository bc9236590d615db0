"""KIVI's static-cache writes (tquant.kv.static_cache.StaticKiviCache) in one launch a layer each: a decode step's
token into the full-precision ring and the pending group quantized from the ring into its store rows (kivi_write);
a prefill's complete groups quantized straight from k, v into the store (kivi_prefill_write).

    k, v         [B, H, 1, D] float, any strides with D contiguous: the decode step's token (kivi_write);
                 [B, H, n, D], n a multiple of G: a prefill's positions 0 ... n - 1 (kivi_prefill_write)
    ring_k/v     [B, H, W, D] the model's dtype, contiguous: position p at slot p % W (W = residual + G >= G)
    k_store      PackedKV per channel (uniform_format.quantize_keys): codes int32 [B, H, NG * wpg, D],
                 scale, mn fp16 [B, H, NG, D]; token i of a group at word i // epw, bits (i % epw) * bits
    v_store      PackedKV per token (quantize_values): codes int32 [B, H, NG * G, D / G * wpg], scale, mn fp16
                 [B, H, NG * G, D / G]; channel c of a group at word c // epw of the group's wpg, bits (c % epw) * bits
    slot         int64 [1]: the ring slot of the token (prepare's newest position % W)
    flushed      int64 [1]: flushed(n) after the token, a multiple of G (prepare's)
epw = 32 // bits codes a word, wpg = ceil(G / epw) words a group (3 bits: 10 codes, 2 bits unused).

Decode step (as StaticKiviCache.write's torch path for t = 1, kivi_write_ref, does it):
    ring[b, h, slot] = x[b, h, 0] (converted to the ring's dtype), for x = k into ring_k and v into ring_v
    X = ring[b, h, (flushed + i) % W] for i = 0 ... G - 1: the pending group, the token just written included
    keys:   per channel c over the G tokens of X (NG row flushed / G, words flushed / G * wpg + w)
    values: per token i over each group of G channels of X (row flushed + i)
Prefill (as its torch path, kivi_prefill_write_ref: quantize_keys / quantize_values of k, v in their own dtype):
    X = x[b, h, g * G + i] for i = 0 ... G - 1, group g = 0 ... n / G - 1; keys into NG row g (words g * wpg + w),
    values into rows g * G + i, quantized as above
Each group: scale = (max - min) / L, L = 2^bits - 1, by IEEE division in fp32 (past fp32's range: max / L -
min / L), scale and mn = min rounded to fp16, an fp16 scale of 0 -> 1, code = clamp(round_half_even((x - mn) /
scale), 0, L) against the rounded parameters: minmax_quantize's codes and parameters bit for bit.
The decode step's slot and store rows are read from device tensors, so its launch is the same at every position (a
CUDA graph replays it); the rows are within the store by the cache's construction (NG = ceil(max_len / G) + 1: one
spare group for the pending one), which the kernel cannot check without a host sync. Neither kernel checks that a
bf16 / fp32 group's fp16 parameters are finite (the torch path's quantize_keys / quantize_values raise there): the
cache's check_range reads what was stored.

Decode kernel: grid (B * H, 2), one program the keys (axis 1 = 0) or values (1) of one (sequence, KV head), in
G * D / 1024 warps (1 to 16: no spill at G = D = 128 on sm_90): it stores the token into its ring slot and loads
the other G - 1 pending slots (masked off the token's slot, whose value it has in registers: no read of its own
store), so no program waits on another. A token wider than a bf16 ring is rounded to it by integer rounding of its
fp32 bits, as torch's .to rounds (the interpreter's conversion truncates). Replaces the ~15 torch launches of the
torch path (two ring index_copy_, two index_select, quantize_keys / quantize_values, six index_copy_ into the stores).
Prefill kernel: grid (B * H, n / G, 2), one program the keys (axis 2 = 0) or values (1) of one group of G tokens of
one (sequence, KV head), loaded straight from k / v, same warps; replaces quantize_keys / quantize_values and the
stores' copies (~150 torch launches a layer at n = 1024 on the CPU profiler).
Both quantize a group in the same jit helpers (_store_keys, _store_values): min and max in registers ([G, D] for
keys reduced over tokens, [G, D / G, G] for values reduced over each group's channels), IEEE divisions (tl.div_rn,
as torch divides), the codes packed by an integer sum of disjoint bit fields, one word of each group at a time.
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
def _value_channels(D: tl.constexpr, G: tl.constexpr):
    """[1, D / G, G] int32: channel j * G + c of value group j, the layout _store_values takes."""
    return (tl.arange(0, D // G)[:, None] * G + tl.arange(0, G)[None, :])[None, :, :]


@triton.jit
def _store_keys(x, codes_ptr, scale_ptr, mn_ptr, group, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                WPG: tl.constexpr):
    """Keys x [G tokens, D channels] fp32, per channel over the tokens, into parameter row `group` of a (sequence,
    head)'s store and its code rows group * WPG ... + WPG - 1 (token i at word i // EPW, bits (i % EPW) * BITS)."""
    EPW: tl.constexpr = 32 // BITS
    c = tl.arange(0, D)[None, :]
    code, scale, mn = _minmax_codes(x, 0, BITS)
    tl.store(scale_ptr + group * D + c, scale)
    tl.store(mn_ptr + group * D + c, mn)
    i = tl.arange(0, G)
    shift = ((i % EPW) * BITS)[:, None]
    for w in tl.static_range(WPG):
        word = tl.sum(tl.where((i // EPW == w)[:, None], code << shift, 0), axis=0)  # disjoint fields: an OR
        tl.store(codes_ptr + (group * WPG + w) * D + c, word[None, :])


@triton.jit
def _store_values(x, codes_ptr, scale_ptr, mn_ptr, first_row, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                  WPG: tl.constexpr):
    """Values x [G tokens, D / G groups, G channels] fp32, per token over each group's channels, into rows
    first_row ... first_row + G - 1 of a (sequence, head)'s store (channel c of a group at word c // EPW, bits
    (c % EPW) * BITS)."""
    EPW: tl.constexpr = 32 // BITS
    j = tl.arange(0, D // G)[None, :]
    ci = tl.arange(0, G)[None, None, :]
    code, scale, mn = _minmax_codes(x, 2, BITS)
    row = (first_row + tl.arange(0, G))[:, None]  # [G, 1]: the store's row of each token
    params = row * (D // G) + j
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
        keys = _pending_group(k_ptr + b * sk_b + h * sk_h, rk_ptr + bh * W * D, slot, pending[:, None],
                              tl.arange(0, D)[None, :], D)
        _store_keys(keys, kc_ptr, ks_ptr, km_ptr, bh * NG + flushed // G, D, G, BITS, WPG)
    else:
        ch = _value_channels(D, G)
        values = _pending_group(v_ptr + b * sv_b + h * sv_h, rv_ptr + bh * W * D, slot, pending[:, None, None], ch,
                                D)
        _store_values(values, vc_ptr, vs_ptr, vm_ptr, bh * NG * G + flushed, D, G, BITS, WPG)


@triton.jit
def _kivi_prefill_kernel(k_ptr, v_ptr, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, H, sk_b, sk_h, sk_t, sv_b,
                         sv_h, sv_t, NG, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, WPG: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    group = tl.program_id(1).to(tl.int64)
    token = group * G + tl.arange(0, G)  # the group's G tokens
    if tl.program_id(2) == 0:
        keys = tl.load(k_ptr + b * sk_b + h * sk_h + token[:, None] * sk_t + tl.arange(0, D)[None, :])
        _store_keys(keys.to(tl.float32), kc_ptr, ks_ptr, km_ptr, bh * NG + group, D, G, BITS, WPG)
    else:
        ch = _value_channels(D, G)
        values = tl.load(v_ptr + b * sv_b + h * sv_h + token[:, None, None] * sv_t + ch)
        _store_values(values.to(tl.float32), vc_ptr, vs_ptr, vm_ptr, (bh * NG + group) * G, D, G, BITS, WPG)


def _check_stores(k, v, k_store: PackedKV, v_store: PackedKV, bits: int, group: int, tokens) -> tuple[int, int]:
    """(NG, wpg) of the stores for k, v [B, H, t, D], or ValueError; tokens: (whether t fits, what k must be)."""
    if bits not in KV_BITS:
        raise ValueError(f"bits={bits} is not supported by KIVI's static write; use one of {KV_BITS}")
    fits, what = tokens
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 4 or not fits(x.shape[2]) or not x.dtype.is_floating_point or x.stride(-1) != 1:
            raise ValueError(f"{name} must be {what}, floating point with D contiguous; got {x.dtype} "
                             f"{tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape; got {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, _, d = k.shape
    if d & (d - 1) or d < 1:
        raise ValueError(f"head size {d} must be a power of two")
    if group < 1 or group & (group - 1) or d % group:
        raise ValueError(f"group={group} must be a power of two dividing the head size {d}")
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
    return ng, wpg


def _warps(group: int, d: int) -> int:
    return max(1, min(16, group * d // 1024))


def kivi_write(k, v, ring_k, ring_v, k_store: PackedKV, v_store: PackedKV, slot, flushed, bits: int,
               group: int) -> None:
    """One decode token k, v [B, H, 1, D] into the ring and the pending group into the stores (module docstring)."""
    ng, wpg = _check_stores(k, v, k_store, v_store, bits, group, (lambda t: t == 1, "one decode token [B, H, 1, D]"))
    b, h, _, d = k.shape
    w = ring_k.shape[2] if ring_k.dim() == 4 else 0
    for name, ring in (("ring_k", ring_k), ("ring_v", ring_v)):
        if ring.shape != (b, h, w, d) or w < group or ring.dtype != ring_k.dtype \
                or ring.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not ring.is_contiguous():
            raise ValueError(f"{name} must be contiguous [B, H, W >= group, D] fp16 / bf16 / fp32 (ring_k's dtype) "
                             f"for k {tuple(k.shape)} and group {group}; got {ring.dtype} {tuple(ring.shape)}")
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
                                   num_warps=_warps(group, d))


def kivi_prefill_write_ref(k, v, k_store: PackedKV, v_store: PackedKV, bits: int, group: int) -> None:
    """The torch path of kivi_prefill_write: quantize_keys / quantize_values of k, v into the stores' first rows."""
    for store, new in ((k_store, quantize_keys(k, bits, group)), (v_store, quantize_values(v, bits, group))):
        for part, x in zip(store, new):
            part[:, :, :x.shape[2]] = x


def kivi_prefill_write(k, v, k_store: PackedKV, v_store: PackedKV, bits: int, group: int) -> None:
    """A prefill's complete groups k, v [B, H, n, D] (positions 0 ... n - 1, n a multiple of G) into key groups
    0 ... n / G - 1 and value rows 0 ... n - 1 of the stores (module docstring)."""
    ng, wpg = _check_stores(k, v, k_store, v_store, bits, group,
                            (lambda t: group > 0 and t % group == 0, f"complete groups [B, H, n * {group}, D]"))
    b, h, n, d = k.shape
    if n // group > min(ng, 65535):
        raise ValueError(f"{n // group} groups of {group} tokens must fit the store's NG={ng} groups and a launch "
                         "grid's 65535")
    check_device({"k": k, "v": v, "k_store": k_store.codes, "v_store": v_store.codes})
    if b * h * n == 0:
        return
    _kivi_prefill_kernel[(b * h, n // group, 2)](k, v, *k_store, *v_store, h, *k.stride()[:3], *v.stride()[:3], ng,
                                                 D=d, G=group, BITS=bits, WPG=wpg, num_warps=_warps(group, d))


__all__ = ["kivi_prefill_write", "kivi_prefill_write_ref", "kivi_write", "kivi_write_ref", "store_pending_group"]

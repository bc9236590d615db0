"""GPTQ checkpoints (`quant_method: gptq`, AutoGPTQ / GPTQModel / optimum, read by vLLM, SGLang, transformers), both ways.

Layout, as GPTQModel's loaders read it (gptqmodel/nn_modules/qlinear: packing along K, qzeros along N, g_idx;
gptqmodel/utils/model.py convert_gptq_v1_to_v2_format: v1 zeros stored minus 1):
    config.json quantization_config (and quantize_config.json, which AutoGPTQ reads)
        {"quant_method": "gptq", "bits": 4, "group_size": 64 | -1, "desc_act": bool, "sym": bool,
         "checkpoint_format": "gptq" (v1) | "gptq_v2", "lm_head": false, ["dynamic": {"-:^layer$": {}}]}
    per layer L (W [N, K], G = K // group_size, or 1 for group_size -1):
        L.qweight  int32 [K * bits / 32, N]   codes packed along K (dense bit stream: 3-bit codes cross words)
        L.qzeros   int32 [G, N * bits / 32]   zero points packed along N; v1 stores zero - 1, v2 the zero
        L.scales   float [G, N]
        L.g_idx    int32 [K]                  the group of each input channel (act-order: not k // group_size)
        L.bias     [N] (optional)
        W[n, k] = (code[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]
Codes and zeros are unsigned in [0, 2^bits). tquant's K-packed qweight is this qweight for 2, 4 and 8 bits; a tquant
perm (storage column j holds input channel perm[j], group j // group_size) becomes g_idx[perm[j]] = j // group_size
with the codes put back in input order, and on import perm = the stable sort of g_idx. Round trips are exact in
weights; within a group the channel order may differ from the original perm (GPTQ does not record it).
v1 cannot hold a zero point of 0 (stored -1 wraps to 2^bits - 1 and v1 readers add 1 back without wrapping): the v1
export refuses it and names v2; the v1 import follows the v1 readers (stored + 1).
"""
from __future__ import annotations

import torch
from torch import nn

from ..modules.packed_linear import PackedLinear
from .common import (check_kernel_bits, expect, fail, finish, hf_config, linear_names, pack_dense, packed_linear,
                     plain_tensors, skeleton, unpack_dense, unpacked)

QUANT_METHOD = "gptq"
V1, V2 = "gptq", "gptq_v2"  # checkpoint_format values


def perm_from_g_idx(name: str, g_idx: torch.Tensor, k: int, group_size: int) -> torch.Tensor | None:
    """tquant's perm (int32 [K], storage order) from a g_idx: None when g_idx is k // group_size, else the stable
    sort of g_idx, which needs exactly group_size channels in each group."""
    expect(name, g_idx, (k,), (torch.int32, torch.int64))
    g = g_idx.to(torch.int64)
    groups = k // group_size
    if g.min() < 0 or g.max() >= groups:
        fail(name, f"values {int(g.min())}..{int(g.max())}, expected group indices 0..{groups - 1}")
    if torch.equal(g, torch.arange(k) // group_size):
        return None
    counts = torch.bincount(g, minlength=groups)
    if (counts != group_size).any():
        j = int((counts != group_size).nonzero()[0])
        fail(name, f"group {j} has {int(counts[j])} input channels, expected {group_size} (tquant's act-order "
             "storage keeps equal groups)")
    return torch.sort(g, stable=True).indices.to(torch.int32)


def export_layer(name: str, mod: PackedLinear, fmt: str) -> tuple[dict[str, torch.Tensor], bool]:
    b, k, n, gs = mod.bits, mod.in_features, mod.out_features, mod.group_size
    if (k * b) % 32 or (n * b) % 32:
        fail(name, f"in_features={k} and out_features={n} must fill whole int32 words at {b} bits for GPTQ "
             f"(multiples of {32 // __import__('math').gcd(32, b)})")
    codes = unpacked(mod)  # [K, N] storage order
    g_idx = torch.arange(k, dtype=torch.int32) // gs
    if mod.perm is not None:
        perm = mod.perm.long()
        orig = torch.empty_like(codes)
        orig[perm] = codes
        codes = orig
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = torch.arange(k, dtype=torch.int32) // gs
    zeros = mod.zeros.float()
    if not torch.equal(zeros, zeros.round()) or zeros.min() < 0 or zeros.max() > 2**b - 1:
        fail(f"{name}.zeros", f"zero points must be integers in 0..{2**b - 1} for GPTQ")
    stored = zeros.to(torch.int64)
    if fmt == V1:
        if (stored == 0).any():
            fail(f"{name}.zeros", "a zero point of 0 cannot be stored in GPTQ v1 (zero - 1 = -1)",
                 "export with checkpoint_format='gptq_v2' (--gptq-format v2), or quantize with sym=True")
        stored = stored - 1
    out = {f"{name}.qweight": pack_dense(codes.t(), b).t().contiguous(),
           f"{name}.qzeros": pack_dense(stored, b),
           f"{name}.scales": mod.scales.contiguous(),
           f"{name}.g_idx": g_idx}
    if mod.bias is not None:
        out[f"{name}.bias"] = mod.bias
    return out, bool((zeros == 2 ** (b - 1)).all())


def export(model: nn.Module, layers: dict[str, PackedLinear], checkpoint_format: str = V1):
    if checkpoint_format not in (V1, V2):
        raise ValueError(f"checkpoint_format={checkpoint_format!r}: expected {V1!r} (v1) or {V2!r} (v2)")
    kinds = {(m.bits, m.group_size if m.group_size != m.in_features else -1) for m in layers.values()}
    if len(kinds) != 1:
        raise ValueError(f"GPTQ checkpoints hold one bits / group_size for every layer; this model has "
                         f"{sorted(kinds)}: export it with --format compressed-tensors (one scheme per group)")
    (bits, group_size), = kinds
    tensors, sym = {}, True
    for name, mod in layers.items():
        t, s = export_layer(name, mod, checkpoint_format)
        tensors |= t
        sym &= s
    float_linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    qc = {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size,
          "desc_act": any(m.perm is not None for m in layers.values()), "sym": sym, "static_groups": False,
          "true_sequential": True, "lm_head": "lm_head" in layers, "checkpoint_format": checkpoint_format,
          "pack_dtype": "int32"}
    skipped = [n for n in float_linears if n != "lm_head"]
    if skipped:  # GPTQModel's per-module overrides: "-:" excludes a layer (vLLM reads it too)
        qc["dynamic"] = {f"-:^{n.replace('.', '[.]')}$": {} for n in skipped}
    tensors |= plain_tensors(model, set(layers))
    return hf_config(model, qc), tensors, {"quantize_config.json": qc}


def _import_layer(name, linear, tensors, *, bits, group_size, desc_act, v1) -> PackedLinear:
    k, n = linear.in_features, linear.out_features
    gs = k if group_size in (-1, None) else group_size
    if not isinstance(gs, int) or gs <= 0 or k % gs:
        fail(f"{name}.scales", f"group_size={group_size!r} does not divide in_features={k}")
    g = k // gs
    if (k * bits) % 32 or (n * bits) % 32:
        fail(f"{name}.qweight", f"[{k}, {n}] does not fill whole int32 words at {bits} bits")
    qweight = expect(f"{name}.qweight", tensors.pop(f"{name}.qweight", None), (k * bits // 32, n), torch.int32)
    qzeros = expect(f"{name}.qzeros", tensors.pop(f"{name}.qzeros", None), (g, n * bits // 32), torch.int32)
    scales = expect(f"{name}.scales", tensors.pop(f"{name}.scales", None), (g, n), "float")
    g_idx = tensors.pop(f"{name}.g_idx", None)
    codes = unpack_dense(qweight.t().contiguous(), bits, k).t()  # [K, N], input order
    zeros = unpack_dense(qzeros, bits, n).float() + (1 if v1 else 0)
    perm = None
    if g_idx is None:
        if desc_act:
            fail(f"{name}.g_idx", f"missing: desc_act=true needs each input channel's group (int32 [{k}])")
    else:
        perm = perm_from_g_idx(f"{name}.g_idx", g_idx, k, gs)
    if perm is not None:
        codes = codes[perm.long()]
    return packed_linear(name, linear, codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=gs, perm=perm,
                         bias=tensors.pop(f"{name}.bias", None))


def load(path: str, config: dict, tensors: dict[str, torch.Tensor], device=None) -> nn.Module:
    qc = config["quantization_config"]
    fmt = qc.get("checkpoint_format") or qc.get("format") or V1
    if fmt not in (V1, V2):
        fail("config.json quantization_config.checkpoint_format", f"{fmt!r}: tquant imports {V1!r} (v1) and {V2!r} "
             "(v2); marlin / bitblas repacked checkpoints are not read")
    bits = check_kernel_bits("config.json quantization_config", qc.get("bits"))
    dynamic = qc.get("dynamic") or {}
    if any(not key.startswith("-:") for key in dynamic):
        fail("config.json quantization_config.dynamic", "per-module bits / group_size overrides are not imported "
             "(only '-:' exclusions)")
    model = skeleton(config)
    modules = {}
    for name, linear in linear_names(model).items():
        if f"{name}.qweight" in tensors:
            modules[name] = _import_layer(name, linear, tensors, bits=bits, group_size=qc.get("group_size"),
                                          desc_act=bool(qc.get("desc_act")), v1=fmt == V1)
    if not modules:
        fail("model weights", "no '<layer>.qweight' tensor for any linear layer of the model")
    return finish(model, modules, tensors, QUANT_METHOD, device)

"""AWQ checkpoints in the GEMM layout (`quant_method: awq`, `version: gemm`; AutoAWQ's WQLinear_GEMM), both ways.

Layout, as GPTQModel's AwqGEMMQuantLinear reads it (gptqmodel/nn_modules/qlinear/gemm_awq.py: AWQ_ORDER
(0, 2, 4, 6, 1, 3, 5, 7) and its inverse AWQ_REVERSE_ORDER for unpacking):
    config.json quantization_config {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true,
                                     "version": "gemm", ["modules_to_not_convert": [...]]}
    per layer L (W [N, K], G = K // group_size):
        L.qweight  int32 [K, N / 8]   along N: nibble i (bits 4i..4i+3) of word c holds column 8c + AWQ_ORDER[i]
        L.qzeros   int32 [G, N / 8]   the zero points, packed the same way (no minus 1)
        L.scales   float [G, N]
        W[n, k] = (code[k, n] - zero[k // group_size, n]) * scales[k // group_size, n]
Imported into PackedLinear (codes re-packed along K, integer zeros), never dequantized. Exported from 4-bit
PackedLinear layers without a perm (AWQ has no act order), every layer one group size (-1: per channel, which vLLM's
awq_marlin takes and its plain AWQ kernels do not), zero points always written (zero_point: true; a symmetric grid's
are 8), scales in the model's dtype, the linears left in float (but lm_head) in modules_to_not_convert: codes and
zeros move, nothing is rounded again, so tquant.load of the export gives the same weights bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import (
    expect,
    fail,
    finish,
    hf_config,
    linear_names,
    pack_dense,
    packed_linear,
    plain_tensors,
    skeleton,
    unpack_dense,
    unpacked,
)

QUANT_METHOD = "awq"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_ORDER[i] of its 8


def unpack_awq(packed: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [R, N / 8] in AWQ's order -> int64 [R, N] codes in column order."""
    nibbles = unpack_dense(packed, 4, n)  # position 8c + i
    cols = (torch.arange(n) // 8) * 8 + torch.tensor(AWQ_ORDER).repeat(n // 8)  # the column at each position
    out = torch.empty_like(nibbles)
    out[:, cols] = nibbles
    return out


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """unpack_awq's inverse: unsigned 4-bit values [R, N] in column order -> int32 [R, N / 8] in AWQ's order."""
    n = values.shape[1]
    cols = (torch.arange(n) // 8) * 8 + torch.tensor(AWQ_ORDER).repeat(n // 8)  # the column at each position
    return pack_dense(values[:, cols], 4)


def export_layer(name: str, mod) -> dict[str, torch.Tensor]:
    """One 4-bit PackedLinear's qweight / qzeros / scales (/ bias), or ValueError naming the layer."""
    n = mod.out_features
    if mod.bits != 4:
        fail(name, f"{mod.bits}-bit weights: AWQ's GEMM layout is 4-bit",
             "export with --format compressed-tensors or gptq, or quantize with bits=4")
    if mod.perm is not None:
        fail(name, "act-order storage (a perm): AWQ checkpoints have no g_idx",
             "export with --format gptq (desc_act) or compressed-tensors, or quantize without act order")
    if n % 8:
        fail(name, f"out_features={n} is not a multiple of 8 (AWQ packs 8 columns per int32)")
    zeros = mod.zeros.float()  # [G, N]
    if not torch.equal(zeros, zeros.round()) or zeros.min() < 0 or zeros.max() > 15:
        fail(f"{name}.zeros", "zero points must be integers in 0..15 for AWQ")
    out = {f"{name}.qweight": pack_awq(unpacked(mod)),  # [K, N] codes in input order (no perm)
           f"{name}.qzeros": pack_awq(zeros.to(torch.int64)),
           f"{name}.scales": mod.scales.contiguous()}
    if mod.bias is not None:
        out[f"{name}.bias"] = mod.bias
    return out


def export(model: nn.Module, layers: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, tensors) of a tquant model whose quantized layers are 4-bit PackedLinear, in the GEMM layout."""
    sizes = {m.group_size if m.group_size != m.in_features else -1 for m in layers.values()}
    if len(sizes) != 1:
        raise ValueError(f"AWQ checkpoints hold one group_size for every layer; this model has {sorted(sizes)}: export "
                         "it with --format compressed-tensors (one scheme per group)")
    tensors = {}
    for name, mod in layers.items():
        tensors |= export_layer(name, mod)
    skipped = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    qc = {"quant_method": QUANT_METHOD, "bits": 4, "group_size": sizes.pop(), "zero_point": True, "version": "gemm",
          "modules_to_not_convert": skipped or None}
    tensors |= plain_tensors(model, set(layers))
    return hf_config(model, qc), tensors


def _import_layer(name, linear, tensors, group_size) -> nn.Module:
    k, n = linear.in_features, linear.out_features
    gs = k if group_size in (-1, None, 0) else group_size
    if not isinstance(gs, int) or gs <= 0 or k % gs:
        fail(f"{name}.scales", f"group_size={group_size!r} does not divide in_features={k}")
    if n % 8:
        fail(f"{name}.qweight", f"out_features={n} is not a multiple of 8 (AWQ packs 8 columns per int32)")
    g = k // gs
    qweight = expect(f"{name}.qweight", tensors.pop(f"{name}.qweight", None), (k, n // 8), torch.int32)
    qzeros = expect(f"{name}.qzeros", tensors.pop(f"{name}.qzeros", None), (g, n // 8), torch.int32)
    scales = expect(f"{name}.scales", tensors.pop(f"{name}.scales", None), (g, n), "float")
    return packed_linear(name, linear, codes=unpack_awq(qweight, n), scales=scales,
                         zeros=unpack_awq(qzeros, n).float(), bits=4, group_size=gs, perm=None,
                         bias=tensors.pop(f"{name}.bias", None))


def load(path: str, config: dict, tensors: dict[str, torch.Tensor], device=None) -> nn.Module:
    qc = config["quantization_config"]
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        fail("config.json quantization_config.version", f"{version!r}: tquant imports AWQ's 'gemm' layout only "
             "(gemv / marlin / exllama checkpoints are packed differently)")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        fail("config.json quantization_config.bits", f"{bits!r}: AWQ's GEMM layout is 4-bit")
    if qc.get("zero_point") is False:
        fail("config.json quantization_config.zero_point", "false: tquant imports AWQ with zero points only")
    model = skeleton(config)
    modules = {}
    for name, linear in linear_names(model).items():
        if f"{name}.qweight" in tensors:
            modules[name] = _import_layer(name, linear, tensors, qc.get("group_size", qc.get("q_group_size")))
    if not modules:
        fail("model weights", "no '<layer>.qweight' tensor for any linear layer of the model")
    return finish(model, modules, tensors, QUANT_METHOD, device)

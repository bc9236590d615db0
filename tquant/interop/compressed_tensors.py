"""compressed-tensors `pack-quantized` (what llm-compressor writes and vLLM / SGLang load natively), both ways.

Layout, as the compressed-tensors library (0.20.x) reads it (compressors/pack_quantized, quantization/quant_args):
    config.json quantization_config
        {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
         "config_groups": {"group_0": {"targets": ["Linear"] or layer names, "weights": {"num_bits": 4, "type": "int",
             "symmetric": true, "strategy": "group" | "channel", "group_size": 64 | null, "dynamic": false,
             ["actorder": "weight"]}, "input_activations": null, "output_activations": null,
             "format": "pack-quantized"}},
         "ignore": [the nn.Linear layers left in float, e.g. "lm_head"], "kv_cache_scheme": null, ...}
    per layer L (W [N, K], G = K // group_size, or 1 per channel):
        L.weight_packed      int32 [N, ceil(K * bits / 32)]   q + 2^(bits-1) packed densely along K
        L.weight_scale       float [N, G]                     the model's dtype
        L.weight_zero_point  int32 [ceil(N * bits / 32), G]   asymmetric only: zp + 2^(bits-1) packed along N
        L.weight_shape       int64 [2] = [N, K]
        L.weight_g_idx       int32 [K]                        only in checkpoints of compressed-tensors < 0.20
                                                              (actorder "group"); read, never written
        W[n, k] = (q[n, k] - zp[n, g(k)]) * scale[n, g(k)],  q, zp signed in [-2^(bits-1), 2^(bits-1))
The unsigned packed value q + 2^(bits-1) is tquant's code and zp + 2^(bits-1) its zero, so the export moves codes,
never rounds: the library's decompression gives exactly tquant's dequantized weight.

Act-order: compressed-tensors 0.20 removed actorder "group" (weight_g_idx); its QuantizationArgs refuses it. A tquant
layer with a perm and one group per channel is written in input order (actorder "weight", exact); one with a perm
and smaller groups (GPTQ act_order without static_groups) has no compressed-tensors 0.20 form: the export refuses it
and names --format gptq (desc_act + g_idx) or quantizing with static_groups=True.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..modules.packed_linear import PackedLinear
from .common import (check_kernel_bits, expect, fail, finish, hf_config, linear_names, pack_dense, packed_linear,
                     plain_tensors, skeleton, unpack_dense, unpacked)

QUANT_METHOD = "compressed-tensors"
PACKED = "pack-quantized"
LIBRARY_VERSION = "0.20.1"  # the compressed-tensors version whose reader this layout was checked against


def _weights_args(mod: PackedLinear, sym: bool, act_order: bool) -> dict:
    per_channel = mod.group_size == mod.in_features
    args = {"num_bits": mod.bits, "type": "int", "symmetric": sym, "strategy": "channel" if per_channel else "group",
            "group_size": None if per_channel else mod.group_size, "dynamic": False}
    if act_order:
        args["actorder"] = "weight"
    return args


def export_layer(name: str, mod: PackedLinear) -> tuple[dict[str, torch.Tensor], dict]:
    """One PackedLinear's compressed-tensors tensors (names relative to the model) and weights args."""
    b, k, n = mod.bits, mod.in_features, mod.out_features
    codes = unpacked(mod)  # [K, N], storage order
    if mod.perm is not None:
        if mod.group_size != k:
            raise ValueError(
                f"{name}: act-order groups (a perm with group_size={mod.group_size} < in_features={k}) need a g_idx, "
                "which compressed-tensors 0.20 no longer reads (actorder 'group' was removed). Export with "
                "--format gptq (desc_act with g_idx), or quantize with act_order=False or static_groups=True")
        orig = torch.empty_like(codes)
        orig[mod.perm.long()] = codes
        codes = orig
    zeros = mod.zeros.float()  # [G, N]
    if not torch.equal(zeros, zeros.round()) or zeros.min() < 0 or zeros.max() > 2**b - 1:
        raise ValueError(f"{name}.zeros: zero points must be integers in 0..{2**b - 1} for compressed-tensors")
    sym = bool((zeros == 2 ** (b - 1)).all())
    out = {f"{name}.weight_packed": pack_dense(codes.t(), b),
           f"{name}.weight_scale": mod.scales.t().contiguous(),
           f"{name}.weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if not sym:
        out[f"{name}.weight_zero_point"] = pack_dense(zeros.to(torch.int64), b).t().contiguous()
    if mod.bias is not None:
        out[f"{name}.bias"] = mod.bias
    return out, _weights_args(mod, sym, mod.perm is not None)


def export(model: nn.Module, layers: dict[str, PackedLinear]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, tensors) of a tquant model whose quantized layers are all PackedLinear."""
    tensors, schemes = {}, {}
    for name, mod in layers.items():
        t, args = export_layer(name, mod)
        tensors |= t
        schemes.setdefault(tuple(sorted(args.items())), []).append(name)
    float_linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    groups = {}
    for i, (key, names) in enumerate(schemes.items()):
        groups[f"group_{i}"] = {"targets": ["Linear"] if len(schemes) == 1 else names, "weights": dict(key),
                                "input_activations": None, "output_activations": None, "format": PACKED}
    qc = {"quant_method": QUANT_METHOD, "format": PACKED, "quantization_status": "compressed", "config_groups": groups,
          "ignore": float_linears, "kv_cache_scheme": None, "global_compression_ratio": None,
          "sparsity_config": {}, "transform_config": {}, "version": LIBRARY_VERSION}
    tensors |= plain_tensors(model, set(layers))
    return hf_config(model, qc), tensors


# ---- import ----

def _matches(name: str, module: nn.Module, target: str) -> bool:
    """compressed-tensors' target matching: "re:PATTERN" (re.match on the layer name), a layer name, or a class name
    in the module's MRO."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target or any(cls.__name__ == target for cls in type(module).__mro__)


def _scheme_for(name: str, module: nn.Module, qc: dict) -> dict | None:
    if any(_matches(name, module, t) for t in qc.get("ignore") or []):
        return None
    found = [(g, s) for g, s in qc["config_groups"].items() if any(_matches(name, module, t) for t in s.get("targets", []))]
    if len(found) > 1:
        fail(name, f"matched by several config_groups ({[g for g, _ in found]})")
    return found[0][1] if found else None


def _import_layer(name: str, linear: nn.Module, scheme: dict, fmt: str, tensors: dict) -> PackedLinear:
    w = scheme.get("weights") or {}
    fmt = scheme.get("format") or fmt
    if fmt != PACKED:
        fail(f"{name}.weight", f"compressed-tensors format {fmt!r}: tquant imports {PACKED!r} only")
    if scheme.get("input_activations") is not None:
        fail(f"{name}.weight", "quantized input activations (W8A8 int-quantized): not imported yet; tquant reads "
             "weight-only pack-quantized (W4A16 / W8A16)")
    if w.get("type", "int") != "int":
        fail(f"{name}.weight", f"weights of type {w.get('type')!r}: tquant's kernels take integer weights")
    b = check_kernel_bits(f"{name}.weight_packed", w.get("num_bits"))
    k, n = linear.in_features, linear.out_features
    strategy = w.get("strategy") or ("group" if (w.get("group_size") or 0) > 0 else "channel")
    if strategy == "group":
        gs = w.get("group_size")
        if not isinstance(gs, int) or gs <= 0 or k % gs:
            fail(f"{name}.weight_scale", f"group_size={gs!r} does not divide in_features={k}")
    elif strategy in ("channel", "tensor"):
        gs = k
    else:
        fail(f"{name}.weight_scale", f"strategy {strategy!r}: tquant imports group, channel and tensor")
    g = k // gs
    shape = expect(f"{name}.weight_shape", tensors.pop(f"{name}.weight_shape", None), (2,),
                   (torch.int64, torch.int32))
    if shape.tolist() != [n, k]:
        fail(f"{name}.weight_shape", f"{shape.tolist()}, the model's layer is [{n}, {k}]")
    packed = expect(f"{name}.weight_packed", tensors.pop(f"{name}.weight_packed", None), (n, -(-k * b // 32)),
                    torch.int32)
    scale = tensors.pop(f"{name}.weight_scale", None)
    if strategy == "tensor" and scale is not None and scale.numel() == 1:
        scale = scale.reshape(1, 1).expand(n, 1).contiguous()
    scale = expect(f"{name}.weight_scale", scale, (n, g), "float")
    codes = unpack_dense(packed, b, k).t()  # [K, N]
    if w.get("symmetric", True):
        zeros = torch.full((g, n), float(2 ** (b - 1)))
        tensors.pop(f"{name}.weight_zero_point", None)
    else:
        zp = expect(f"{name}.weight_zero_point", tensors.pop(f"{name}.weight_zero_point", None),
                    (-(-n * b // 32), g), torch.int32)
        zeros = unpack_dense(zp.t().contiguous(), b, n).float()  # [G, N]
    perm = None
    g_idx = tensors.pop(f"{name}.weight_g_idx", None)
    if w.get("actorder") == "group" and g_idx is None:
        fail(f"{name}.weight_g_idx", "missing: actorder 'group' needs each input channel's group (int32 [K])")
    if g_idx is not None:
        from .gptq import perm_from_g_idx

        perm = perm_from_g_idx(f"{name}.weight_g_idx", g_idx, k, gs)
        if perm is not None:
            codes = codes[perm]
    return packed_linear(name, linear, codes=codes, scales=scale.t().contiguous(), zeros=zeros, bits=b,
                         group_size=gs, perm=perm, bias=tensors.pop(f"{name}.bias", None))


def load(path: str, config: dict, tensors: dict[str, torch.Tensor], device=None) -> nn.Module:
    qc = config["quantization_config"]
    if not isinstance(qc.get("config_groups"), dict) or not qc["config_groups"]:
        fail("config.json quantization_config.config_groups", "missing or empty")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        fail("config.json quantization_config.quantization_status", f"{status!r}: tquant imports compressed "
             "checkpoints (save the model with llm-compressor's save_compressed=True)")
    model = skeleton(config)
    modules = {}
    for name, linear in linear_names(model).items():
        scheme = _scheme_for(name, linear, qc)
        if scheme is not None and scheme.get("weights") is not None:
            modules[name] = _import_layer(name, linear, scheme, qc.get("format"), tensors)
    if not modules:
        fail("config.json quantization_config", "no layer of the model matches its config_groups' targets")
    return finish(model, modules, tensors, QUANT_METHOD, device)

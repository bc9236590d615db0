"""compressed-tensors `pack-quantized` (W4A16 / W8A16) and `int-quantized` (W8A8), what llm-compressor writes and
vLLM / SGLang load natively, both ways.

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

int-quantized W8A8 (ActQuantLinear with 8-bit weights and activations: SmoothQuant, ZeroQuant), the layout of the
library's IntQuantizationCompressor and of vLLM's CompressedTensorsW8A8Int8 scheme:
    config_groups {"group_0": {"targets": ["Linear"], "format": "int-quantized",
        "weights": {"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel", "dynamic": false},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": true, "strategy": "token",
                              "dynamic": true}}}       (static per-tensor scale: "strategy": "tensor", false)
    per layer L:
        L.weight        int8 [N, K]     q in [-128, 127] (tquant's qweight as it is)
        L.weight_scale  fp32 [N, 1]     tquant's w_scale (vLLM keeps weight scales in fp32)
        L.input_scale   fp32 [1]        static activations only (tquant's act_scale)
        L.bias          [N] (optional)
        y = (round(x / s_x) * s_x) (q * weight_scale)^T + bias, s_x = max_k |x_tk| / 127 per token t (vLLM;
        the library's own simulation divides by 127.5, so its logits differ from tquant's / vLLM's by rounding)
float-quantized FP8 (FP8Linear, the fp8 method; vLLM's CompressedTensorsW8A8Fp8 scheme, llm-compressor's FP8_DYNAMIC):
    config_groups {"group_0": {"targets": ["Linear"], "format": "float-quantized",
        "weights": {"num_bits": 8, "type": "float", "symmetric": true, "strategy": "channel", "dynamic": false},
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": true, "strategy": "token",
                              "dynamic": true}}}       (static per-tensor scale: "strategy": "tensor", false)
    weight-only FP8 (act_bits None): "input_activations": null, format "naive-quantized" (the library's compressor
    for float weights without quantized activations; vLLM's W8A16 FP8 scheme)
    per layer L:
        L.weight        float8_e4m3fn [N, K]   tquant's qweight as it is
        L.weight_scale  fp32 [N, 1]            tquant's w_scale
        L.input_scale   fp32 [1]               static activations only (tquant's act_scale)
        L.bias          [N] (optional)
        W = weight * weight_scale: the library dequantizes in the scale's dtype, fp32, as FP8Weight.dequantize does.
    Imported back into FP8Linear (a bf16 / fp16 weight_scale, as some writers store it, is widened to fp32 exactly).

Smoothing: SmoothQuant divides x by s and multiplies W's columns by s. When quantizing, it folds 1 / s into the op
that produces x wherever one absorbs it exactly (tquant.calib.smoothing.find_absorber tests every norm and linear of
the block: the norm before q/k/v and gate/up, v_proj before o_proj, up_proj before down_proj); the weights exported
are those of the folded model. A layer that kept a run-time divisor (its `smooth` buffer) had no such op, e.g.
o_proj under grouped-query attention (v_proj has one channel per KV-head channel, fewer than o_proj's inputs, and
SmoothQuant's factors differ across the query heads sharing one): no int-quantized reader divides its input, so the
export refuses it, naming the layer and the method, rather than re-rounding its weights.

Act-order: compressed-tensors 0.20 removed actorder "group" (weight_g_idx); its QuantizationArgs refuses it. A tquant
layer with a perm and one group per channel is written in input order (actorder "weight", exact); one with a perm
and smaller groups (GPTQ act_order without static_groups) has no compressed-tensors 0.20 form: the export refuses it
and names --format gptq (desc_act + g_idx) or quantizing with static_groups=True.
"""
from __future__ import annotations

import json
import re

import torch
from torch import nn

from ..config import tquant_config
from ..modules.act_quant_linear import ActQuantLinear
from ..modules.fp8_linear import FP8, FP8Linear
from ..modules.packed_linear import PackedLinear
from .common import (check_kernel_bits, expect, fail, finish, hf_config, linear_names, pack_dense, packed_linear,
                     plain_tensors, skeleton, unpack_dense, unpacked)

QUANT_METHOD = "compressed-tensors"
PACKED = "pack-quantized"
INT = "int-quantized"
FLOAT = "float-quantized"
NAIVE = "naive-quantized"
MIXED = "mixed-precision"  # the top-level format when config groups differ in theirs
W8A8_WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
                "dynamic": False}
FP8_WEIGHTS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "group_size": None,
               "dynamic": False}
LIBRARY_VERSION = "0.20.1"  # the compressed-tensors version whose reader this layout was checked against


def _weights_args(mod: PackedLinear, sym: bool, act_order: bool) -> dict:
    per_channel = mod.group_size == mod.in_features
    args = {"num_bits": mod.bits, "type": "int", "symmetric": sym, "strategy": "channel" if per_channel else "group",
            "group_size": None if per_channel else mod.group_size, "dynamic": False}
    if act_order:
        args["actorder"] = "weight"
    return args


def _scheme(weights: dict, input_activations: dict | None, fmt: str) -> dict:
    """A config group's scheme (without its targets)."""
    return {"weights": weights, "input_activations": input_activations, "output_activations": None, "format": fmt}


def export_layer(name: str, mod: PackedLinear) -> tuple[dict[str, torch.Tensor], dict]:
    """One PackedLinear's pack-quantized tensors (names relative to the model) and scheme."""
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
    return out, _scheme(_weights_args(mod, sym, mod.perm is not None), None, PACKED)


def _why_unfolded(model: nn.Module, name: str) -> str:
    """Why no op could take layer `name`'s smoothing factor (SmoothQuant tested them all when quantizing)."""
    heads = getattr(model.config, "num_attention_heads", None)
    kv = getattr(model.config, "num_key_value_heads", None)
    if name.endswith("o_proj") and heads and kv and kv < heads:
        return (f"its input is attention over v_proj, which under grouped-query attention (num_key_value_heads={kv} "
                f"< num_attention_heads={heads}) has one channel per KV-head channel, fewer than o_proj's inputs, and "
                "the factors differ across the query heads sharing one")
    return ("no norm or linear of its block absorbs it exactly (e.g. an input after a non-homogeneous activation "
            "such as GELU, or a norm shared with another smoothed group)")


def _check_w8a8(name: str, mod: ActQuantLinear, method: str | None, model: nn.Module) -> None:
    """Refuse an ActQuantLinear that int-quantized W8A8 cannot hold, saying why and what to do instead."""
    if (mod.bits, mod.act_bits) != (8, 8) or mod.perm is not None:
        fail(name, f"method {method!r} stores it as W{mod.bits}A{mod.act_bits}" + (" with a channel perm" if
             mod.perm is not None else "") + ": tquant exports int-quantized W8A8 only (8-bit per-channel weights, "
             "8-bit per-token activations)", "quantize with smoothquant or zeroquant at bits=8, act_bits=8 (zeroquant "
             "without mlp_bits=4), or export a weight-only gptq / rtn model")
    if mod.smooth is not None:
        fail(name, f"method {method!r} left a smoothing factor on its input that cannot be folded into a preceding op: "
             f"{_why_unfolded(model, name)}. int-quantized readers (vLLM, SGLang, compressed-tensors) do not divide "
             "a layer's input, so the export would compute another function",
             f"quantize with --skip '*.{name.rsplit('.', 1)[-1]}' (kept in float and listed in the export's "
             "ignore), or with zeroquant (no smoothing); the tquant checkpoint itself runs the factor in its kernel")


def _w8a8_tensors(name: str, mod) -> tuple[dict[str, torch.Tensor], bool]:
    """({weight, weight_scale [N, 1], input_scale where static, bias}, static) of an 8-bit layer (ActQuantLinear or
    FP8Linear): the tensors the int- and float-quantized formats share."""
    out = {f"{name}.weight": mod.qweight, f"{name}.weight_scale": mod.w_scale[:, None].contiguous()}
    static = mod.act_scale is not None
    if static:
        out[f"{name}.input_scale"] = mod.act_scale
    if mod.bias is not None:
        out[f"{name}.bias"] = mod.bias
    return out, static


def export_act_layer(name: str, mod: ActQuantLinear, method: str | None,
                     model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """One W8A8 ActQuantLinear's int-quantized tensors (layout in the module docstring) and scheme."""
    _check_w8a8(name, mod, method, model)
    out, static = _w8a8_tensors(name, mod)
    inputs = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor" if static else "token",
              "dynamic": not static}
    return out, _scheme(dict(W8A8_WEIGHTS), inputs, INT)


def export_fp8_layer(name: str, mod: FP8Linear) -> tuple[dict[str, torch.Tensor], dict]:
    """One FP8Linear's float-quantized (or, weight-only, naive-quantized) tensors and scheme (module docstring)."""
    out, static = _w8a8_tensors(name, mod)
    if mod.act_bits is None:
        return out, _scheme(dict(FP8_WEIGHTS), None, NAIVE)
    inputs = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor" if static else "token",
              "dynamic": not static}
    return out, _scheme(dict(FP8_WEIGHTS), inputs, FLOAT)


def export(model: nn.Module, layers: dict[str, nn.Module]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, tensors) of a tquant model whose quantized layers are PackedLinear (pack-quantized),
    W8A8 ActQuantLinear (int-quantized) or FP8Linear (float-quantized); one config group per distinct scheme."""
    method = (tquant_config(model.config) or {}).get("method")
    tensors, schemes = {}, {}
    for name, mod in layers.items():
        t, scheme = (export_act_layer(name, mod, method, model) if isinstance(mod, ActQuantLinear)
                     else export_fp8_layer(name, mod) if isinstance(mod, FP8Linear) else export_layer(name, mod))
        tensors |= t
        schemes.setdefault(json.dumps(scheme, sort_keys=True), []).append(name)
    float_linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    groups = {f"group_{i}": {"targets": ["Linear"] if len(schemes) == 1 else names, **json.loads(key)}
              for i, (key, names) in enumerate(schemes.items())}
    formats = {g["format"] for g in groups.values()}
    qc = {"quant_method": QUANT_METHOD, "format": formats.pop() if len(formats) == 1 else MIXED,
          "quantization_status": "compressed", "config_groups": groups,
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


def _import_layer(name: str, linear: nn.Module, scheme: dict, fmt: str, tensors: dict) -> nn.Module:
    """Layer `name` of the scheme's format: pack-quantized -> PackedLinear, int-quantized W8A8 -> ActQuantLinear, 8-bit
    float weights (float-quantized / naive-quantized FP8) -> FP8Linear."""
    fmt = scheme.get("format") or fmt
    acts = scheme.get("input_activations") is not None
    if (scheme.get("weights") or {}).get("type") == "float" and scheme["weights"].get("num_bits") == 8:
        return _import_fp8_layer(name, linear, scheme, tensors)
    if (fmt, acts) == (INT, True):
        return _import_int8_layer(name, linear, scheme, tensors)
    if (fmt, acts) == (PACKED, False):
        return _import_packed_layer(name, linear, scheme, tensors)
    fail(f"{name}.weight", f"compressed-tensors format {fmt!r} " + ("with" if acts else "without") + " quantized "
         f"input activations: tquant imports weight-only {PACKED!r} (W4A16 / W8A16) and {INT!r} W8A8")


def _want(name: str, args: dict, key: str, allowed: tuple, default, why: str):
    """args[key] (or default) when it is one of `allowed`, else ValueError naming the tensor and the option."""
    value = args.get(key, default)
    if value not in allowed:
        fail(name, f"{key}={value!r}: {why}")
    return value


def _import_int8_layer(name: str, linear: nn.Module, scheme: dict, tensors: dict) -> ActQuantLinear:
    """An int-quantized W8A8 layer (layout in the module docstring) as tquant's ActQuantLinear: the int8 weight as it
    is, the weight scale per output channel in fp32, activations per token (dynamic) or per tensor (static)."""
    w, a = scheme.get("weights") or {}, scheme["input_activations"]
    k, n = linear.in_features, linear.out_features
    gemm = "tquant's W8A8 GEMM takes symmetric 8-bit integer weights, one scale per output channel (or tensor)"
    for key, allowed, default in (("num_bits", (8,), None), ("type", ("int",), "int"), ("symmetric", (True,), True),
                                  ("strategy", ("channel", "tensor"), None)):
        _want(f"{name}.weight", w, key, allowed, default, gemm)
    acts = "tquant quantizes activations to symmetric int8, per token (dynamic) or per tensor (static)"
    for key, allowed, default in (("num_bits", (8,), None), ("type", ("int",), "int"), ("symmetric", (True,), True)):
        _want(f"{name}.input_activations", a, key, allowed, default, acts)
    static = not _want(f"{name}.input_activations", a, "dynamic", (True, False), False, acts)
    _want(f"{name}.input_activations", a, "strategy", ("tensor",) if static else ("token",), None, acts)
    weight = expect(f"{name}.weight", tensors.pop(f"{name}.weight", None), (n, k), torch.int8)
    scale = tensors.pop(f"{name}.weight_scale", None)
    if w["strategy"] == "tensor" and scale is not None and scale.numel() == 1:
        scale = scale.reshape(1, 1).expand(n, 1).contiguous()
    scale = expect(f"{name}.weight_scale", scale, (n, 1), "float")
    for zp in (f"{name}.weight_zero_point", f"{name}.input_zero_point"):
        if zp in tensors and tensors.pop(zp).any():
            fail(zp, "non-zero in a symmetric scheme", "is the checkpoint damaged?")
    bias = tensors.pop(f"{name}.bias", None)
    mod = ActQuantLinear(k, n, bits=8, act_bits=8, group_size=k, bias=bias is not None, static=static,
                         dtype=linear.weight.dtype, device="cpu")
    mod.qweight.copy_(weight)
    return _scales_and_bias(mod, name, scale, static, bias, tensors)


def _scales_and_bias(mod, name: str, scale: torch.Tensor, static: bool, bias, tensors: dict):
    """An 8-bit W8A8 layer (ActQuantLinear or FP8Linear) given its per-channel weight scale [N, 1], its static
    activation scale (`input_scale`, popped from tensors) where static, and its bias; validated, returned."""
    mod.w_scale.copy_(scale[:, 0].float())
    if static:
        act_scale = tensors.pop(f"{name}.input_scale", None)
        mod.act_scale.copy_(expect(f"{name}.input_scale", None if act_scale is None else act_scale.reshape(-1),
                                   (1,), "float").float())
    if bias is not None:
        mod.bias.copy_(bias.to(mod.bias.dtype))
    mod.validate(name)
    return mod


def _import_fp8_layer(name: str, linear: nn.Module, scheme: dict, tensors: dict) -> FP8Linear:
    """An FP8 layer (e4m3 weights per channel or tensor; e4m3 activations per token, per tensor, or none) as FP8Linear,
    the e4m3 weight as it is and its scale widened to fp32."""
    w, a = scheme["weights"], scheme.get("input_activations")
    k, n = linear.in_features, linear.out_features
    fp8 = "tquant's FP8 GEMMs take e4m3 weights, one scale per output channel (or tensor)"
    for key, allowed, default in (("symmetric", (True,), True), ("strategy", ("channel", "tensor"), None)):
        _want(f"{name}.weight", w, key, allowed, default, fp8)
    static = False
    if a is not None:
        acts = "tquant quantizes activations to e4m3, per token (dynamic) or per tensor (static)"
        for key, allowed, default in (("num_bits", (8,), None), ("type", ("float",), None),
                                      ("symmetric", (True,), True)):
            _want(f"{name}.input_activations", a, key, allowed, default, acts)
        static = not _want(f"{name}.input_activations", a, "dynamic", (True, False), False, acts)
        _want(f"{name}.input_activations", a, "strategy", ("tensor",) if static else ("token",), None, acts)
    weight = tensors.pop(f"{name}.weight", None)
    if weight is not None and weight.dtype != FP8:
        fail(f"{name}.weight", f"dtype {weight.dtype}, expected {FP8} (e4m3)")
    weight = expect(f"{name}.weight", None if weight is None else weight.view(torch.uint8), (n, k), torch.uint8)
    scale = tensors.pop(f"{name}.weight_scale", None)
    if w["strategy"] == "tensor" and scale is not None and scale.numel() == 1:
        scale = scale.reshape(1, 1).expand(n, 1).contiguous()
    scale = expect(f"{name}.weight_scale", scale, (n, 1), "float")
    bias = tensors.pop(f"{name}.bias", None)
    mod = FP8Linear(k, n, act_bits=None if a is None else 8, static=static, bias=bias is not None,
                    dtype=linear.weight.dtype, device="cpu")
    mod.qweight.copy_(weight.view(FP8))
    return _scales_and_bias(mod, name, scale, static, bias, tensors)


def _import_packed_layer(name: str, linear: nn.Module, scheme: dict, tensors: dict) -> PackedLinear:
    """A pack-quantized layer (layout in the module docstring) as tquant's PackedLinear, codes re-packed along K."""
    w = scheme.get("weights") or {}
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

"""Shared pieces of the interop tests: tiny quantized models, the dequantized reference weights, and damaged copies
of checkpoints."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

import tquant
from tquant.formats.packing import dequantize_packed
from tquant.modules import PackedLinear
from tests.tiny_models import tiny_model, token_batch


def quantized(method="rtn", bits=4, group_size=32, sym=None, arch="llama", **opts):
    model = tiny_model(arch)
    tquant.quantize(model, method, bits=bits, group_size=group_size, sym=sym, calib=token_batch(8), progress=False,
                    **opts)
    return model


def dequantized(mod: PackedLinear) -> torch.Tensor:
    """A PackedLinear's weight [N, K] in input order, in its scales' dtype (what a decompressor should give)."""
    w = dequantize_packed(mod.qweight, mod.scales, mod.zeros, mod.bits, mod.group_size, mod.in_features)  # [K, N]
    if mod.perm is not None:
        w = w[torch.argsort(mod.perm.long())]
    return w.t().to(mod.scales.dtype)


def library_simulation(path: str):
    """The checkpoint at path as compressed-tensors runs its quantization in transformers: the compressed route
    (CompressedTensorsConfig(dequantize=False): each Linear keeps its scheme, so the library fake-quantizes the
    activations in the forward), with the weights decompressed up front by the library's own ModelCompressor so they
    can be compared before any forward. (dequantize=True loads a dense model; since transformers 5.25 that model runs
    without the activation simulation.)"""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=transformers.CompressedTensorsConfig(dequantize=False)).eval()
    hf.hf_quantizer.compressor.decompress_model(hf)
    return hf


def packed_layers(model) -> dict[str, PackedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def logits(model, ids=None):
    ids = token_batch(2, seed=9) if ids is None else ids
    with torch.no_grad():
        return model(ids).logits


def give_perm(model, name: str, seed: int = 3) -> PackedLinear:
    """Replace PackedLinear `name` by one with act-order storage: a random perm, storage column j holding the codes
    of input channel perm[j], groups j // group_size (what GPTQ's act_order with act-order groups stores; built
    here directly so the tests do not depend on a method's options). Returns the new module."""
    from tquant.formats.packing import pack_codes, unpack_codes

    old = model.get_submodule(name)
    k, n = old.in_features, old.out_features
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    new = PackedLinear(k, n, bits=old.bits, group_size=old.group_size, bias=old.bias is not None, has_perm=True,
                       dtype=old.scales.dtype)
    codes = unpack_codes(old.qweight, old.bits, k)  # [K, N]
    new.qweight.copy_(pack_codes(codes[perm.long()].t(), old.bits))
    new.scales.copy_(old.scales)
    new.zeros.copy_(old.zeros)
    new.perm.copy_(perm)
    if old.bias is not None:
        new.bias.copy_(old.bias)
    model.set_submodule(name, new)
    model.config.quantization_config["layers"][name] = new.layer_spec()
    return new


def edit_checkpoint(path, config=None, tensors=None) -> None:
    """Damage checkpoint folder `path` in place: config (a dict merged into config.json's quantization_config, or a
    function editing that dict), tensors {name: new tensor, or None to delete it} of its model.safetensors."""
    if config:
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
        if callable(config):
            config(c["quantization_config"])
        else:
            c["quantization_config"] |= config
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(c, f)
    if tensors:
        t = load_file(os.path.join(path, "model.safetensors"))
        for k, v in tensors.items():
            if v is None:
                del t[k]
            else:
                t[k] = v
        save_file(t, os.path.join(path, "model.safetensors"))


def library_w8a8_checkpoint(path, static: bool, kind: str, input_scale: float) -> None:
    """A tiny Llama quantized and saved the way llm-compressor saves W8A8 (kind "int": int-quantized) or FP8 (kind
    "float": float-quantized): per-channel weight scales from compressed-tensors' calculate_qparams, a static input
    scale of input_scale when asked, ModelCompressor.compress_model, save_pretrained, update_config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = tiny_model("llama")
    weights = dict(num_bits=8, type=kind, symmetric=True, strategy="channel")
    inputs = dict(num_bits=8, type=kind, symmetric=True, strategy="tensor" if static else "token", dynamic=not static)
    fmt = f"{kind}-quantized"
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                quantization_status=QuantizationStatus.CALIBRATION, format=fmt)
    apply_quantization_config(model, config)
    for name, mod in model.named_modules():
        if hasattr(mod, "quantization_scheme") and name != "lm_head":
            w = mod.weight.detach()
            scale, _ = calculate_qparams(w.amin(-1), w.amax(-1), mod.quantization_scheme.weights)
            mod.weight_scale.data.copy_(scale.reshape(mod.weight_scale.shape))
            if static:
                mod.input_scale.data.fill_(input_scale)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)

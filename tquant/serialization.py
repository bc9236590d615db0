"""Save and load quantized models: safetensors (no pickle) + config.json + a checksum manifest.

    DIR/model.safetensors   every parameter and buffer (non-persistent ones too, e.g. RoPE inv_freq), once
    DIR/config.json         the HF model config with its tquant quantization_config (tquant.config)
    DIR/tquant.json         {"weights": "model.safetensors", "sha256": ..., "bytes": ...}
    DIR/generation_config.json and the tokenizer files, when present

load() builds the architecture on the meta device, swaps in the quantized modules named in the config,
and assigns the saved tensors as they are (same dtypes, tied weights re-tied), so outputs are
bit-identical to the model that was saved.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import read_quantization_config
from .kv.hook import hook_generate
from .modules import module_for_spec, spec_types
from .version import __version__

WEIGHTS = "model.safetensors"
MANIFEST = "tquant.json"
STALE = "was it saved for another model or by another tquant version? Quantize and save it again with this one"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(model: nn.Module, path: str, tokenizer=None) -> None:
    read_quantization_config(model.config)
    os.makedirs(path, exist_ok=True)
    tensors = {n: t.detach().cpu().contiguous() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    weights = os.path.join(path, WEIGHTS)
    save_file(tensors, weights, metadata={"format": "pt", "producer": f"tquant {__version__}"})
    model.config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    manifest = {"weights": WEIGHTS, "sha256": _sha256(weights), "bytes": os.path.getsize(weights),
                "tquant_version": __version__}
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)


def _verified_tensors(path: str) -> dict[str, torch.Tensor]:
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ValueError(f"{path!r} is not a tquant checkpoint: {MANIFEST} is missing (make one with "
                         f"tquant.save(model, path) or `tquant quantize --out DIR`)")
    with open(manifest_path) as f:
        manifest = json.load(f)
    weights = os.path.join(path, manifest["weights"])
    if not os.path.isfile(weights):
        raise ValueError(f"checkpoint {path!r} is incomplete: {manifest['weights']} is missing (copy the whole "
                         "folder again, or save the model again)")
    size = os.path.getsize(weights)
    if size != manifest["bytes"]:
        raise ValueError(f"{weights} is truncated or altered: {size} bytes, the manifest says {manifest['bytes']} "
                         "(copy it again, or save the model again)")
    if _sha256(weights) != manifest["sha256"]:
        raise ValueError(f"{weights} was modified after saving: its sha256 does not match {MANIFEST} (copy it again, "
                         "or save the model again)")
    return load_file(weights)


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put each saved tensor in every place that shares it (tied weights), keeping its dtype."""
    places = defaultdict(list)
    for name, mod in model.named_modules(remove_duplicate=False):
        for leaf, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is not None:
                places[id(t)].append((f"{name}.{leaf}" if name else leaf, mod, leaf, t))
    by_name = {full: key for key, group in places.items() for full, *_ in group}
    filled = set()
    for name, value in tensors.items():
        if name not in by_name:
            raise ValueError(f"the checkpoint has a tensor {name!r} that the model does not: {STALE}")
        key = by_name[name]
        _, first_mod, first_leaf, old = places[key][0]
        if old.shape != value.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(old.shape)}: {STALE}")
        new = nn.Parameter(value, requires_grad=False) if first_leaf in first_mod._parameters else value
        for _, mod, leaf, _ in places[key]:
            (mod._parameters if isinstance(new, nn.Parameter) else mod._buffers)[leaf] = new
        filled.add(key)
    missing = [group[0][0] for key, group in places.items() if key not in filled]
    if missing:
        raise ValueError(f"the checkpoint lacks tensors the model needs: {missing[:5]}: {STALE}")


def load(path: str, device=None) -> nn.Module:
    """Rebuild a model saved by tquant.save, offline. Returns it in eval mode on `device` (default cpu)."""
    import transformers

    tensors = _verified_tensors(path)
    config = transformers.AutoConfig.from_pretrained(path)
    qc = read_quantization_config(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    for name, spec in qc["layers"].items():
        if spec["type"] not in spec_types():
            raise ValueError(f"layer {name!r} has unknown module type {spec['type']!r}: {STALE}")
        model.set_submodule(name, module_for_spec(spec).from_spec(spec, torch.float32))
    _assign(model, tensors)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    if "kv_cache" in qc:
        hook_generate(model)
    return model.to(device or "cpu").eval()

"""Save and load quantized models: safetensors (no pickle) + config.json + a checksum manifest.

    DIR/model.safetensors   every parameter and buffer (non-persistent ones too, e.g. RoPE inv_freq), once
    DIR/config.json         the HF model config with its tquant quantization_config (tquant.config)
    DIR/tquant.json         {"weights": "model.safetensors", "sha256": ..., "bytes": ...}
    DIR/generation_config.json and the tokenizer files, when present

load() builds the architecture on the meta device, swaps in the quantized modules named in the config,
and assigns the saved tensors as they are (same dtypes, tied weights re-tied), so outputs are
bit-identical to the model that was saved.

Nothing is trusted before it is checked (an edited file is refused with a ValueError naming the layer / tensor,
before any kernel can read it):
    tquant.json    exactly its four keys; the weights file a plain name inside the folder (no '..', no absolute
                   path, no symlink out), its size and sha256 (damage)
    config.json    every layer spec: a registered type, no unknown or missing keys, integer sizes, boolean flags,
                   what the module's constructor accepts, in / out sizes of the layer it replaces; the KV-cache spec
                   (tquant.kv.hook.check_kv_spec)
    tensors        names and shapes the model has, integer dtypes exact and floats floating, then each quantized
                   module's validate(name): dtypes exact, floats finite, index tensors in range (perm a permutation,
                   CSR row pointers and columns, zero points and group multiples on their grids)
save() refuses a folder that already holds a checkpoint unless overwrite=True.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import read_quantization_config
from .kv.hook import check_kv_spec, hook_generate
from .modules import module_for_spec, spec_types
from .modules.base import DAMAGED
from .version import __version__

WEIGHTS = "model.safetensors"
MANIFEST = "tquant.json"
MANIFEST_KEYS = {"weights": str, "sha256": str, "bytes": int, "tquant_version": str}
CHECKPOINT_FILES = (WEIGHTS, MANIFEST, "config.json")  # a folder holding any of these holds a checkpoint
STALE = "was it saved for another model or by another tquant version? Quantize and save it again with this one"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_target(path, overwrite: bool = False) -> None:
    """Refuse (ValueError) to save into a folder that already holds a checkpoint (any of CHECKPOINT_FILES) unless
    overwrite; a path that exists and is not a folder is refused always."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"cannot save into {path!r}: it exists and is not a folder")
    found = [f for f in CHECKPOINT_FILES if os.path.lexists(os.path.join(path, f))]
    if found and not overwrite:
        raise ValueError(f"{path!r} already holds a checkpoint ({', '.join(found)}): saving would replace it. Choose "
                         "another folder, or pass overwrite=True (tquant quantize --overwrite) to replace it")


def save(model: nn.Module, path: str, tokenizer=None, overwrite: bool = False) -> None:
    """Write model (quantized by tquant) to folder `path`, with its tokenizer when given. A folder that already
    holds a checkpoint is refused unless overwrite=True."""
    read_quantization_config(model.config)
    check_target(path, overwrite)
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
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{manifest_path} is not valid JSON ({e}): {DAMAGED}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{manifest_path}: expected a JSON object: {DAMAGED}")
    for key, kind in MANIFEST_KEYS.items():
        if key not in manifest or not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise ValueError(f"{manifest_path}: {key!r} is {'missing' if key not in manifest else 'not a ' + kind.__name__}"
                             f": {DAMAGED}")
    unknown = sorted(set(manifest) - set(MANIFEST_KEYS))
    if unknown:
        raise ValueError(f"{manifest_path}: unknown keys {unknown} (a manifest has {list(MANIFEST_KEYS)}): {DAMAGED}")
    weights = _inside(path, manifest["weights"])
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
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:  # a malformed header
        raise ValueError(f"{weights} is not a readable safetensors file ({e}): {DAMAGED}") from None


def _inside(folder: str, name: str) -> str:
    """The path of the manifest's weights file `name`, refused unless it is a relative path in the checkpoint folder
    that stays there once resolved (no '..', no absolute path, no symlink pointing out)."""
    where = f"{os.path.join(folder, MANIFEST)}: weights {name!r}"
    parts = name.replace("\\", "/").split("/")
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or ":" in name:
        raise ValueError(f"{where} is not a file name inside the checkpoint folder (no absolute paths, no '..'): "
                         f"{DAMAGED}")
    full = os.path.join(folder, name)
    root = os.path.realpath(folder)
    real = os.path.realpath(full)
    if os.path.commonpath([root, real]) != root or real == root:
        raise ValueError(f"{where} resolves to {real}, outside the checkpoint folder {root} (a symlink out?): "
                         f"{DAMAGED}")
    return full


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
        if old.is_floating_point() != value.is_floating_point() or (not old.is_floating_point() and old.dtype !=
                                                                   value.dtype) or value.dtype == torch.float64:
            # exact for integer tensors; a float stays in the dtype it was saved in (quantized modules check theirs)
            raise ValueError(f"{name}: checkpoint dtype {value.dtype}, the model expects "
                             f"{old.dtype if not old.is_floating_point() else 'float16 / bfloat16 / float32'}: {DAMAGED}")
        new = nn.Parameter(value, requires_grad=False) if first_leaf in first_mod._parameters else value
        for _, mod, leaf, _ in places[key]:
            (mod._parameters if isinstance(new, nn.Parameter) else mod._buffers)[leaf] = new
        filled.add(key)
    missing = [group[0][0] for key, group in places.items() if key not in filled]
    if missing:
        raise ValueError(f"the checkpoint lacks tensors the model needs: {missing[:5]}: {STALE}")


def _sizes(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear layer (nn.Linear, a quantized one, GPT-2's Conv1D) or (rows, dim) of an embedding."""
    if isinstance(module, nn.Embedding) or hasattr(module, "num_embeddings"):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight [in, out]
        return tuple(module.weight.shape)
    return None


def _check_replaces(model: nn.Module, name: str, module: nn.Module) -> None:
    """The quantized `module` may stand in for layer `name` of the architecture: it exists and has its sizes."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"layer {name!r} of the quantization_config is not a layer of this "
                         f"{type(model).__name__}: {STALE}") from None
    if _sizes(old) is None or _sizes(old) != _sizes(module):
        raise ValueError(f"{name}: the layer spec describes a {type(module).__name__} of sizes {_sizes(module)}, the "
                         f"model's layer is a {type(old).__name__} of sizes {_sizes(old)}: {DAMAGED}")


def _foreign_config(path: str) -> dict | None:
    """config.json as a dict when its quantization_config names a quant_method other than tquant's, else None."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None  # no readable config: the tquant checks below say what is wrong
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(qc, dict) and qc.get("quant_method") not in (None, "tquant"):
        return config
    return None


def load(path: str, device=None) -> nn.Module:
    """Rebuild a model saved by tquant.save, offline. Returns it in eval mode on `device` (default cpu).
    A checkpoint whose config.json names quant_method "compressed-tensors", "gptq" or "awq" is imported by
    tquant.interop into tquant's modules (any other quant_method: ValueError)."""
    import transformers

    foreign = _foreign_config(path)
    if foreign is not None:  # another library's checkpoint: its importer (tquant.interop)
        from .interop.loader import load_foreign

        return load_foreign(path, foreign, device)
    tensors = _verified_tensors(path)
    config = transformers.AutoConfig.from_pretrained(path)
    qc = read_quantization_config(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    layers = qc.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"config.json: quantization_config.layers is not an object of layer specs: {DAMAGED}")
    for name, spec in layers.items():
        if not isinstance(spec, dict) or spec.get("type") not in spec_types():
            what = spec.get("type") if isinstance(spec, dict) else spec
            raise ValueError(f"layer {name!r} has unknown module type {what!r}: {STALE}")
        module = module_for_spec(spec).check_spec(name, spec, torch.float32)
        _check_replaces(model, name, module)
        model.set_submodule(name, module)
    if "kv_cache" in qc:
        check_kv_spec(config, qc["kv_cache"])
    _assign(model, tensors)
    for name in layers:  # every index in range, every float finite, before anything reads them
        model.get_submodule(name).validate(name)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    if "kv_cache" in qc:
        hook_generate(model)
    return model.to(device or "cpu").eval()

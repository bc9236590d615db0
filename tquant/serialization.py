"""Save and load quantized models: safetensors (no pickle) + config.json + a checksum manifest.

    DIR/model.safetensors   every parameter and buffer (non-persistent ones too, e.g. RoPE inv_freq), once
      or, when they exceed max_shard_size (default 5GB), transformers' sharded layout (what vLLM / SGLang read):
    DIR/model-00001-of-0000N.safetensors ...          whole tensors (one is never split), in the model's order
    DIR/model.safetensors.index.json                  {"metadata": {"total_size": bytes of all tensors},
                                                       "weight_map": {tensor name: shard file}}
    DIR/config.json         the HF model config with its tquant quantization_config (tquant.config)
    DIR/tquant.json         one file:  {"weights": "model.safetensors", "sha256": ..., "bytes": ..., "tquant_version"}
                            sharded:   {"weights": "model.safetensors.index.json", "sha256" / "bytes" of the index,
                                        "tquant_version", "shards": {shard file: {"sha256": ..., "bytes": ...}}}
    DIR/generation_config.json and the tokenizer files, when present

load() builds the architecture on the meta device, swaps in the quantized modules named in the config,
and assigns the saved tensors as they are (same dtypes, tied weights re-tied), so outputs are
bit-identical to the model that was saved.

Nothing is trusted before it is checked (an edited file is refused with a ValueError naming the layer / tensor,
before any kernel can read it):
    tquant.json    exactly its four keys (and "shards" when sharded); every weights file a plain name inside the
                   folder (no '..', no absolute path, no symlink out: a hub cache snapshot's may point into its
                   repo's blobs, tquant.interop.hub), its size and sha256 (damage)
    index          sharded: the shards it names are exactly the manifest's, each shard holds exactly the tensors
                   its weight_map gives it, total_size adds up; a model-*-of-*.safetensors file in the folder that
                   the manifest does not list is refused (a leftover of another save)
    config.json    every layer spec: a registered type, no unknown or missing keys, integer sizes, boolean flags,
                   what the module's constructor accepts, in / out sizes of the layer it replaces; the KV-cache spec
                   (tquant.kv.hook.check_kv_spec)
    tensors        names and shapes the model has, integer dtypes exact and floats floating, then each quantized
                   module's validate(name): dtypes exact, floats finite, index tensors in range (perm a permutation,
                   CSR row pointers and columns, zero points and group multiples on their grids), every code of a
                   packed weight a grid point (code - zero) * scale finite in the scales' dtype
                   (tquant.modules.packed_weight.check_grid)
save() refuses a folder that already holds a checkpoint unless overwrite=True.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import read_quantization_config
from .interop.hub import checkpoint_folder, snapshot_blobs
from .kv.hook import check_kv_spec, hook_generate
from .modules import module_for_spec, spec_types
from .modules.base import DAMAGED
from .version import __version__

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD = "model-{:05d}-of-{:05d}.safetensors"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
DEFAULT_SHARD_SIZE = "5GB"  # transformers' save_pretrained default
MANIFEST = "tquant.json"
MANIFEST_KEYS = {"weights": str, "sha256": str, "bytes": int, "tquant_version": str}
FILE_KEYS = {"sha256": str, "bytes": int}  # each entry of a sharded manifest's "shards"
CHECKPOINT_FILES = (WEIGHTS, INDEX, MANIFEST, "config.json")  # a folder holding any of these holds a checkpoint
FILE_METADATA = {"format": "pt", "producer": f"tquant {__version__}"}  # in every weights file's header
STALE = "was it saved for another model or by another tquant version? Quantize and save it again with this one"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_target(path, overwrite: bool = False) -> None:
    """Refuse (ValueError) to save into a folder that already holds a checkpoint (any of CHECKPOINT_FILES, or a
    model-*-of-*.safetensors shard) unless overwrite; a path that exists and is not a folder is refused always."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"cannot save into {path!r}: it exists and is not a folder")
    found = [f for f in CHECKPOINT_FILES if os.path.lexists(os.path.join(path, f))]
    found += sorted(f for f in os.listdir(path) if SHARD_NAME.fullmatch(f))[:1] if os.path.isdir(path) else []
    if found and not overwrite:
        raise ValueError(f"{path!r} already holds a checkpoint ({', '.join(found)}): saving would replace it. Choose "
                         "another folder, or pass overwrite=True (tquant quantize --overwrite) to replace it")


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def shard_bytes(max_shard_size) -> int | None:
    """max_shard_size in bytes: a positive int, or a string read as transformers reads it ("5GB" = 5 * 10^9,
    "500MiB" = 500 * 2^20); None: never split."""
    if max_shard_size is None:
        return None
    size = None
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool):
        size = max_shard_size
    elif isinstance(max_shard_size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", max_shard_size.upper())
        size = int(float(m.group(1)) * _UNITS[m.group(2) or "B"]) if m else None
    if size is None or size <= 0:
        raise ValueError(f"max_shard_size={max_shard_size!r}: expected a positive number of bytes or a size such as "
                         "'5GB', '500MB' or '2GiB' (--max-shard-size 5GB)")
    return size


def split_shards(tensors: dict[str, torch.Tensor], limit: int | None) -> list[dict[str, torch.Tensor]]:
    """The tensors in order, cut into shards of at most `limit` bytes each (a tensor larger than limit gets a shard
    of its own; none is split); one shard when limit is None."""
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def remove_weights(folder: str) -> None:
    """Delete the weight files an earlier save left in folder (model.safetensors, its shards and index), so that
    overwriting a sharded checkpoint with a smaller one leaves no stale shard behind."""
    for name in os.listdir(folder):
        if name in (WEIGHTS, INDEX) or SHARD_NAME.fullmatch(name):
            os.remove(os.path.join(folder, name))


def write_weights(folder: str, tensors: dict[str, torch.Tensor], max_shard_size=DEFAULT_SHARD_SIZE,
                  metadata: dict | None = None) -> list[str]:
    """Write tensors (cpu, contiguous) into folder: model.safetensors, or, past max_shard_size, the shards
    model-0000i-of-0000N.safetensors and model.safetensors.index.json (transformers' layout: metadata.total_size,
    weight_map). Removes the weight files of an earlier save first. Returns the file names written, the index
    last."""
    shards = split_shards(tensors, shard_bytes(max_shard_size))
    remove_weights(folder)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, WEIGHTS), metadata=metadata)
        return [WEIGHTS]
    names = [SHARD.format(i + 1, len(shards)) for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(folder, name), metadata=metadata)
    write_index(folder, {t: name for name, shard in zip(names, shards) for t in shard},
                sum(t.numel() * t.element_size() for t in tensors.values()))
    return names + [INDEX]


def write_index(folder: str, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json of a sharded checkpoint: {tensor name: shard file} and the tensors' bytes."""
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)


def _manifest(folder: str, files: list[str]) -> dict:
    """tquant.json for the weight files write_weights wrote (layouts in the module docstring)."""
    def record(name):
        full = os.path.join(folder, name)
        return {"sha256": file_sha256(full), "bytes": os.path.getsize(full)}

    main = files[-1]
    shards = {"shards": {name: record(name) for name in files[:-1]}} if main == INDEX else {}
    return {"weights": main, **record(main), "tquant_version": __version__, **shards}


def save(model: nn.Module, path: str, tokenizer=None, overwrite: bool = False,
         max_shard_size=DEFAULT_SHARD_SIZE) -> None:
    """Write model (quantized by tquant) to folder `path`, with its tokenizer when given: one model.safetensors,
    or shards of at most max_shard_size ("5GB", "500MB", bytes; None: one file) with their index. A folder that
    already holds a checkpoint is refused unless overwrite=True."""
    read_quantization_config(model.config)
    shard_bytes(max_shard_size)  # a bad size is refused before anything is written
    check_target(path, overwrite)
    os.makedirs(path, exist_ok=True)
    tensors = {n: t.detach().cpu().contiguous() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    files = write_weights(path, tensors, max_shard_size, FILE_METADATA)
    write_checkpoint_files(path, model, files, tokenizer)


def write_checkpoint_files(path: str, model: nn.Module, files: list[str], tokenizer=None) -> None:
    """What a checkpoint holds besides its weight files (`files`, written, the index last when sharded): config.json,
    generation_config.json, the tokenizer when given, and the manifest tquant.json over the weight files."""
    model.config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(_manifest(path, files), f, indent=2)


def _read_manifest(path: str) -> dict:
    """tquant.json of checkpoint `path`, its keys and their types checked (layouts in the module docstring)."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ValueError(f"{path!r} is not a tquant checkpoint: {MANIFEST} is missing (make one with "
                         f"tquant.save(model, path) or `tquant quantize --out DIR`)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{manifest_path} is not valid JSON ({e}): {DAMAGED}") from None
    _check_keys(manifest_path, manifest, MANIFEST_KEYS, optional={"shards"})
    if "shards" in manifest:
        shards = manifest["shards"]
        if manifest["weights"] != INDEX or not isinstance(shards, dict) or not shards:
            raise ValueError(f"{manifest_path}: 'shards' needs 'weights' = {INDEX!r} and an object of shard files: "
                             f"{DAMAGED}")
        for name, record in shards.items():
            _check_keys(f"{manifest_path}: shard {name!r}", record, FILE_KEYS)
    return manifest


def _check_keys(where: str, record, keys: dict, optional=frozenset()) -> None:
    """record is a JSON object with exactly `keys` (each of its type; ints not bools) and perhaps `optional`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object: {DAMAGED}")
    for key, kind in keys.items():
        if key not in record or not isinstance(record[key], kind) or isinstance(record[key], bool):
            raise ValueError(f"{where}: {key!r} is {'missing' if key not in record else 'not a ' + kind.__name__}"
                             f": {DAMAGED}")
    unknown = sorted(set(record) - set(keys) - set(optional))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (a manifest has {list(keys)}): {DAMAGED}")


def _checked_file(path: str, name: str, record: dict, what: str = "weights") -> str:
    """The full path of weights file `name` of checkpoint `path`: inside the folder, present, of the size and
    sha256 that `record` (the manifest's entry) gives."""
    full = _inside(path, name, what)
    if not os.path.isfile(full):
        raise ValueError(f"checkpoint {path!r} is incomplete: {name} is missing (copy the whole folder again, or "
                         "save the model again)")
    size = os.path.getsize(full)
    if size != record["bytes"]:
        raise ValueError(f"{full} is truncated or altered: {size} bytes, the manifest says {record['bytes']} "
                         "(copy it again, or save the model again)")
    if file_sha256(full) != record["sha256"]:
        raise ValueError(f"{full} was modified after saving: its sha256 does not match {MANIFEST} (copy it again, "
                         "or save the model again)")
    return full


def _read_safetensors(full: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(full)
    except (SafetensorError, OSError, ValueError) as e:  # a malformed header
        raise ValueError(f"{full} is not a readable safetensors file ({e}): {DAMAGED}") from None


def _read_index(path: str, index: str, shards: dict) -> tuple[dict[str, str], int]:
    """(weight_map, metadata.total_size) of a sharded checkpoint's checked index file: every file it names inside
    the folder and listed by the manifest's shards, and every listed shard named."""
    try:
        with open(index) as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{index} is not valid JSON ({e}): {DAMAGED}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    total = (data.get("metadata") or {}).get("total_size") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()) or \
            not isinstance(total, int):
        raise ValueError(f"{index}: expected {{'metadata': {{'total_size': int}}, 'weight_map': {{tensor: file}}}}: "
                         f"{DAMAGED}")
    for name in sorted(set(weight_map.values())):
        _inside(path, name, "shard")
        if name not in shards:
            raise ValueError(f"{index} names shard {name!r}, which {MANIFEST} does not list: {DAMAGED}")
    unnamed = sorted(set(shards) - set(weight_map.values()))
    if unnamed:
        raise ValueError(f"{MANIFEST} lists shard {unnamed[0]!r}, which {INDEX} gives no tensor: {DAMAGED}")
    return weight_map, total


def _check_no_strays(path: str, listed) -> None:
    """No model-*-of-*.safetensors file in the folder beyond the manifest's (a leftover a reader could take)."""
    stray = sorted(f for f in os.listdir(path) if SHARD_NAME.fullmatch(f) and f not in listed)
    if stray:
        raise ValueError(f"{os.path.join(path, stray[0])} is not part of this checkpoint ({MANIFEST} does not list "
                         "it): a leftover of another save? Remove it, or save the model again")


def _sharded_tensors(path: str, manifest: dict, index: str) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, each shard checked against the manifest and the index."""
    weight_map, total_size = _read_index(path, index, manifest["shards"])
    tensors = {}
    for name, record in manifest["shards"].items():
        full = _checked_file(path, name, record, "shard")
        shard = _read_safetensors(full)
        expected = {t for t, f in weight_map.items() if f == name}
        odd = sorted(set(shard) ^ expected)
        if odd:
            where = "holds" if odd[0] in shard else "lacks"
            raise ValueError(f"{full} {where} tensor {odd[0]!r}, against {INDEX}'s weight_map: {DAMAGED}")
        tensors |= shard
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total_size != total:
        raise ValueError(f"{index}: metadata.total_size {total_size} does not match the shards' {total} bytes: "
                         f"{DAMAGED}")
    return tensors


def _verified_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of tquant checkpoint `path`, after the manifest's checks (module docstring)."""
    manifest = _read_manifest(path)
    main = _checked_file(path, manifest["weights"], manifest)
    _check_no_strays(path, manifest.get("shards", ()))
    if "shards" in manifest:
        return _sharded_tensors(path, manifest, main)
    return _read_safetensors(main)


def _inside(folder: str, name: str, what: str = "weights") -> str:
    """The path of the manifest's weights file `name` (what: "weights", or "shard": a file the index names), refused
    unless it is a relative path in the checkpoint folder that stays there once resolved (no '..', no absolute path,
    no symlink pointing out; in a snapshot of the hub's cache, a symlink into that repo's blobs, as the cache
    stores every file: tquant.interop.hub)."""
    where = f"{os.path.join(folder, MANIFEST if what == 'weights' else INDEX)}: {what} {name!r}"
    parts = name.replace("\\", "/").split("/")
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or ":" in name:
        raise ValueError(f"{where} is not a file name inside the checkpoint folder (no absolute paths, no '..'): "
                         f"{DAMAGED}")
    full = os.path.join(folder, name)
    root = os.path.realpath(folder)
    real = os.path.realpath(full)
    blobs = snapshot_blobs(root)  # a hub cache snapshot: its files link into the repo's blobs
    if real == root or not any(os.path.commonpath([place, real]) == place for place in filter(None, (root, blobs))):
        also = f" or its hub cache blobs {blobs}" if blobs else ""
        raise ValueError(f"{where} resolves to {real}, outside the checkpoint folder {root}{also} (a symlink out?): "
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


def install_layers(model: nn.Module, qc: dict) -> dict:
    """Swap in the quantized module (buffers on meta) of every layer spec of quantization_config qc, each checked
    (known type, valid spec, standing in for a layer of the model's sizes), and check its KV-cache spec; returns the
    layer specs. ValueError naming the layer otherwise."""
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
        check_kv_spec(model.config, qc["kv_cache"])
    return layers


def _sizes(module: nn.Module) -> tuple[int, ...] | None:
    """(in, out) of a linear layer (nn.Linear, a quantized one, GPT-2's Conv1D), (rows, dim) of an embedding, or
    (experts, hidden, intermediate) of a mixture-of-experts module (transformers' fused experts, PackedExperts)."""
    if all(hasattr(module, a) for a in ("num_experts", "hidden_dim", "intermediate_dim")):
        return module.num_experts, module.hidden_dim, module.intermediate_dim
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
    """config.json as a dict when its quantization_config names a quant_method other than tquant's, else None.
    A config.json without one takes AutoGPTQ's quantize_config.json or AutoAWQ's quant_config.json beside it
    (tquant.interop.loader.legacy_config)."""
    from .interop.loader import legacy_config

    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None  # no readable config: the tquant checks below say what is wrong
    if not isinstance(config, dict):
        return None
    qc = config.get("quantization_config")
    if qc is None:
        qc = legacy_config(path)
        config = {**config, "quantization_config": qc}
    if isinstance(qc, dict) and qc.get("quant_method") not in (None, "tquant"):
        return config
    return None


def load(path_or_hub_id: str, device=None, revision: str | None = None) -> nn.Module:
    """Rebuild a model saved by tquant.save. Returns it in eval mode on `device` (default cpu).
    A checkpoint whose config.json names quant_method "compressed-tensors", "gptq" or "awq" is imported by
    tquant.interop into tquant's modules (any other quant_method: ValueError).
    path_or_hub_id: the checkpoint's folder, or a hub id (org/name) at `revision` (branch, tag or commit; default
    main), taken from the hub's cache or downloaded there by huggingface_hub.snapshot_download
    (tquant.interop.hub.checkpoint_folder: HF_HUB_CACHE, HF_HUB_OFFLINE). tquant.from_pretrained is this function."""
    import transformers

    path = checkpoint_folder(path_or_hub_id, revision)
    foreign = _foreign_config(path)
    if foreign is not None:  # another library's checkpoint: its importer (tquant.interop)
        from .interop.loader import load_foreign

        return load_foreign(path, foreign, device)
    tensors = _verified_tensors(path)
    config = transformers.AutoConfig.from_pretrained(path)
    qc = read_quantization_config(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    layers = install_layers(model, qc)
    _assign(model, tensors)
    for name in layers:  # every index in range, every float finite, before anything reads them
        model.get_submodule(name).validate(name)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    if "kv_cache" in qc:
        hook_generate(model)
    return model.to(device or "cpu").eval()

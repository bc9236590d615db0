"""transformers' from_pretrained for tquant checkpoints: `AutoModelForCausalLM.from_pretrained(dir)` after
`import tquant` gives the model tquant.load(dir) gives (same module types, same tensors, same logits), so HF
pipelines, lm-eval's HFLM and other transformers code take a tquant checkpoint as an ordinary model.

Registration: importing this module registers TquantConfig / TquantHfQuantizer for quant_method "tquant" with
transformers (transformers.quantizers.auto's register_quantization_config / register_quantizer; once, idempotent).
`import tquant` does not import transformers: tquant/__init__.py imports this module when transformers' quantizer
registry is first imported (a sys.meta_path hook watching transformers.quantizers.auto, which transformers imports
before any from_pretrained), or at once when it was imported before tquant.

What from_pretrained does with a tquant checkpoint (the steps and the checks of tquant.serialization.load):
    before the weights  tquant.json's checks on the folder: every weights file inside the folder, its size and
                        sha256, the index's shards exactly the manifest's, no stray shard; the files transformers is
                        about to read exactly those; each layer spec checked and its module swapped in (meta);
                        the checkpoint's tensor names, shapes and dtypes (from the safetensors headers, no data read)
                        against the model's: none missing (tied ones aside), none extra, integer dtypes exact,
                        floats floating; a quantized layer's float tensors keep the dtype they were saved in;
                        the KV-cache spec (tquant.kv.hook.check_kv_spec)
    the weights         transformers' own loader (no second read of the data)
    after the weights   every quantized layer's validate(name) (dtypes exact, floats finite, indices in range), no
                        tensor left empty, and generate() hooked for a KV-cache method (tquant.kv.hook)
Differences from tquant.load: the non-quantized tensors (embeddings, norms) follow from_pretrained's dtype= (default
"auto": config.json's dtype, the one tquant.save wrote them in); non-persistent buffers (RoPE's inv_freq) are
computed by the model, not read. The folder (or the hub id's snapshot in the hub's cache, whose files link into
the repo's blobs: tquant.interop.hub) must hold a tquant checkpoint with its tquant.json. model.save_pretrained is
refused (it would write no tquant.json): save with tquant.save(model, dir).
"""
from __future__ import annotations

import copy
import os
import re

import torch
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "tquant"  # tquant.config.QUANT_METHOD (not imported: this module stays light until from_pretrained)

# safetensors header dtype names -> torch dtypes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class TquantConfig(QuantizationConfigMixin):
    """config.json's quantization_config of a tquant checkpoint (tquant.config), kept as it is: to_dict() gives
    the same dict back, so tquant.save / tquant.export / tquant.kv_cache read it from model.config."""

    def __init__(self, **config):
        config.setdefault("quant_method", QUANT_METHOD)
        self.__dict__.update(config)

    def to_dict(self) -> dict:
        return copy.deepcopy(self.__dict__)


class TquantHfQuantizer(HfQuantizer):
    """Loads a tquant checkpoint folder into tquant's modules (see the module docstring). Pre-quantized only."""

    requires_calibration = True  # transformers cannot quantize a float model with tquant: tquant.quantize does

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("tquant checkpoints cannot be offloaded to disk (device_map names 'disk'): load them on "
                             "one device")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from ..config import read_quantization_config
        from ..serialization import install_layers

        if not checkpoint_files:
            raise ValueError("tquant checkpoints load from a folder holding model.safetensors (or its shards)")
        saved = _checked_headers(checkpoint_files)
        qc = read_quantization_config(model.config)
        layers = install_layers(model, qc)  # as tquant.load
        self._saved_buffers = _check_tensors(model, saved, layers)
        self._layers = list(layers)

    def _process_model_after_weight_loading(self, model, **kwargs):
        from safetensors import safe_open

        from ..config import tquant_config
        from ..kv.hook import hook_generate

        for name, file in self._saved_buffers.items():  # as saved (a RoPE table cast with the model), as tquant.load
            module, _, leaf = name.rpartition(".")
            owner = model.get_submodule(module)
            with safe_open(file, framework="pt") as f:
                owner._buffers[leaf] = f.get_tensor(name).to(owner._buffers[leaf].device)
        empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
        if empty:
            raise ValueError(f"tensors were left unloaded: {empty[:5]}: the checkpoint does not fit this model")
        for name in self._layers:  # every index in range, every float finite, before anything reads them
            model.get_submodule(name).validate(name)
        if "kv_cache" in (tquant_config(model.config) or {}):
            hook_generate(model)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        from transformers.utils import logging

        logging.get_logger(__name__).warning(
            "a tquant model is saved with tquant.save(model, dir), which writes the tquant.json manifest that "
            "tquant.load and from_pretrained check; model.save_pretrained would write none")
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def _checked_headers(checkpoint_files: list[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype, str]]:
    """tquant.load's checks of the checkpoint folder (tquant.json: names, sizes, sha256, shards and index, strays),
    the files transformers reads exactly the manifest's, each shard's tensors the index's; returns {tensor:
    (shape, dtype, file)} read from the safetensors headers."""
    from safetensors import safe_open

    from ..serialization import DAMAGED, INDEX, MANIFEST, _check_no_strays, _checked_file, _read_index, _read_manifest

    folder = os.path.dirname(os.path.abspath(checkpoint_files[0]))
    manifest = _read_manifest(folder)
    main = _checked_file(folder, manifest["weights"], manifest)
    _check_no_strays(folder, manifest.get("shards", ()))
    weight_map = None
    if "shards" in manifest:
        weight_map, total_size = _read_index(folder, main, manifest["shards"])
        files = {name: _checked_file(folder, name, record, "shard") for name, record in manifest["shards"].items()}
    else:
        files = {manifest["weights"]: main}
    read = {os.path.abspath(f) for f in checkpoint_files}
    if read != {os.path.abspath(f) for f in files.values()}:
        raise ValueError(f"transformers would read {sorted(os.path.basename(f) for f in read)} from {folder}, "
                         f"{MANIFEST} lists {sorted(files)}: {DAMAGED}")
    saved = {}
    for name, full in files.items():
        with safe_open(full, framework="pt") as f:
            keys = set(f.keys())
            for key in keys:
                part = f.get_slice(key)
                dtype = _DTYPES.get(part.get_dtype())
                if dtype is None:
                    raise ValueError(f"{full}: tensor {key!r} has dtype {part.get_dtype()}, which tquant never "
                                     f"saves: {DAMAGED}")
                saved[key] = (tuple(part.get_shape()), dtype, full)
        if weight_map is not None:
            odd = sorted(keys ^ {t for t, f in weight_map.items() if f == name})
            if odd:
                raise ValueError(f"{full} {'holds' if odd[0] in keys else 'lacks'} tensor {odd[0]!r}, against "
                                 f"{INDEX}'s weight_map: {DAMAGED}")
    if weight_map is not None:
        total = sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for s, d, _ in saved.values())
        if total != total_size:
            raise ValueError(f"{main}: metadata.total_size {total_size} does not match the shards' {total} bytes: "
                             f"{DAMAGED}")
    return saved


def _check_tensors(model, saved: dict, layers: dict) -> dict[str, str]:
    """The checkpoint's tensors against the model's (tquant.serialization._assign's rules), before any is read; the
    quantized layers' float tensors become the dtype they were saved in (transformers then keeps it). Returns {name:
    file} of the non-persistent buffers the checkpoint holds (transformers' loader skips them; tquant.load reads
    them)."""
    from ..modules.base import DAMAGED
    from ..serialization import STALE

    have = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    for name, (shape, dtype, _) in saved.items():
        if name not in have:
            raise ValueError(f"the checkpoint has a tensor {name!r} that the model does not: {STALE}")
        old = have[name]
        if tuple(old.shape) != shape:
            raise ValueError(f"{name}: checkpoint shape {shape} != model shape {tuple(old.shape)}: {STALE}")
        if old.is_floating_point() != dtype.is_floating_point or (not old.is_floating_point() and old.dtype != dtype) \
                or dtype == torch.float64:
            want = old.dtype if not old.is_floating_point() else "float16 / bfloat16 / float32"
            raise ValueError(f"{name}: checkpoint dtype {dtype}, the model expects {want}: {DAMAGED}")
    persistent = model.state_dict()
    extra = {n: saved[n][2] for n in saved if n not in persistent}  # non-persistent buffers tquant.save also writes
    model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | \
        {re.escape(n) for n in extra}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [n for n in persistent if n not in saved and n not in tied]
    if missing:
        raise ValueError(f"the checkpoint lacks tensors the model needs: {missing[:5]}: {STALE}")
    for layer in layers:  # keep each quantized layer's saved float dtypes (transformers casts to the meta tensor's)
        module = model.get_submodule(layer)
        for leaf, t in [*module._parameters.items(), *module._buffers.items()]:
            full = f"{layer}.{leaf}"
            if t is not None and t.is_floating_point() and full in saved and saved[full][1] != t.dtype:
                new = torch.empty(t.shape, dtype=saved[full][1], device="meta")
                if leaf in module._parameters:
                    module._parameters[leaf] = torch.nn.Parameter(new, requires_grad=False)
                else:
                    module._buffers[leaf] = new
    return extra


def register() -> None:
    """Register TquantConfig and TquantHfQuantizer for quant_method "tquant" (nothing when already registered)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(TquantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(TquantHfQuantizer)


register()

"""A float Hugging Face checkpoint folder read a module at a time: config.json and model.safetensors, or
model.safetensors.index.json with its shards; a shard is memory-mapped (safetensors.safe_open) only while the tensors
of one module are read from it, so the pages read are let go with the module.

    Source(path)                 the folder checked: config.json, safetensors weights, a float model
    source.skeleton(dtype)       the architecture built on the meta device from config.json (transformers' own class),
                                 then every tensor outside the decoder blocks read in: embeddings, final norm, head
    source.load(model, block, prefix)    one block's tensors read in by their names (prefix + name), each made of
                                 the stored tensors transformers' loading rules turn into it (conversion.py: Mixtral's
                                 and Qwen3-MoE's experts, stored one by one, fused into the model's 3-D expert tensors)
    source.fingerprint()         what names this model for a resumed run: config.json's sha256, each weights file's
                                 size, the sha256 of its safetensors header (names, dtypes, shapes, offsets) and of
                                 its first and last MiB of tensor data

Each tensor is read as stored and cast to the dtype the skeleton was built in where they differ (floats only).
Tied tensors (a head sharing the embedding) are read once and shared. Non-persistent buffers (rotary tables, not
in the files) are computed as transformers' from_pretrained computes them, by the model's own _init_weights, so
the model equals transformers.AutoModelForCausalLM.from_pretrained(path) tensor for tensor.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import defaultdict

import torch
from safetensors import safe_open
from torch import nn

from ..models import find_blocks, resolve_dtype
from ..serialization import INDEX, WEIGHTS, file_sha256
from .conversion import Conversion

STORED_FLOATS = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}  # safetensors' dtype names
SAMPLE = 1 << 20  # bytes of tensor data at each end of a weights file that its fingerprint hashes


class Source:
    """The float checkpoint in folder `path` (module docstring); ValueError naming what is missing otherwise."""

    def __init__(self, path: str):
        self.path = os.path.expanduser(os.fspath(path))
        if not os.path.isdir(self.path):
            raise ValueError(f"streaming reads a local Hugging Face model folder (config.json + *.safetensors); "
                             f"{path!r} is not a folder (a hub id: download it first, e.g. `hf download ORG/NAME "
                             "--local-dir DIR`; a .gguf file: quantize it in memory, without streaming)")
        if not os.path.isfile(os.path.join(self.path, "config.json")):
            raise ValueError(f"{path!r} has no config.json: streaming builds the model from it")
        with open(os.path.join(self.path, "config.json")) as f:
            qc = json.load(f).get("quantization_config")
        if qc:
            raise ValueError(f"{path!r} holds a model quantized already (quantization_config: "
                             f"{qc.get('quant_method') if isinstance(qc, dict) else qc}); quantize the float model")
        self.files = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        """{tensor name: full path of the safetensors file holding it}."""
        index, single = os.path.join(self.path, INDEX), os.path.join(self.path, WEIGHTS)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no weight_map of tensor names to shard files")
            files = {n: os.path.join(self.path, f) for n, f in weight_map.items()}
            missing = sorted({f for f in files.values() if not os.path.isfile(f)})
            if missing:
                raise ValueError(f"{index} names shard {os.path.basename(missing[0])}, which is not in {self.path}: "
                                 "copy or download the whole model folder")
            return files
        if os.path.isfile(single):
            with safe_open(single, framework="pt") as f:
                return {n: single for n in f.keys()}  # noqa: SIM118 - safe_open is no mapping
        found = sorted(f for f in os.listdir(self.path) if f.endswith((".bin", ".pt", ".pth", ".gguf")))
        raise ValueError(f"{self.path} has no safetensors weights ({WEIGHTS} or {INDEX}), which streaming reads "
                         f"memory-mapped{f' (it holds {found[0]})' if found else ''}: convert the model once with "
                         "transformers (AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)), or "
                         "quantize it in memory, without streaming")

    def fingerprint(self) -> dict:
        """config.json's sha256 and, per weights file, its bytes, its safetensors header's sha256 and the sha256 of
        its first and last MiB of tensor data (a sample: hashing every byte of a 140 GB model takes minutes)."""
        record = {"config.json": file_sha256(os.path.join(self.path, "config.json"))}
        for full in sorted(set(self.files.values())):
            size = os.path.getsize(full)
            with open(full, "rb") as f:
                length = f.read(8)
                header = length + f.read(struct.unpack("<Q", length)[0]) if len(length) == 8 else length
                sample = f.read(SAMPLE)
                f.seek(max(f.tell(), size - SAMPLE))
                sample += f.read()
            record[os.path.basename(full)] = {"bytes": size, "header_sha256": hashlib.sha256(header).hexdigest(),
                                              "sample_sha256": hashlib.sha256(sample).hexdigest()}
        return record

    def bytes(self) -> int:
        return sum(os.path.getsize(f) for f in set(self.files.values()))

    def _stored_dtype(self) -> torch.dtype:
        """The dtype of the first floating tensor in the files (what "auto" takes when config.json names none)."""
        for name, full in self.files.items():
            with safe_open(full, framework="pt") as f:
                dtype = f.get_slice(name).get_dtype()
            if dtype in STORED_FLOATS:
                return STORED_FLOATS[dtype]
        return torch.float32

    def skeleton(self, dtype="auto") -> nn.Module:
        """The model on the meta device, every tensor outside its decoder blocks read in. dtype "auto": config.json's
        dtype, else the stored one (as transformers' dtype="auto"); a torch dtype or name casts."""
        import transformers

        config = transformers.AutoConfig.from_pretrained(self.path)
        dtype = resolve_dtype(dtype)
        if dtype == "auto":
            dtype = resolve_dtype(getattr(config, "dtype", None) or self._stored_dtype())
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        if os.path.isfile(os.path.join(self.path, "generation_config.json")):
            model.generation_config = transformers.GenerationConfig.from_pretrained(self.path)
        self.conversion = Conversion(model, self._shapes(), self.path)
        self._names(_groups(model, "", None))  # every tensor the files must make is there: refused before any read
        blocks_name, _ = find_blocks(model)
        self.load(model, model, "", exclude=blocks_name + ".")
        return model.eval()

    def load(self, model: nn.Module, module: nn.Module, prefix: str, exclude: str | None = None) -> None:
        """Read every tensor of `module` (named prefix + its own names in `model`) still on the meta device, leaving
        out the modules whose names start with `exclude`."""
        groups = _groups(module, prefix, exclude)
        computed = [places for places in groups if _non_persistent(places)]
        for places in computed:  # filled by _init_weights while the module's parameters are still on meta
            _put(places, torch.empty_like(places[0][3], device="cpu"))
        for owner in {id(p[0][1]): p[0][1] for p in computed}.values():
            model._init_weights(owner)
        names = self._names(groups)
        places_of = {names[id(places)]: places for places in groups if id(places) in names}
        for recipe in {id(r): r for r in map(self.conversion.recipes.get, places_of)}.values():
            made = recipe.build(self._read([stored for _, stored in recipe.sources]), model)
            for name, value in made.items():
                if name not in places_of:  # made by the same recipe, outside this module
                    continue
                old = places_of[name][0][3]
                if value.is_floating_point() and old.is_floating_point():
                    value = value.to(old.dtype)
                elif value.dtype != old.dtype:
                    raise ValueError(f"{self.path}: tensor {name!r} is {value.dtype}, the model expects {old.dtype}")
                _put(places_of[name], value)

    def _names(self, groups) -> dict[int, str]:
        """{id(places): the model name the files make it by} of each group but non-persistent buffers; ValueError
        naming a tensor the files do not make, or make in a shape other than the model's."""
        stored = [places for places in groups if not _non_persistent(places)]
        made = self.conversion.shapes
        names = {id(places): next((n for n, *_ in places if n in made), None) for places in stored}
        missing = [places[0][0] for places in stored if names[id(places)] is None]
        if missing:
            raise ValueError(f"{self.path}'s safetensors files lack tensor {missing[0]!r}, which the model built "
                             f"from its config.json has (model type {self.conversion.model_type!r}): "
                             "streaming reads a checkpoint's tensors as transformers' from_pretrained does, by the "
                             "model's names or renamed and fused by transformers' loading rules for its type "
                             "(transformers.conversion_mapping), and none of the stored tensors becomes this one; "
                             "check that the folder loads with transformers.AutoModelForCausalLM.from_pretrained, or "
                             "quantize it in memory")
        for places in stored:
            name = names[id(places)]
            if made[name] != tuple(places[0][3].shape):
                sources = [s for _, s in self.conversion.recipes[name].sources]
                raise ValueError(f"{self.path}: tensor {name!r} is {made[name]} as made of the stored "
                                 f"{', '.join(sources[:4])}{' ...' if len(sources) > 4 else ''}; the model built "
                                 f"from its config.json expects {tuple(places[0][3].shape)}")
        return names

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """{stored name: shape} of every tensor in the files, from their headers."""
        by_file = defaultdict(list)
        for name, full in self.files.items():
            by_file[full].append(name)
        shapes = {}
        for full, wanted in by_file.items():
            with safe_open(full, framework="pt") as f:
                shapes |= {n: tuple(f.get_slice(n).get_shape()) for n in wanted}
        return shapes

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The stored tensors `names`, each shard mapped once and closed after."""
        by_file = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        out = {}
        for full, wanted in by_file.items():
            with safe_open(full, framework="pt") as f:
                out |= {n: f.get_tensor(n) for n in wanted}
        return out


def _groups(module: nn.Module, prefix: str, exclude: str | None) -> list[list[tuple]]:
    """The tensors of `module` still on the meta device (names prefix + its own, leaving out modules whose names
    start with `exclude`), each as its places [(full name, owner module, leaf name, tensor)]: a tied tensor has
    several."""
    groups = defaultdict(list)
    for mod_name, owner in module.named_modules(remove_duplicate=False):
        full = prefix + mod_name if mod_name else prefix.rstrip(".")
        if exclude is not None and (full + ".").startswith(exclude):
            continue
        for leaf, t in [*owner._parameters.items(), *owner._buffers.items()]:
            if t is not None and t.is_meta:
                groups[id(t)].append((f"{full}.{leaf}" if full else leaf, owner, leaf, t))
    return list(groups.values())


def _non_persistent(places) -> bool:
    """A buffer the files do not hold (a rotary table): computed, not read."""
    _, owner, leaf, _ = places[0]
    return leaf in owner._non_persistent_buffers_set


def _put(places, value: torch.Tensor) -> None:
    """value in every place of one tensor (owner module, leaf name), as a Parameter where the place holds one."""
    _, owner, leaf, old = places[0]
    if leaf in owner._parameters:
        value = nn.Parameter(value, requires_grad=old.requires_grad)
    for _, owner, leaf, _ in places:
        (owner._parameters if leaf in owner._parameters else owner._buffers)[leaf] = value

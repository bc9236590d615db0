"""Writing an exported checkpoint folder (tquant.export): config.json, the weights as tquant.serialization writes
them (model.safetensors, or transformers' shards model-0000i-of-0000N.safetensors + model.safetensors.index.json past
max_shard_size), the format's extra JSON files, and the source folder's tokenizer and generation config."""
from __future__ import annotations

import json
import os
import shutil

import torch

from ..serialization import DEFAULT_SHARD_SIZE, INDEX, SHARD_NAME, WEIGHTS, shard_bytes, write_weights
from ..version import __version__

SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")


def write_checkpoint(out: str, config: dict, tensors: dict[str, torch.Tensor], source: str | None,
                     extra_files: dict[str, dict] = (), overwrite: bool = False,
                     max_shard_size=DEFAULT_SHARD_SIZE) -> None:
    """Write config.json, the weights (model.safetensors, or past max_shard_size transformers' shards
    model-0000i-of-0000N.safetensors + model.safetensors.index.json) and the extra JSON files into out; copy the
    tokenizer and generation config from the source folder when there is one."""
    shard_bytes(max_shard_size)  # a bad size is refused before anything is written
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"cannot export into {out!r}: it exists and is not a folder")
    found = [f for f in ("config.json", WEIGHTS, INDEX) if os.path.lexists(os.path.join(out, f))]
    found += sorted(f for f in os.listdir(out) if SHARD_NAME.fullmatch(f))[:1] if os.path.isdir(out) else []
    if found and not overwrite:
        raise ValueError(f"{out!r} already holds a checkpoint ({', '.join(found)}): choose another folder, or pass "
                         "overwrite=True (tquant export --overwrite)")
    os.makedirs(out, exist_ok=True)
    write_weights(out, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, max_shard_size,
                  {"format": "pt", "producer": f"tquant {__version__}"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    for name, data in dict(extra_files).items():
        with open(os.path.join(out, name), "w") as f:
            json.dump(data, f, indent=2)
    if source and os.path.abspath(source) != os.path.abspath(out):
        for name in SIDE_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(out, name))

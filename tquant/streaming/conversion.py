"""A checkpoint's stored tensors turned into the model's tensors by the rules transformers' from_pretrained applies on
loading, one model tensor at a time: the renames and fusions of transformers.conversion_mapping (WeightRenaming,
WeightConverter), matched by transformers.core_model_loading.rename_source_key and run by the converter's own convert.

    Conversion(model, shapes)    shapes: {stored name: shape}; each stored name renamed by transformers' rules for the
                                 model (get_model_conversion_mapping: its model type's, the class's, the legacy ones);
                                 the stored tensors that become one model tensor gathered, in transformers' order
                                 (dot_natural_key: expert 2 before expert 10), into one Recipe
    conversion.recipes[name]     the Recipe that makes model tensor `name` (one recipe may make several)
    recipe.sources               [(the converter's source pattern, stored name)]: what it reads
    recipe.build(tensors, model) {model tensor name: tensor} from {stored name: tensor}

E.g. Mixtral (model type "mixtral"), experts e = 0..E-1 of layer L, intermediate I, hidden H:
    model.layers.L.block_sparse_moe.experts.e.w1.weight [I, H] and ...experts.e.w3.weight [I, H]
        -> model.layers.L.mlp.experts.gate_up_proj [E, 2I, H] = cat(stack_e w1, stack_e w3; dim 1)
           (MergeModulelist(dim=0), Concatenate(dim=1))
    model.layers.L.block_sparse_moe.experts.e.w2.weight [H, I] -> model.layers.L.mlp.experts.down_proj [E, H, I]
    model.layers.L.block_sparse_moe.gate.weight -> model.layers.L.mlp.gate.weight          (WeightRenaming)
Qwen3-MoE (qwen2_moe's rules): mlp.experts.e.{gate,up}_proj.weight -> mlp.experts.gate_up_proj, mlp.experts.e.down_proj
.weight -> mlp.experts.down_proj. A model type without rules (Llama): every tensor as stored, by its own name.

A stored tensor the model has no place for is left out (from_pretrained's "unexpected keys"); of several stored
tensors renamed to one model tensor without a converter, the first is read (as from_pretrained). What each recipe
makes (names and shapes) is worked out here by running its operations on meta tensors of the stored shapes, so a
layout that does not fit the model is refused before any tensor is read. The operations only move data (stack, cat,
chunk, transpose, interleave), so casting before or after them gives the same values.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class Recipe:
    """Model tensor `name` (the first one its converter makes) from stored tensors; converter None: one stored tensor
    read as it is."""

    def __init__(self, name: str, converter):
        self.name, self.converter = name, converter
        self.sources: list[tuple[str, str]] = []  # (source pattern, stored name), in transformers' order

    def build(self, tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """{model tensor name: tensor} made of tensors {stored name: tensor} (taken out of the dict, so that the
        stored tensors are freed as the converter's operations consume them)."""
        if self.converter is None:
            return {self.name: tensors.pop(self.sources[0][1])}
        converter = copy.deepcopy(self.converter)  # a fresh one per model tensor, as from_pretrained
        for pattern, stored in self.sources:
            converter.add_tensor(self.name, stored, pattern, tensors.pop(stored))
        made = converter.convert(self.name, model=model, config=model.config)
        return {name: value[0] if isinstance(value, list) else value for name, value in made.items()}


class Conversion:
    """The recipes of every model tensor the stored tensors `shapes` {stored name: shape} make (module docstring);
    ValueError naming the tensor and model type where transformers' rules cannot make it of those shapes."""

    def __init__(self, model: nn.Module, shapes: dict[str, tuple[int, ...]], path: str):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        rules = get_model_conversion_mapping(model)
        renamings = [r for r in rules if isinstance(r, WeightRenaming)]
        converters = [r for r in rules if isinstance(r, WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        expected = model.state_dict()  # the meta model's: names only
        prefix = model.base_model_prefix
        first: dict[str, Recipe] = {}
        for stored in sorted(shapes, key=dot_natural_key):  # as from_pretrained (convert_and_load_state_dict_in_model)
            name, pattern = rename_source_key(stored, renamings, converters, prefix, expected)
            if name not in expected and stored in expected:
                name, pattern = rename_source_key(stored, [], [], prefix, expected)
            if name not in expected:
                continue
            recipe = first.setdefault(name, Recipe(name, by_pattern[pattern] if pattern else None))
            if recipe.converter is not None or not recipe.sources:
                recipe.sources.append((pattern or stored, stored))
        self.recipes: dict[str, Recipe] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # {model tensor name: the shape its recipe makes}
        self.model_type = model_type = model.config.model_type
        for recipe in first.values():
            meta = {stored: torch.empty(shapes[stored], device="meta") for _, stored in recipe.sources}
            try:
                made = recipe.build(meta, model)
            except Exception as e:  # any failure of transformers' operations is this refusal
                raise ValueError(
                    f"{path}: transformers' loading rules for model type {model_type!r} cannot make tensor "
                    f"{recipe.name!r} of the stored {', '.join(s for _, s in recipe.sources[:4])}"
                    f"{' ...' if len(recipe.sources) > 4 else ''} ({type(e).__name__}: {e}); streaming reads a "
                    "checkpoint as transformers.AutoModelForCausalLM.from_pretrained does: check that it loads there, "
                    "or quantize it in memory") from e
            for name, value in made.items():
                self.recipes[name], self.shapes[name] = recipe, tuple(value.shape)

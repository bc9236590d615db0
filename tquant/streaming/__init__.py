"""Streaming quantization: a model larger than memory quantized block by block from its safetensors shards to a
tquant checkpoint, resumable.

    tquant.quantize_to_disk(model_path, out, "gptq", bits=4, calib=...)   (tquant quantize --streaming [--resume])

    model_path/config.json ──► the model built on the meta device (transformers' own class)      (source.py)
    model_path/*.safetensors ─► read in: embeddings, final norm, head, rotary tables (memory-mapped, by name; the
                                tensors transformers renames or fuses on loading, e.g. Mixtral's and Qwen3-MoE's
                                per-expert projections into 3-D expert tensors, through its own rules: conversion.py)
    tquant.quantize(model, method, store=ShardStore)  ── the one driver (tquant.driver), block by block:
        X_0 = the calibration ids through the embeddings (the blocks are stand-ins: none is loaded)
        for block i (the first not done, when resumed):
            ShardStore.load     block i's float tensors read from the shards        (one float block in memory)
            driver              block i quantized on X_i (the method's per-block steps, as in memory); X_{i+1}
            ShardStore.done     block i's quantized tensors -> OUT/.tquant-streaming/block-0000i-*.safetensors, X_{i+1}
                                -> states-0000(i+1).safetensors, the method's run state, then progress.json names
                                them (progress.py); block i back on the meta device (freed)
        lm_head / embeddings quantized in memory when asked (they are there)
    _finish (run.py)    the tensors outside the blocks written; every shard renamed into OUT as
                        model-0000k-of-0000N.safetensors; index, config.json (quantization_config), tokenizer and
                        tquant.json (tquant.serialization); the work folder removed

Peak memory: the embeddings, head and norms, one float block with its quantized form and the method's statistics,
and the calibration hidden states entering and leaving the block (the in-memory path holds every block). A run stopped
at block k (killed, out of memory, a failure) continues at block k with resume=True: the blocks before it are on disk,
checked by sha256.
"""
from .run import quantize_to_disk

__all__ = ["quantize_to_disk"]

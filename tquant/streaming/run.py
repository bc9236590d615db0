"""quantize_to_disk: a float model folder quantized block by block into a tquant checkpoint folder, never whole in
memory (the data flow: tquant/streaming/__init__.py)."""
from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import time

from torch import nn

from ..api import make_method, quantize
from ..config import tquant_config
from ..driver import BlockStore
from ..methods import KVCacheMethod
from ..models import find_blocks
from ..serialization import (
    DEFAULT_SHARD_SIZE,
    INDEX,
    MANIFEST,
    SHARD,
    check_target,
    shard_bytes,
    write_checkpoint_files,
    write_index,
)
from .progress import WORK, Progress, recorded
from .source import Source

log = logging.getLogger("tquant")

# quantize()'s arguments that change nothing in the checkpoint, left out of the options a resumed run must repeat
UNRECORDED = ("model", "tokenizer", "progress", "store")
METHOD_ARGS = ("bits", "group_size", "sym", "method_options")  # recorded as the method's fields


class ShardStore(BlockStore):
    """The driver's blocks read from a Source before each is quantized, and written to the run's Progress and
    freed (back to the meta device) after; on_block(i, n) is called once block i is on disk."""

    def __init__(self, model: nn.Module, source: Source, progress: Progress, limit: int | None, on_block=None):
        self.model, self.source, self.progress, self.limit, self.on_block = model, source, progress, limit, on_block
        self.n_blocks = 0

    def begin(self, method, calib, n_blocks, device):
        self.progress.check_calibration(calib)
        self.n_blocks = n_blocks
        return self.progress.resume_point(method, device)

    def load(self, block, prefix):
        self.source.load(self.model, block, prefix)

    def done(self, i, block, prefix, specs, states, tuple_out, method):
        tensors = {prefix + n: t.detach().cpu().contiguous()
                   for n, t in [*block.named_parameters(), *block.named_buffers()]}
        self.progress.commit(i, tensors, self.limit, specs, states, tuple_out, method)
        del tensors
        block.to("meta")
        if self.on_block is not None:
            self.on_block(i, self.n_blocks)


def quantize_to_disk(model_path: str, out: str, method: str, *, dtype="auto", tokenizer=None,
                     max_shard_size=DEFAULT_SHARD_SIZE, resume: bool = False, overwrite: bool = False, on_block=None,
                     **options) -> str:
    """Quantize the float model in folder model_path (config.json + safetensors) into a tquant checkpoint in folder
    `out` block by block, holding about two blocks and the embeddings in memory; returns out. tquant.load reads the
    result, whose tensors and config equal those of tquant.quantize + tquant.save of the same model, method and
    calibration (the shards are cut differently: one or more per block, then one or more for the rest).

    options: those of tquant.quantize (bits, group_size, sym, calib, n_samples, seqlen, seed, device, batch_size,
    true_sequential, skip, lm_head, embeddings, moe_calibration, moe_min_tokens, progress) and the method's own.
    dtype: "auto" (the checkpoint's own) or a dtype to cast to, as tquant.models.load_model. tokenizer: for named
    calibration sources and saved with the result; None: the model folder's, when it has one. max_shard_size: the
    largest output file. resume: continue the run stopped in `out` at its first block not written (refused, naming
    it, when the model, an option or the calibration differ); overwrite: replace a checkpoint or a stopped run in
    `out`. on_block(i, n): called once block i of n is written and recorded.
    Refused: KV-cache methods (quantize the weights here, then tquant.load and apply the KV method) and weight
    methods with whole-model steps (QoQ's rotation and KV cache, ABQ-LLM's): quantize those in memory."""
    bound = inspect.signature(quantize).bind(None, method, **options)
    bound.apply_defaults()
    args = dict(bound.arguments)
    chosen = make_method(method, bits=args["bits"], group_size=args["group_size"], sym=args["sym"],
                         **args["method_options"])
    _check_streams(chosen, method)
    limit = shard_bytes(max_shard_size)
    source = Source(model_path)
    if resume and os.path.isfile(os.path.join(out, MANIFEST)) and not os.path.isdir(os.path.join(out, WORK)):
        raise ValueError(f"{out!r} holds a finished checkpoint: nothing to resume (tquant.load reads it)")
    if not os.path.isdir(os.path.join(out, WORK)):
        check_target(out, overwrite)
    settings = {k: recorded(v) for k, v in args.items() if k not in UNRECORDED + METHOD_ARGS}
    settings |= {k: recorded(v) for k, v in dataclasses.asdict(chosen).items()}  # the method's, defaults resolved
    settings |= {"dtype": str(dtype), "max_shard_size": recorded(max_shard_size)}
    if tokenizer is None and any(os.path.isfile(os.path.join(source.path, f)) for f in ("tokenizer.json",
                                                                                          "tokenizer_config.json")):
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(source.path)
    model = source.skeleton(dtype)  # every tensor's name and shape checked against the files
    blocks_name, blocks = find_blocks(model)
    progress = Progress.open(out, source.fingerprint(), settings, resume, overwrite)
    log.info(f"streaming {model_path} ({len(blocks)} blocks, {source.bytes() / 2**30:.2f} GiB of safetensors, "
             f"{next(model.parameters()).dtype}) into {out}: one block in memory at a time")
    store = ShardStore(model, source, progress, limit, on_block)
    quantize(model, method, tokenizer=tokenizer, store=store, **options)
    tquant_config(model.config)["base_model"] = model_path  # what `tquant analyze` compares against
    _finish(out, model, blocks_name, progress, limit, tokenizer)
    return out


def _check_streams(method, name: str) -> None:
    """ValueError for a method that cannot run block by block from disk, saying what to do instead."""
    if isinstance(method, KVCacheMethod):
        raise ValueError(  # noqa: TRY004 - a refusal, reported as the others
            f"{name!r} quantizes the KV cache, which streaming does not write: stream a weight method, then "
            f"tquant.load the result and apply it (tquant.quantize(model, {name!r}, ...))")
    steps = method.own_steps("prepare_model", "kv_cache_method")
    if steps:
        raise ValueError(f"method {name!r} cannot stream: its whole-model steps ({', '.join(steps)}: e.g. QoQ's "
                         "residual rotation and KV-cache calibration, ABQ-LLM's float-model targets) need every block "
                         "in memory at once; quantize it in memory, without streaming")


def _finish(out: str, model: nn.Module, blocks_name: str, progress: Progress, limit: int | None, tokenizer) -> None:
    """The checkpoint assembled in out: the tensors outside the blocks written, every shard moved in under its final
    name model-0000i-of-0000N.safetensors (Progress.move), the index, config, tokenizer and manifest
    (tquant.serialization) written, the work folder removed. Run again by a resumed run stopped in here."""
    start = time.monotonic()
    rest = {n: t.detach().cpu().contiguous() for n, t in [*model.named_parameters(), *model.named_buffers()]
            if not n.startswith(blocks_name + ".")}
    shards = progress.shards() + progress.write_shards("rest", rest, limit)
    names = [SHARD.format(k + 1, len(shards)) for k in range(len(shards))]
    progress.move(shards, names)
    write_index(out, {t: name for record, name in zip(shards, names) for t in record["tensors"]},
                sum(b for record in shards for b in record["tensors"].values()))
    log.info(f"writing the manifest: sha256 of {len(names)} shards ({sum(r['bytes'] for r in shards) / 2**30:.2f} GiB, "
             "about a second a GiB)")
    write_checkpoint_files(out, model, [*names, INDEX], tokenizer)
    progress.remove()
    log.info(f"wrote {out} in {time.monotonic() - start:.1f} s")


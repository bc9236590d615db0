"""Perplexity table of fp / RTN / GPTQ on the offline SmolLM2-135M (README's first quality table).

    python benchmarks/quality_smollm2.py [--device cpu|cuda] [--settings w4pc,w4g64,w3g64,w2g32] [--json out.json]

Settings: calibration = 128 random windows x 512 tokens from the first 70 % of the pydoc corpus (seed 0);
evaluation = the first 40 consecutive 512-token windows of the last 30 %; float32 on the CPU (the model's
dtype for this table); GPTQ with act_order, percdamp 0.01, blocksize 128, asymmetric grid, true-sequential
as given by --true-sequential. Prints one markdown table.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import tquant
from tquant.tools.eval import perplexity
from tquant.models import load_model

SETTINGS = {  # name: (bits, group_size)
    "w4pc": (4, -1),
    "w4g64": (4, 64),
    "w3g64": (3, 64),
    "w2g32": (2, 32),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--methods", default="rtn,gptq")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--true-sequential", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    base, tok = load_model("default", device=a.device)
    ppl = lambda m: perplexity(m, "pydoc", tokenizer=tok, seqlen=512, n_windows=a.windows, progress=False)
    rows = {"fp32": {"ppl": ppl(base)}}
    print(f"fp32 ppl {rows['fp32']['ppl']:.3f}", flush=True)
    for setting in a.settings.split(","):
        bits, gs = SETTINGS[setting]
        for method in a.methods.split(","):
            model = copy.deepcopy(base)
            opts = dict(act_order=True) if method == "gptq" else {}
            t = time.time()
            tquant.quantize(model, method, bits=bits, group_size=gs, sym=False, calib="pydoc", tokenizer=tok,
                            n_samples=a.n_samples, seqlen=512, device=a.device,
                            true_sequential=bool(a.true_sequential), progress=False, **opts)
            seconds = time.time() - t
            rows[f"{method} {setting}"] = {"ppl": ppl(model), "quantize_s": seconds}
            print(f"{method} {setting}: ppl {rows[f'{method} {setting}']['ppl']:.3f} (quantized in {seconds:.0f} s)",
                  flush=True)
            del model
    fp = rows["fp32"]["ppl"]
    print("\n| setting | RTN | GPTQ | GPTQ recovers of RTN's loss |\n|---|---|---|---|")
    print(f"| fp32 | {fp:.2f} | {fp:.2f} | |")
    for setting in a.settings.split(","):
        r, g = rows.get(f"rtn {setting}", {}).get("ppl"), rows.get(f"gptq {setting}", {}).get("ppl")
        rec = f"{(r - g) / (r - fp):.0%}" if r and g and r > fp else ""
        fmt = lambda v: f"{v:.2f}" if v else "-"
        print(f"| {setting} | {fmt(r)} | {fmt(g)} | {rec} |")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()

"""Time to quantize the offline SmolLM2-135M, method against method, on one CPU thread (issue 29: AWQ against GPTQ).

    python benchmarks/quantize_time.py [--configs "gptq:" "awq:search_samples=8" ...] [--blocks N] [--repeats 2]
                                       [--n-samples 32] [--threads 1] [--json out.json]

Each config is "method:key=value,..." on top of bits=4, group_size=64, sym=False (the quality tables' W4 g64 grid;
"gptq:bits=3" or "awq:group_size=-1" change it);
the calibration is the quality tables' (N random 512-token windows of the first 70 % of pydoc, seed 0). Each run
quantizes a fresh copy of the float32 model (its first --blocks decoder blocks, all by default) with the driver and
records the wall time and this process's CPU time; configs alternate within each repeat, so a machine shared with
other jobs slows them alike. One thread by default: CPU seconds then count work, not threads waiting on each other
(with 2 threads on a loaded machine, OpenMP's spinning inflates CPU time and the wall time follows the load).
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from tquant import driver
from tquant.api import make_method
from tquant.calib.data import calibration_data
from tquant.models import load_model
from tquant.tools.compare import parse_option


def parse_config(text: str) -> tuple[str, dict]:
    method, _, rest = text.partition(":")
    return method, dict(parse_option(item) for item in rest.split(",") if item)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="+", default=["gptq:", "awq:search_samples=8", "awq:"])
    p.add_argument("--blocks", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    model, tok = load_model("default", dtype=torch.float32)
    ids = calibration_data("pydoc", tok, n_samples=a.n_samples, seqlen=512, seed=0)
    if a.blocks:
        model.model.layers = model.model.layers[:a.blocks]
    results = {"_settings": {"blocks": len(model.model.layers), "n_samples": a.n_samples, "threads": a.threads,
                             "grid": "bits=4, group_size=64, sym=False"}}
    for rep in range(a.repeats):
        for text in a.configs:
            method, opts = parse_config(text)
            m = copy.deepcopy(model)
            chosen = make_method(method, **{"bits": 4, "group_size": 64, "sym": False, **opts})
            wall, cpu = time.time(), time.process_time()
            driver.quantize_blocks(m, chosen, ids, progress=False)
            row = results.setdefault(text, {"wall_s": [], "cpu_s": []})
            row["wall_s"].append(round(time.time() - wall, 1))
            row["cpu_s"].append(round(time.process_time() - cpu, 1))
            print(rep, text, row, flush=True)
            del m
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

"""Why rotation hurts QoQ on the offline SmolLM2: weight-only RTN W4A16 on the float model as is, after folding the
RMSNorm weights into the linears that read them (tquant.calib.rotation with Q = I), and after the full rotation
(fold, then the randomized Hadamard Q); group 64 and per channel. 20 evaluation windows (the quality tables' first
20), float32 CPU, about 10 minutes.

    python benchmarks/quality_fold_rotation.py [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

import tquant
import tquant.calib.rotation as rotation
from tquant.tools.eval import perplexity
from tquant.models import load_model


def fold_only(model) -> None:
    """rotate_residual with the identity for Q: only the norms' weights move into their readers."""
    real = rotation.rotation_matrix
    rotation.rotation_matrix = lambda d, seed=0: torch.eye(d, dtype=torch.float64)
    try:
        rotation.rotate_residual(model)
    finally:
        rotation.rotation_matrix = real


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    base, tok = load_model()
    results = {}
    transforms = {"as is": None, "folded": fold_only, "rotated": rotation.rotate_residual}
    for group in (None, 64, -1):
        for name, transform in transforms.items():
            model = copy.deepcopy(base)
            if transform:
                transform(model)
            if group is not None:
                tquant.quantize(model, "rtn", bits=4, group_size=group, device="cpu", progress=False)
            row = f"{'fp32' if group is None else f'rtn-w4-{group}'} {name}"
            results[row] = perplexity(model, "pydoc", tokenizer=tok, seqlen=512, n_windows=20, progress=False)
            print(row, round(results[row], 3), flush=True)
    if a.json:
        json.dump(results, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()

"""Time and memory of QuIP#'s end-to-end fine-tuning stage (quip# e2e_epochs) on the offline SmolLM2-135M.

    python benchmarks/quip_e2e_cost.py [--n-samples 8] [--batch 4] [--steps 2] [--threads 1] [--topk 64] [--saved]
                                       [--order dense|transforms]

Only the cost is measured, not quality: every block linear becomes a 4-bit QuipLinear with random codes (quantizing
for real takes 20-58 min on a 2-core CPU; the tuning stage's work does not depend on the codes' values). Prints the
seconds of the teacher's top-k forward over the calibration windows, of one training step (forward, backward and
Adam over e2e_batch windows of 512 tokens) and of one KL check over all windows, and the peak resident memory of
the process after the float model is loaded and after the steps. --order: the stage's evaluation order (quip#'s
e2e_dense option): dense (its default; every QuipLinear multiplies by its rotated-back weight, computed once on
entry, timed apart) or transforms (through the Hadamard transforms, checkpointed). --saved instead: the bytes
autograd keeps for the backward of one 512-token window (every tensor a pack hook sees, counted once per storage),
in the blocks and with the loss.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from tquant.calib.block_tuning import float32_training
from tquant.calib.data import calibration_data
from tquant.calib.logit_distill import distill_logits, kl_error, teacher_topk, topk_kl
from tquant.methods.quip_sharp import end_to_end_parameters
from tquant.models import find_blocks, load_model
from tquant.modules import QuipLinear


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def random_quip(linear: torch.nn.Linear, bits: int, g: torch.Generator) -> QuipLinear:
    mod = QuipLinear(linear.in_features, linear.out_features, bits=bits, bias=linear.bias is not None,
                     dtype=linear.weight.dtype)
    mod.codes.copy_(torch.randint(-(1 << 15), 1 << 15, mod.codes.shape, generator=g))
    mod.codes2.copy_(torch.randint(-(1 << 15), 1 << 15, mod.codes2.shape, generator=g))
    mod.su.copy_(torch.randn(mod.in_features, generator=g).sign())
    mod.sv.copy_(torch.randn(mod.out_features, generator=g).sign() * linear.weight.detach().square().mean().sqrt())
    return mod


def saved_bytes(model, ids, teacher) -> None:
    sizes = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, use_cache=False).logits
        blocks = sum(sizes.values())
        topk_kl(logits, *teacher)
    print(f"kept for the backward of 1 x {ids.shape[1]} tokens: {blocks / 2**20:.0f} MiB in the model, "
          f"{(sum(sizes.values()) - blocks) / 2**20:.0f} MiB more for the loss")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n-samples", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--saved", action="store_true", help="only the bytes kept for the backward of one window")
    p.add_argument("--order", choices=("dense", "transforms"), default="dense",
                   help="the e2e stage's evaluation order (quip# e2e_dense=True / False)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model("default")
    calib = calibration_data("pydoc", tok, n_samples=a.n_samples, seqlen=512, seed=0)
    print(f"float model loaded: peak RSS {peak_gib():.2f} GiB")
    if a.saved:
        calib = calib[:1]
    start = time.monotonic()
    teacher = teacher_topk(model, calib, a.topk, a.batch)
    print(f"teacher top-{a.topk} over {calib.shape[0]} x 512 tokens: {time.monotonic() - start:.1f} s, "
          f"{sum(t.numel() * t.element_size() for t in teacher) / 2**20:.1f} MiB")
    g = torch.Generator().manual_seed(0)
    blocks_name, blocks = find_blocks(model)
    for block in blocks:
        for name, mod in list(block.named_modules()):
            if isinstance(mod, torch.nn.Linear):
                block.set_submodule(name, random_quip(mod, 4, g))
    layers = [m for m in model.modules() if isinstance(m, QuipLinear)]
    start = time.monotonic()
    with end_to_end_parameters(model, dense=a.order == "dense") as (signs, others):
        entry = time.monotonic() - start
        groups = [{"params": signs, "lr": 5e-4}, {"params": others, "lr": 5e-5}]
        with float32_training(model, signs + others):
            if a.saved:
                return saved_bytes(model, calib, teacher)
            start = time.monotonic()
            distill_logits(model, groups, calib, teacher, steps=a.steps, batch=a.batch, checks=1)
            total = time.monotonic() - start
            start = time.monotonic()
            kl_error(model, calib, teacher, a.batch)
            check = time.monotonic() - start
    # distill_logits ran two checks (before and after) besides the steps
    print(f"{len(layers)} QuipLinear, {sum(p.numel() for p in signs)} sign entries, {sum(p.numel() for p in others)} "
          f"float values tuned; {a.threads} thread(s); {a.order} order (entering it: {entry:.1f} s)")
    print(f"one KL check over {a.n_samples} windows: {check:.1f} s; one step of {a.batch} x 512 tokens: "
          f"{(total - 2 * check) / a.steps:.1f} s; peak RSS {peak_gib():.2f} GiB")


if __name__ == "__main__":
    main()

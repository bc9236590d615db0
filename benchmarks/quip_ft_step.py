"""Time of one QuIP# per-block fine-tuning step on the CPU: QuipLinear.trainable(dense=True) (the held rotated-back
weight, what QuipSharp.finish_block uses) against trainable() (the Hadamard transforms, checkpointed).

    python benchmarks/quip_ft_step.py [--threads 1] [--steps 4] [--block 0] [--bits 4]

Block `--block` of the offline SmolLM2-135M, float32, every linear a QuipLinear of random codes (the step's work does
not depend on the codes' values), 4 sequences x 512 tokens a step (ft_batch 4), Adam on su, sv (lr 5e-4) and the
norms (5e-5) against a random target; the two orders' outputs are compared too.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch import nn

from tquant.calib.block_io import hidden
from tquant.calib.block_tuning import float32_training
from tquant.formats.weights import LatticeWeight
from tquant.methods.quip_sharp import tuning_module
from tquant.models import load_model


class _Stop(Exception):
    pass


def block_inputs(model, block, ids):
    """(args, kwargs) the block receives for token ids."""
    seen = {}

    def hook(module, args, kwargs):
        seen["call"] = (args, kwargs)
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["call"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--block", type=int, default=0)
    p.add_argument("--bits", type=int, default=4)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, _ = load_model("default")
    block = model.model.layers[a.block]
    g = torch.Generator().manual_seed(0)
    args, kwargs = block_inputs(model, block, torch.randint(0, model.config.vocab_size, (4, 512), generator=g))
    target = torch.randn(args[0].shape, generator=g)
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    results = {}
    for n, lin in linears.items():
        rows, k = lin.weight.shape
        codes = torch.randint(0, 1 << 16, (rows, k // 8, 1 if a.bits == 2 else 2), generator=g)
        if a.bits == 3:
            codes[..., 1] %= 256
        scale = lin.weight.detach().square().mean().sqrt()
        results[n] = LatticeWeight(codes, torch.randn(k, generator=g).sign(),
                                   torch.randn(rows, generator=g).sign() * scale, a.bits)
    outputs, start_state = {}, {k: v.clone() for k, v in block.state_dict().items()}
    for dense in (True, False):
        block.load_state_dict(start_state)  # both from the same norms
        with contextlib.ExitStack() as stack:
            mods = {n: tuning_module(linears[n], qw) for n, qw in results.items()}
            for n, mod in mods.items():
                block.set_submodule(n, mod)
                stack.callback(block.set_submodule, n, linears[n])
                stack.enter_context(mod.trainable(dense=dense))
            signs = [p for mod in mods.values() for p in (mod.su, mod.sv)]
            others = [p for p in block.parameters() if p.is_floating_point() and all(p is not s for s in signs)]
            opt = torch.optim.Adam([{"params": signs, "lr": 5e-4}, {"params": others, "lr": 5e-5}])
            times = []
            with float32_training(block, signs + others):
                with torch.no_grad():
                    outputs[dense] = hidden(block(*args, **kwargs))
                for _ in range(a.steps):
                    start = time.perf_counter()
                    loss = torch.nn.functional.mse_loss(hidden(block(*args, **kwargs)), target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    times.append(time.perf_counter() - start)
        times.sort()
        print(f"trainable(dense={dense}): {times[len(times) // 2]:.2f} s a step (median of {a.steps}; "
              f"{', '.join(f'{t:.2f}' for t in times)})", flush=True)
    diff = (outputs[True] - outputs[False]).abs().max() / outputs[False].abs().max()
    print(f"block output, dense vs transforms: max |difference| / max |output| = {diff:.2e}")


if __name__ == "__main__":
    main()

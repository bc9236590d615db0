"""Checkpoints written by an earlier tquant (tests/fixtures/make_checkpoints.py) still load as saved: the same
logits and the same greedy tokens as the model that was saved, for every module type. The logits were written on
another machine: they are bit-identical where this CPU's BLAS sums in the same order, and otherwise within float32
summation order (an AVX-512 AMD EPYC gives the MoE fixture 9.5e-7 off on logits up to 3.0); a wrong module, tensor or
layout is off by orders of magnitude more."""
import os

import pytest
import torch

import tquant

ROOT = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoints")
NAMES = sorted(os.listdir(ROOT))


def test_every_module_type_has_a_fixture():
    types = set()
    for name in NAMES:
        qc = tquant.load(os.path.join(ROOT, name)).config.quantization_config
        types |= {spec["type"] for spec in qc["layers"].values()} | ({"kv_cache"} if "kv_cache" in qc else set())
    from tquant.modules import spec_types
    assert types == set(spec_types()) | {"kv_cache"}


@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoint_loads_bit_identically(name):
    path = os.path.join(ROOT, name)
    expected = torch.load(os.path.join(path, "expected.pt"))
    model = tquant.load(path)
    with torch.no_grad():
        logits = model(expected["probe"]).logits
        generated = model.generate(expected["probe"][:1, :8], max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=4e-6 * expected["logits"].abs().max().item())
    assert torch.equal(generated, expected["generated"])

"""Issue 28's architectures x methods through the public API: quantize on a tiny calibration batch, save, load, the
same logits bit for bit, generate. Mixtral / Qwen3-MoE under rtn and gptq quantize every expert (tests/test_moe.py
for the experts themselves). Each tiny model is built offline from transformers' own config classes
(tests/tiny_models.py). The default tier runs RTN 8-bit (the cheap check that the driver feeds every block its own
inputs: an 8-bit model's logits stay close to float's) and GPTQ 4-bit on each architecture; the other methods are
marked slow. Combinations tquant does not support assert a clear ValueError naming the model type.

python tests/test_architectures.py prints the works / error table (README's "Architectures")."""
from __future__ import annotations

import copy

import pytest
import torch

import tquant
from tquant.calib.block_io import hidden
from tquant.driver import capture_all_block_inputs
from tquant.models import find_blocks
from tests.tiny_models import tiny_model, token_batch

# label: tiny_models arch (Qwen2.5 is transformers' qwen2 model type)
ARCHITECTURES = {"Llama 3.x": "llama3", "Qwen2.5": "qwen2", "Qwen3": "qwen3", "Mistral": "mistral",
                 "Gemma-2": "gemma2", "Gemma-3": "gemma3", "Phi-3": "phi3", "Mixtral": "mixtral",
                 "Qwen3-MoE": "qwen3_moe"}
MOE = {"mixtral", "qwen3_moe"}
METHODS = {  # label: (method, options)
    "rtn 8-bit": ("rtn", dict(bits=8, group_size=32)),
    "gptq 4-bit": ("gptq", dict(bits=4, group_size=32)),
    "qqq": ("qqq", dict(group_size=32, smooth_grid=4, search_samples=2)),
    "smoothquant": ("smoothquant", {}),
    "quip# 2-bit": ("quip#", dict(scale_grid="", scale_rows=32)),
    "kivi": ("kivi", dict(kv_bits=4, group_size=16, residual=16)),
}
FAST = {"rtn 8-bit", "gptq 4-bit"}
MOE_METHODS = {"rtn", "gptq", "kivi"}  # what works on fused experts (weight methods: tests/test_moe.py)
CALIB = token_batch(4, 32)


def expected_error(arch: str, method: str) -> str | None:
    """The start of the ValueError a combination gives, or None where it works."""
    if arch in MOE and method not in MOE_METHODS:
        return f"model type '{arch}' is not supported by the weight method '{method}' on its mixture-of-experts experts"
    return None


def run(arch: str, method_label: str, tmp_path) -> torch.Tensor:
    """Quantize, save, load and generate; returns the float-vs-quantized relative logits error."""
    method, options = METHODS[method_label]
    model = tiny_model(arch)
    ids = token_batch(2, 24, seed=5)
    with torch.no_grad():
        fp = model(ids).logits
    calib = None if method == "rtn" else CALIB
    tquant.quantize(model, method, calib=calib, batch_size=2, progress=False, **options)
    with torch.no_grad():
        out = model(ids).logits
    tquant.save(model, str(tmp_path / "q"))
    loaded = tquant.load(str(tmp_path / "q"))
    with torch.no_grad():
        again = loaded(ids).logits
    assert torch.equal(out, again), f"{arch} / {method_label}: logits changed after save / load"
    gen = loaded.generate(ids[:1, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 12)
    return ((out - fp).norm() / fp.norm()).item()


CASES = [pytest.param(a, m, marks=(() if m in FAST else (pytest.mark.slow,)), id=f"{a}-{m}")
         for a in ARCHITECTURES.values() for m in METHODS]


@pytest.mark.parametrize("arch, method", CASES)
def test_architecture_method(arch, method, tmp_path):
    error = expected_error(arch, METHODS[method][0])
    if error is not None:
        with pytest.raises(ValueError, match=error.replace("(", r"\(")):
            run(arch, method, tmp_path)
        return
    err = run(arch, method, tmp_path)
    if method == "rtn 8-bit":  # a block fed another block's mask or rotary table shows as a large error
        assert err < 0.02, f"{arch}: 8-bit logits {err:.3f} away from float"


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES.values() if a not in MOE])
def test_blocks_replayed_alone_give_the_models_outputs(arch):
    """Each block run by itself on the driver's captured inputs (its own mask and rotary table) gives what it
    gives inside the model's forward: Gemma-2/3's full-attention block fed block 0's sliding mask did not."""
    model = tiny_model(arch)
    name, blocks = find_blocks(model)
    first, per_block = capture_all_block_inputs(model, name, blocks, CALIB, "cpu", 2)
    seen = {}
    handles = [b.register_forward_hook(lambda m, i, o, j=j: seen.__setitem__(j, hidden(o))) for j, b in enumerate(blocks)]
    with torch.no_grad():
        model(CALIB)
        for h in handles:
            h.remove()
        states = [args[0] for args, _ in first]
        for i, block in enumerate(blocks):
            states = [hidden(block(h, *rest, **kwargs)) for h, (rest, kwargs) in zip(states, per_block[i])]
            torch.testing.assert_close(torch.cat(states), seen[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mistral", "gemma3", pytest.param("llama3", marks=pytest.mark.slow),
                                  pytest.param("phi3", marks=pytest.mark.slow),
                                  pytest.param("mixtral", marks=pytest.mark.slow)])
def test_kivi_8bit_decode_follows_float_past_the_sliding_window(arch):
    """Generating 24 tokens past an 8-token prompt (beyond Mistral's window of 16 and Gemma-3's 8) with an 8-bit KIVI
    cache and no full-precision residual stays within 1% of the float model's step logits."""
    model = tiny_model(arch)
    prompt = token_batch(1, 8, seed=5)
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        ref = torch.stack(model.generate(prompt, **kwargs).logits)
        tquant.quantize(model, "kivi", kv_bits=8, group_size=16, residual=0)
        out = torch.stack(model.generate(prompt, **kwargs).logits)
    assert ((out - ref).norm() / ref.norm()).item() < 0.01


@pytest.mark.parametrize("arch", sorted(MOE))
def test_moe_weight_methods_refused_naming_the_experts(arch):
    """Methods whose block-level steps would miss the fused experts (here SmoothQuant's smoothing and activation
    quantization) are refused before anything changes, naming the model type and the method."""
    model = tiny_model(arch)
    with pytest.raises(ValueError, match=rf"model type '{arch}'.*'smoothquant' on its mixture-of-experts experts"):
        tquant.quantize(model, "smoothquant", calib=CALIB, batch_size=2)
    assert not any(isinstance(m, tquant.modules.QuantizedLinear) for m in model.modules())  # nothing half-done


def table() -> str:
    """The works / error markdown table of every architecture x method, run here."""
    import tempfile
    from pathlib import Path

    rows = ["| architecture | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for label, arch in ARCHITECTURES.items():
        cells = []
        for m in METHODS:
            try:
                with tempfile.TemporaryDirectory() as d:
                    err = run(arch, m, Path(d))
                cells.append(f"works ({err:.3f})")
            except ValueError as e:
                cells.append("error: " + str(e).split(":")[0])
            except Exception as e:  # noqa: BLE001 - the table records what breaks
                cells.append(f"FAILS: {type(e).__name__}: {str(e)[:60]}")
            print(label, m, cells[-1], flush=True)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())

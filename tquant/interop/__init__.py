"""Interoperation with the formats serving engines and the hub use (docs/interop.md).

    tquant.export(model_or_dir, out, format="compressed-tensors" | "gptq" | "awq")   tquant's PackedLinear layers ->
                                    compressed-tensors pack-quantized (vLLM / SGLang), GPTQ v1 / v2 or AWQ (GEMM); W8A8
                                    ActQuantLinear layers (SmoothQuant, ZeroQuant) -> compressed-tensors int-quantized;
                                    FP8Linear (fp8) -> float-quantized (W8A8) / naive-quantized (weight-only FP8)
    tquant.load(dir)                also reads compressed-tensors pack-quantized / int-quantized, GPTQ v1 / v2 and AWQ
                                    (GEMM) checkpoints (tquant.interop.loader), into PackedLinear / ActQuantLinear /
                                    FP8Linear (compressed-tensors FP8 weights)
                                    without dequantizing
    tquant.load("org/name")         any of these by hub id, from the hub's cache or downloaded into it (hub.py)

One file per outside format (compressed_tensors.py, gptq.py, awq.py), their shared helpers in common.py, the
exported folder's writing in writer.py, hub ids in hub.py.
"""
from __future__ import annotations

FORMATS = ("compressed-tensors", "gptq", "awq")

# the method (quantization_config.method, else the module) -> what to do instead, for layers with no outside format
_NO_FORMAT = {
    "quip_linear": "QuIP# (E8P lattice codes in a Hadamard basis)",
    "bcq_linear": "BCQ (binary-coding planes)",
    "spqr_linear": "SpQR (outliers in a sparse matrix)",
    "bitplane_linear": "ABQ-LLM (bit-plane WpAq weights)",
    "act_quant_linear": "weight-and-activation quantization (ActQuantLinear: W8A8 / W4A8 / W4A4)",
    "fp8_linear": "float8 e4m3 weights (FP8Linear)",
    "packed_embedding": "quantized embeddings",
    "packed_experts": "mixture-of-experts weights (PackedExperts: every expert's codes stacked in one tensor)",
}
INSTEAD = ("no serving engine reads this layout. Quantize the float model with gptq or rtn (bits 2/3/4/8, "
           "weight-only) and export that, or serve the float model")


def _quantized_layers(model, format: str):
    """{name: PackedLinear, or ActQuantLinear for compressed-tensors (int-quantized W8A8)} of a tquant model, or
    ValueError naming the method when a layer has no outside format."""
    from ..config import read_quantization_config
    from ..modules.act_quant_linear import ActQuantLinear
    from ..modules.base import QuantizedLinear
    from ..modules.fp8_linear import FP8Linear
    from ..modules.packed_linear import PackedLinear

    qc = read_quantization_config(model.config)
    method = qc.get("method")
    if qc.get("kv_cache"):
        kv = qc["kv_cache"].get("method")
        raise ValueError(f"this model carries tquant's {kv!r} KV-cache quantization, which no export format holds "
                         "(vLLM / SGLang quantize their own cache: --kv-cache-dtype fp8). Export the weight-only "
                         "model, quantized without the KV method")
    layers = {}
    for name, mod in model.named_modules():
        if type(mod) is PackedLinear or (type(mod) in (ActQuantLinear, FP8Linear) and format == "compressed-tensors"):
            layers[name] = mod
        elif isinstance(mod, QuantizedLinear) or getattr(mod, "spec_type", None) in _NO_FORMAT:
            what = _NO_FORMAT.get(getattr(mod, "spec_type", ""), type(mod).__name__)
            if getattr(mod, "spec_type", "") == "fp8_linear":
                why = ("GPTQ and AWQ hold integer weights. Export with --format compressed-tensors (float-quantized "
                       "FP8, which vLLM serves)")
            elif getattr(mod, "spec_type", "") == "act_quant_linear":
                why = ("GPTQ holds weight-only layers. Export with --format compressed-tensors (int-quantized W8A8), "
                       "or quantize the float model with gptq or rtn (weight-only) and export that")
            else:
                why = INSTEAD
            raise ValueError(f"method {method!r} stores {name} as {type(mod).__name__}, {what}: {why}")
    if not layers:
        raise ValueError("the model has no quantized linear layer to export")
    return layers


def export(model_or_dir, out: str, format: str = "compressed-tensors", *, gptq_format: str = "gptq",
           overwrite: bool = False, max_shard_size="5GB", check_tp=(), revision: str | None = None) -> str:
    """Write a tquant model (or a checkpoint tquant.load reads: a folder, or a hub id at `revision`) to folder `out`
    in `format`: "compressed-tensors" (pack-quantized W4A16 / W8A16, int-quantized W8A8; for vLLM / SGLang /
    transformers), "gptq" (gptq_format "gptq" = v1, "gptq_v2" = v2) or "awq" (AutoAWQ's GEMM layout: 4-bit, no act
    order), as one model.safetensors or, past max_shard_size ("5GB", "500MB", bytes; None: one file), transformers'
    shards and index. check_tp=(2, 4, 8) (or "2,4,8"): first check every layer splits over each tensor-parallel
    degree as vLLM splits it, into shards its kernels take (tquant.interop.tp), else ValueError naming the layer, the
    degree and the size, and nothing is written. Returns out."""
    import os

    from . import awq, compressed_tensors, gptq, tp
    from .hub import checkpoint_folder
    from .writer import write_checkpoint

    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    degrees = tp.parse_degrees(check_tp) if check_tp else ()
    if degrees and format == "awq":
        raise ValueError("check_tp has no rules for the awq format yet; check with format='compressed-tensors'")
    source = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        from ..serialization import load

        source = checkpoint_folder(model_or_dir, revision)  # the folder whose tokenizer the export copies
        model = load(source)
    elif revision is not None:
        raise ValueError(f"revision={revision!r} selects a version of a hub id, but export was given a model: pass "
                         "the hub id, or the model without revision=")
    else:
        model = model_or_dir
    layers = _quantized_layers(model, format)
    if degrees:
        tp.require(model, layers, degrees, format)
    extra = {}
    if format == "compressed-tensors":
        config, tensors = compressed_tensors.export(model, layers)
    elif format == "awq":
        config, tensors = awq.export(model, layers)
    else:
        config, tensors, extra = gptq.export(model, layers, gptq_format)
    write_checkpoint(out, config, tensors, source, extra, overwrite=overwrite, max_shard_size=max_shard_size)
    return out

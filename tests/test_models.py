"""tquant.models.load_model's dtype: the checkpoint's own by default (transformers' dtype="auto"), a cast on request,
and the one log line saying which."""
import logging

import pytest
import torch

from tests.tiny_models import byte_tokenizer, tiny_model
from tquant.models import DTYPE_NAMES, load_model, resolve_dtype


def param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def saved_in(path, dtype):
    """A tiny random Llama saved in dtype (config.json's dtype says so) with the byte tokenizer; returns path."""
    tiny_model("llama").to(dtype).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_model_keeps_the_checkpoint_dtype(dtype, tmp_path, caplog):
    path = saved_in(tmp_path / "m", dtype)
    with caplog.at_level(logging.INFO, logger="tquant"):
        model, tok = load_model(path)
    assert {p.dtype for p in model.parameters()} == {dtype}
    # transformers keeps the rotary table in float32 in a half model; load_model leaves it so
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    name = str(dtype).removeprefix("torch.")
    assert [r.getMessage() for r in caplog.records if r.name == "tquant"] == \
        [f"loaded {path} in {name} (the checkpoint's own dtype)"]
    with torch.no_grad():
        logits = model(tok("hello", return_tensors="pt").input_ids).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_load_model_casts_on_request(tmp_path, caplog):
    """An explicit dtype (torch.dtype or name) still wins: float32 doubles the bytes of the bf16 checkpoint."""
    path = saved_in(tmp_path / "m", torch.bfloat16)
    half, _ = load_model(path)
    with caplog.at_level(logging.INFO, logger="tquant"):
        for dtype in (torch.float32, "float32", "fp32"):
            model, _ = load_model(path, dtype=dtype)
            assert {p.dtype for p in model.parameters()} == {torch.float32}
            assert param_bytes(model) == 2 * param_bytes(half)
    assert caplog.records[-1].getMessage() == f"loaded {path} in float32 (as asked)"
    model, _ = load_model(saved_in(tmp_path / "f", torch.float32), dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_resolve_dtype():
    assert resolve_dtype("auto") == "auto"
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    assert resolve_dtype("torch.float16") is resolve_dtype("fp16") is resolve_dtype("half") is torch.float16
    assert set(DTYPE_NAMES.values()) == {torch.float32, torch.bfloat16, torch.float16}
    for bad in ("int8", torch.int8, "float", None):
        with pytest.raises(ValueError, match="dtype must be"):
            resolve_dtype(bad)


@pytest.mark.slow
def test_the_default_gguf_model_loads_in_float32(caplog):
    """A .gguf file records no torch dtype: transformers' "auto" de-quantizes it to torch's default, float32 (so the
    README's float32 tables of the default model need no --dtype)."""
    with caplog.at_level(logging.INFO, logger="tquant"):
        model, _ = load_model("default")
    assert next(model.parameters()).dtype == torch.float32
    assert caplog.records[-1].getMessage().endswith("in float32 (a GGUF file records no torch dtype: de-quantized to "
                                                    "torch's default)")

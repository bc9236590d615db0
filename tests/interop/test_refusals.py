"""Models with no outside format are refused by tquant.export with the method's name and what to do instead
(W8A8's refusals: tests/interop/test_int8_compressed_tensors.py)."""
import os
import re

import pytest

import tquant
from tests.interop.helpers import quantized


NO_FORMAT = {  # the methods with no outside format: method -> (options, what the error calls its layout)
    "bcq": (dict(bits=3, group_size=32), "BCQ"),
    "spqr": (dict(bits=3, group_size=32), "SpQR"),
    "quip#": (dict(bits=2, group_size=-1), "QuIP#"),
    "abq": (dict(bits=4, group_size=32), "ABQ-LLM"),
}


@pytest.fixture(scope="module")
def no_format_model():
    """{method: its quantized tiny model}, each quantized once (an export refusal leaves the model as it was)."""
    made = {}

    def get(method):
        if method not in made:
            made[method] = quantized(method=method, **NO_FORMAT[method][0])
        return made[method]
    return get


@pytest.mark.parametrize("method", list(NO_FORMAT))
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "awq"])
def test_methods_without_an_outside_format_are_refused(tmp_path, no_format_model, method, fmt):
    model, what = no_format_model(method), re.escape(NO_FORMAT[method][1])
    with pytest.raises(ValueError, match=rf"method '{re.escape(method)}' stores .* as \w+Linear.*{what}.*Quantize the "
                                         r"float model with gptq or rtn"):
        tquant.export(model, str(tmp_path), format=fmt)
    assert not os.listdir(tmp_path)


def test_kv_cache_methods_are_refused(tmp_path):
    model = quantized(bits=4, group_size=32)
    tquant.quantize(model, "kivi", kv_bits=2, group_size=16, progress=False)
    with pytest.raises(ValueError, match=r"'kivi' KV-cache quantization.*--kv-cache-dtype fp8"):
        tquant.export(model, str(tmp_path), format="compressed-tensors")


def test_unknown_format_and_non_tquant_models(tmp_path):
    model = quantized(bits=4, group_size=32)
    with pytest.raises(ValueError, match="unknown export format 'exl2'"):
        tquant.export(model, str(tmp_path), format="exl2")
    from tests.tiny_models import tiny_model
    with pytest.raises(ValueError, match="no tquant quantization_config"):
        tquant.export(tiny_model("llama"), str(tmp_path), format="gptq")

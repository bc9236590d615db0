"""Models with no outside format are refused by tquant.export with the method's name and what to do instead
(W8A8's refusals: tests/interop/test_int8_compressed_tensors.py)."""
import os

import pytest

import tquant
from tests.interop.helpers import quantized


@pytest.mark.parametrize("method,opts,what", [
    ("bcq", dict(bits=3, group_size=32), "BCQ"),
    ("spqr", dict(bits=3, group_size=32), "SpQR"),
])
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_methods_without_an_outside_format_are_refused(tmp_path, method, opts, what, fmt):
    model = quantized(method=method, **opts)
    with pytest.raises(ValueError, match=rf"method '{method}' stores .* as \w+Linear.*{what}.*Quantize the float "
                                         r"model with gptq or rtn"):
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

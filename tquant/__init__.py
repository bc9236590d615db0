"""tquant: Triton-first LLM quantization.

    import tquant
    qmodel = tquant.quantize(model, "gptq", bits=4, group_size=64, calib="pydoc", tokenizer=tok)
    tquant.save(qmodel, "out/")
    qmodel = tquant.load("out/")
    tquant.quantize(qmodel, "kivi", kv_bits=2)   # and a 2-bit KV cache in generate()
    tquant.StaticDecoder(qmodel, batch=1, max_len=2048).generate(ids, 128)   # static cache, CUDA-graph steps
"""
__version__ = "0.1.0"

from .api import quantize  # noqa: E402
from .decode import StaticDecoder  # noqa: E402
from .kv.hook import kv_cache  # noqa: E402
from .methods import available_methods as methods  # noqa: E402
from .serialization import load, save  # noqa: E402

__all__ = ["quantize", "kv_cache", "methods", "save", "load", "StaticDecoder"]

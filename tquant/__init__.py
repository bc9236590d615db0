"""tquant: Triton-first LLM quantization.

    import tquant
    qmodel = tquant.quantize(model, "gptq", bits=4, group_size=64, calib="pydoc", tokenizer=tok)
    tquant.save(qmodel, "out/")
    qmodel = tquant.load("out/")
    tquant.quantize(qmodel, "kivi", kv_bits=2)   # and a 2-bit KV cache in generate()
    tquant.StaticDecoder(qmodel, batch=1, max_len=2048).generate(ids, 128)   # static cache, CUDA-graph steps
"""
from .api import quantize
from .decode import StaticDecoder
from .kv.hook import kv_cache
from .methods import available_methods as methods
from .serialization import load, save
from .version import __version__

__all__ = ["__version__", "quantize", "kv_cache", "methods", "save", "load", "StaticDecoder"]

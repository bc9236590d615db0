"""tquant: Triton-first LLM quantization.

    import tquant
    qmodel = tquant.quantize(model, "gptq", bits=4, group_size=64, calib="pydoc", tokenizer=tok)
    tquant.save(qmodel, "out/")
    qmodel = tquant.load("out/")                 # also compressed-tensors, GPTQ and AWQ checkpoints
    tquant.export(qmodel, "ct/", format="compressed-tensors")   # or "gptq": for vLLM / SGLang
    tquant.quantize(qmodel, "kivi", kv_bits=2)   # and a 2-bit KV cache in generate()
    tquant.StaticDecoder(qmodel, batch=1, max_len=2048).generate(ids, 128)   # static cache, CUDA-graph steps

The public names are imported on first use (PEP 562): `import tquant` alone loads neither torch, transformers
nor triton, so the `tquant` command answers --help and argument errors at once.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from .version import __version__

_LAZY = {  # public name: (module, attribute)
    "quantize": (".api", "quantize"),
    "StaticDecoder": (".decode", "StaticDecoder"),
    "kv_cache": (".kv.hook", "kv_cache"),
    "save": (".serialization", "save"),
    "load": (".serialization", "load"),
    "export": (".interop", "export"),
}

__all__ = ["__version__", "quantize", "kv_cache", "methods", "save", "load", "export", "StaticDecoder"]


def methods() -> dict[str, dict[str, str]]:
    """{method name: {option: description with default}} of every registered method."""
    from .methods import available_methods  # importing the package registers every method

    return available_methods()


def __getattr__(name: str):
    """A public name (imported now, then kept), or a subpackage not imported yet (tquant.kernels, ...)."""
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module, __name__), attr)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """tquant's module type. The import system sets each subpackage it loads as an attribute of its parent;
    `tquant.methods` stays the listing function above when the tquant.methods package loads."""

    def __setattr__(self, name, value):
        if name == "methods" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

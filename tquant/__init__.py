"""tquant: Triton-first LLM quantization.

    import tquant
    qmodel = tquant.quantize(model, "gptq", bits=4, group_size=64, calib="pydoc", tokenizer=tok)
    tquant.save(qmodel, "out/")
    tquant.quantize_to_disk("llama-70b/", "out/", "gptq", bits=4, calib=ids)   # block by block from its shards
    qmodel = tquant.load("out/")                 # also compressed-tensors, GPTQ and AWQ checkpoints
    qmodel = tquant.from_pretrained("org/name", revision="main")   # = tquant.load: a hub id, from the hub's cache
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
    "quantize_to_disk": (".streaming", "quantize_to_disk"),
    "StaticDecoder": (".decode", "StaticDecoder"),
    "kv_cache": (".kv.hook", "kv_cache"),
    "save": (".serialization", "save"),
    "load": (".serialization", "load"),
    "from_pretrained": (".serialization", "load"),  # the same loader under transformers' name (hub ids too)
    "export": (".interop", "export"),
}

__all__ = ["__version__", "quantize", "quantize_to_disk", "kv_cache", "methods", "save", "load", "from_pretrained",
           "export", "StaticDecoder"]


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


# transformers' from_pretrained for tquant checkpoints (tquant.interop.hf_quantizer registers quant_method "tquant").
# Importing transformers here would cost seconds, so the registration waits for transformers to import its quantizer
# registry (it does before any from_pretrained): a finder on sys.meta_path that only answers for that module, lets
# the other finders find it and registers once it has run. Registered at once when transformers came first.
_HF_REGISTRY = "transformers.quantizers.auto"


def _register_with_transformers() -> None:
    try:
        importlib.import_module(".interop.hf_quantizer", __name__)
    except Exception as err:  # never break the import of transformers that brought us here
        import warnings

        warnings.warn(f"tquant could not register its transformers quantizer ({type(err).__name__}: {err}); load "
                      "tquant checkpoints with tquant.load", stacklevel=2)


class _RegisterAfter:
    """The loader of transformers.quantizers.auto, registering tquant's quantizer once the module has run."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if _TransformersHook in sys.meta_path:
            sys.meta_path.remove(_TransformersHook)
        _register_with_transformers()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _TransformersHook:
    """A sys.meta_path finder for transformers.quantizers.auto only (it leaves sys.meta_path once that has run)."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != _HF_REGISTRY:
            return None
        for finder in list(sys.meta_path):
            if finder is cls:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfter(spec.loader)
                return spec
        return None


if _HF_REGISTRY in sys.modules:
    _register_with_transformers()
elif _TransformersHook not in sys.meta_path:
    sys.meta_path.insert(0, _TransformersHook)

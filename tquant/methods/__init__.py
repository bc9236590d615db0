"""Quantization methods. Importing this package registers every method by name."""
from .base import LayerState, Method, available_methods, get_method, register
from . import abq, awq, bcq, fp8, fp8_kv, gptq, kivi, kvquant, qoq, qoq_kv, qqq, quip_sharp, rtn, smoothquant, spqr, zeroquant  # noqa: F401  (registration)
from .kv_base import KVCacheMethod

__all__ = ["KVCacheMethod", "LayerState", "Method", "available_methods", "get_method", "register"]

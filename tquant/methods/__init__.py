"""Quantization methods. Importing this package registers every method by name."""
from .base import LayerState, Method, available_methods, get_method, register
from . import gptq, qqq, quip_sharp, rtn, smoothquant, zeroquant  # noqa: F401  (registration)

__all__ = ["LayerState", "Method", "available_methods", "get_method", "register"]

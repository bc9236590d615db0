"""Quantization methods. Importing this package registers every method by name."""
from .base import LayerState, Method, available_methods, get_method, register
from . import abq
from . import bcq
from . import gptq
from . import kivi
from . import kvquant
from . import qoq
from . import qoq_kv
from . import qqq
from . import quip_sharp
from . import rtn
from . import smoothquant
from . import spqr
from . import zeroquant
from .kv_base import KVCacheMethod

__all__ = ["KVCacheMethod", "LayerState", "Method", "available_methods", "get_method", "register"]

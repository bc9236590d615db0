"""QuantizedLinear: the base of every nn.Linear replacement, and the registry from weight type and spec type to module.

A subclass declares what it stores; the base writes the rest once:
    in_features, out_features    K and N: y [..., N] = f(x [..., K])
    backend                      "auto" / "triton" / "torch" (tquant.modules.backend.use_kernel)
    perm    int32 [K] or absent  storage column k holds input channel perm[k] (act-order, QoQ's reordering)
    bias    [N] or absent        in the model's dtype
    layer_spec()                 {"type": spec_type, then spec_fields in order} (saved in quantization_config)
    from_spec(spec, dtype)       the module with those fields, its buffers on the meta device (tquant.load)
    extra_repr()                 in_features, out_features and the other spec fields
    forward(x)                   x [..., K] -> _matmul(x2 [M, K], kernel) [M, N] -> [..., N]
Class keywords of a subclass: `class PackedLinear(QuantizedLinear, spec_type="packed_linear",
weight_type=QuantizedWeight)` registers it under its spec type (load) and the weight class it stores (quantize).

Registry: module_for_spec(spec) -> the class that from_spec rebuilds a saved layer with (linear or not: PackedEmbedding
registers by spec type alone, through `register`); module_for_weight(qw) -> the QuantizedLinear class storing a
method's weight, looked up along type(qw)'s MRO (BitPlaneWeight before its base QuantizedWeight). Several classes
may store one weight class; each one's `stores(qw)` says which weights it takes, and exactly one must. The one
such split: a QuantizedWeight goes to PackedLinear when weight-only (act_bits None), to ActQuantLinear when it
quantizes activations.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .backend import use_kernel

_BY_SPEC: dict[str, type[nn.Module]] = {}
_BY_WEIGHT: dict[type, list[type["QuantizedLinear"]]] = {}


def register(spec_type: str, *weight_types: type):
    """Class decorator: `cls` rebuilds layers saved with spec type `spec_type` (and stores weights of weight_types)."""
    def add(cls):
        if _BY_SPEC.get(spec_type, cls) is not cls:
            raise ValueError(f"spec type {spec_type!r} is taken by {_BY_SPEC[spec_type].__name__}")
        _BY_SPEC[spec_type] = cls
        cls.spec_type = spec_type
        for wt in weight_types:
            _BY_WEIGHT.setdefault(wt, []).append(cls)
        return cls
    return add


def spec_types() -> tuple[str, ...]:
    """Every registered spec type (the "type" of a saved layer)."""
    return tuple(_BY_SPEC)


def module_for_spec(spec: dict) -> type[nn.Module]:
    """The module class that rebuilds a saved layer spec ({"type": ..., fields}); ValueError for an unknown type."""
    try:
        return _BY_SPEC[spec["type"]]
    except KeyError:
        raise ValueError(f"unknown module type {spec['type']!r} (known: {', '.join(_BY_SPEC)})") from None


def module_for_weight(qw) -> type["QuantizedLinear"]:
    """The QuantizedLinear class that stores method weight qw: the nearest class in type(qw)'s MRO with modules
    registered, then the one of those whose stores(qw) holds (QuantizedWeight: PackedLinear for act_bits None,
    ActQuantLinear otherwise)."""
    for wt in type(qw).__mro__:
        if wt in _BY_WEIGHT:
            found = [cls for cls in _BY_WEIGHT[wt] if cls.stores(qw)]
            if len(found) != 1:
                raise TypeError(f"{len(found)} modules store this {wt.__name__} "
                                f"({', '.join(c.__name__ for c in found) or 'none'})")
            return found[0]
    raise TypeError(f"no quantized module stores a {type(qw).__name__}")


def linear_module(qw, bias: torch.Tensor | None, dtype: torch.dtype) -> "QuantizedLinear":
    """The module storing a method's weight qw (module_for_weight) with the layer's bias, in dtype."""
    return module_for_weight(qw).from_quantized(qw, bias, dtype)


class QuantizedLinear(nn.Module):
    spec_type: ClassVar[str]
    spec_fields: ClassVar[tuple[str, ...]]  # layer_spec's keys after "type", in order (saved configs hold them)
    spec_defaults: ClassVar[dict] = {}  # fields that older checkpoints lack, and the value they meant
    perm_field: ClassVar[str | None] = "has_perm"  # the spec / constructor key saying perm exists; None: no perm
    buffer_flags: ClassVar[dict[str, str]] = {}  # other spec keys saying whether an optional buffer (value) exists

    def __init_subclass__(cls, spec_type: str | None = None, weight_type: type | tuple[type, ...] = (), **kw):
        super().__init_subclass__(**kw)
        if spec_type is not None:
            register(spec_type, *(weight_type if isinstance(weight_type, tuple) else (weight_type,)))(cls)

    def __init__(self, in_features: int, out_features: int, *, bias: bool, perm: bool, dtype, device):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend = "auto"
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device) if perm else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def stores(cls, qw) -> bool:
        """Whether this module stores weight qw (of a registered weight type); see module_for_weight."""
        return True

    @classmethod
    def from_quantized(cls, qw, bias: torch.Tensor | None, dtype: torch.dtype) -> "QuantizedLinear":
        raise NotImplementedError

    def copy_optional(self, **values) -> None:
        """Copy each given tensor that is not None into the buffer of that name (reshaped to it)."""
        for name, value in values.items():
            if value is not None:
                buf = getattr(self, name)
                buf.copy_(value.detach().reshape(buf.shape))

    def spec_value(self, key: str):
        """layer_spec's value of `key`: a flag for bias, perm and buffer_flags, else the attribute."""
        if key == "bias" or key == self.perm_field:
            return getattr(self, key if key == "bias" else "perm") is not None
        if key in self.buffer_flags:
            return getattr(self, self.buffer_flags[key]) is not None
        return getattr(self, key)

    def layer_spec(self) -> dict:
        """What tquant.load needs to rebuild this module (stored in the saved quantization_config)."""
        return {"type": self.spec_type, **{key: self.spec_value(key) for key in self.spec_fields}}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype) -> "QuantizedLinear":
        """The module a saved layer_spec describes, its buffers on the meta device (filled by tquant.load)."""
        fields = {key: spec[key] if key in spec or key not in cls.spec_defaults else cls.spec_defaults[key]
                  for key in cls.spec_fields if key not in ("in_features", "out_features")}
        return cls(spec["in_features"], spec["out_features"], **fields, dtype=dtype, device="meta")

    def bias_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = use_kernel(self, x)
        y = self._matmul(x.reshape(-1, self.in_features), kernel)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _matmul(self, x2: torch.Tensor, kernel: bool) -> torch.Tensor:
        """y [M, N] (bias included) of x2 [M, in_features]: the Triton kernels when `kernel`, else the torch
        references."""
        raise NotImplementedError

    def probe_exact(self) -> bool:
        """Whether self(I) - bias is exactly the weight applied to any input (tquant.tools.analyze reads the weight
        back so): true for weight-only modules and per-token dynamic activation grids."""
        return True

    def extra_repr(self) -> str:
        rest = [f"{key}={self.spec_value(key)}" for key in self.spec_fields
                if key not in ("in_features", "out_features")]
        return ", ".join([f"in_features={self.in_features}", f"out_features={self.out_features}", *rest])

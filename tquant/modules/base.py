"""QuantizedLinear: the base of every nn.Linear replacement, and the registry from weight type and spec type to module.

A subclass declares what it stores; the base writes the rest once:
    in_features, out_features    K and N: y [..., N] = f(x [..., K])
    backend                      "auto" / "triton" / "torch" (tquant.modules.backend.use_kernel)
    perm    int32 [K] or absent  storage column k holds input channel perm[k] (act-order, QoQ's reordering)
    bias    [N] or absent        in the model's dtype
    layer_spec()                 {"type": spec_type, then spec_fields in order} (saved in quantization_config)
    from_spec(spec, dtype)       the module with those fields, its buffers on the meta device (tquant.load)
    extra_repr()                 in_features, out_features and the other spec fields
    check_spec(name, spec)       from_spec after refusing unknown / missing keys and wrong types (ValueError naming
                                 the layer), the module's own constructor checks included
    validate(name)               after tquant.load assigned the saved tensors: every dtype exact, every float
                                 finite, every index in range (perm a permutation; a subclass's validate_buffers
                                 checks its own), else ValueError "name.tensor: problem: what to do"
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

DAMAGED = "the checkpoint was edited or damaged; quantize and save it again"
FLOATS = (torch.float16, torch.bfloat16, torch.float32)  # what a module's model-dtype buffers may hold

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


class Check:
    """validate()'s checks of one layer's tensors: each failure is a ValueError "layer.tensor: problem: DAMAGED".
    dtype "model" is the module's float dtype: one of FLOATS, the same for every such buffer of the module."""

    def __init__(self, layer: str):
        self.layer, self.model_dtype = layer, None

    def fail(self, tensor: str, problem: str):
        raise ValueError(f"{self.layer}.{tensor}: {problem}: {DAMAGED}")

    def __call__(self, tensor: str, t: torch.Tensor | None, dtype, *, lo: int | None = None, hi: int | None = None,
                 positive: bool = False) -> torch.Tensor | None:
        """Check buffer `tensor` (None: absent, nothing to check): its dtype; floats finite (and > 0 when positive);
        integers in [lo, hi]. Returns t."""
        if t is None:
            return None
        if dtype == "model":
            if t.dtype not in FLOATS or (self.model_dtype is not None and t.dtype != self.model_dtype):
                want = self.model_dtype or " / ".join(str(d) for d in FLOATS)
                self.fail(tensor, f"dtype {t.dtype}, expected {want} (the layer's float dtype)")
            self.model_dtype = t.dtype
        elif t.dtype != dtype:
            self.fail(tensor, f"dtype {t.dtype}, expected {dtype}")
        if t.is_floating_point():
            bad = ~torch.isfinite(t if t.element_size() > 1 else t.float())  # float8: no isfinite in torch
            if bad.any():
                i = int(bad.flatten().nonzero()[0])
                self.fail(tensor, f"not finite ({t.flatten()[i].item()} at flat index {i})")
            if positive and (t <= 0).any():
                i = int((t <= 0).flatten().nonzero()[0])
                self.fail(tensor, f"must be > 0 ({t.flatten()[i].item()} at flat index {i})")
        if (lo is not None or hi is not None) and t.numel():
            v = t.to(torch.int64).flatten()
            bad = (v < lo if lo is not None else torch.zeros_like(v, dtype=torch.bool)) | \
                (v > hi if hi is not None else torch.zeros_like(v, dtype=torch.bool))
            if bad.any():
                i = int(bad.nonzero()[0])
                self.fail(tensor, f"value {int(v[i])} at {i} is outside {lo}..{hi}")
        return t

    def permutation(self, tensor: str, t: torch.Tensor | None, n: int) -> None:
        """t (int32 [n]) holds each of 0..n-1 once."""
        if t is None:
            return
        self(tensor, t, torch.int32)
        v = t.to(torch.int64)
        bad = (v < 0) | (v >= n)
        if bad.any():
            i = int(bad.nonzero()[0])
            self.fail(tensor, f"not a permutation of 0..{n - 1} (value {int(v[i])} at {i})")
        seen = torch.zeros(n, dtype=torch.int64).index_add_(0, v, torch.ones_like(v))
        if (seen != 1).any():
            j = int((seen != 1).nonzero()[0])
            self.fail(tensor, f"not a permutation of 0..{n - 1} ({j} appears {int(seen[j])} times)")


def check_spec(name: str, spec, fields: tuple[str, ...], defaults: dict, flags: tuple[str, ...],
               optional: tuple[str, ...] = ()) -> None:
    """A saved layer spec's keys and value types: exactly "type" and `fields` (those in `defaults` may be absent),
    flags booleans, the rest integers (None allowed for `optional` and keys defaulting to None); else ValueError
    naming the layer."""
    def fail(problem):
        raise ValueError(f"{name}: layer spec {problem}: {DAMAGED}")
    if not isinstance(spec, dict):
        fail(f"is a {type(spec).__name__}, not an object")
    unknown = sorted(set(spec) - {"type", *fields})
    if unknown:
        fail(f"has unknown keys {unknown} (a {spec.get('type')} layer has {list(fields)})")
    missing = [key for key in fields if key not in spec and key not in defaults]
    if missing:
        fail(f"lacks {missing}")
    for key in fields:
        value = spec.get(key, defaults.get(key))
        if key in flags:
            if not isinstance(value, bool):
                fail(f"{key}={value!r}: expected true or false")
        elif value is None:
            if key not in optional and not (key in defaults and defaults[key] is None):
                fail(f"{key}=null: expected an integer")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            fail(f"{key}={value!r}: expected an integer >= 0")


def build_checked(cls, name: str, spec: dict, dtype: torch.dtype):
    """cls.from_spec(spec, dtype), a constructor's refusal re-raised as a ValueError naming the layer."""
    try:
        return cls.from_spec(spec, dtype)
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError, KeyError) as e:
        raise ValueError(f"{name}: layer spec {spec} does not describe a valid {cls.__name__} ({e}): {DAMAGED}") from None


class QuantizedLinear(nn.Module):
    spec_type: ClassVar[str]
    spec_fields: ClassVar[tuple[str, ...]]  # layer_spec's keys after "type", in order (saved configs hold them)
    spec_defaults: ClassVar[dict] = {}  # fields that older checkpoints lack, and the value they meant
    spec_optional: ClassVar[tuple[str, ...]] = ()  # integer fields that may be null (e.g. BitPlaneLinear's act_bits)
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

    @classmethod
    def check_spec(cls, name: str, spec: dict, dtype: torch.dtype) -> "QuantizedLinear":
        """from_spec of a saved layer spec, checked first (tquant.load): unknown or missing keys, flags that are
        not booleans, sizes that are not integers, and whatever the constructor refuses give a ValueError naming
        the layer."""
        flags = ("bias", *((cls.perm_field,) if cls.perm_field else ()), *cls.buffer_flags)
        check_spec(name, spec, cls.spec_fields, cls.spec_defaults, flags, cls.spec_optional)
        for key in ("in_features", "out_features"):
            if spec[key] < 1:
                raise ValueError(f"{name}: layer spec {key}={spec[key]}: expected >= 1: {DAMAGED}")
        return build_checked(cls, name, spec, dtype)

    def validate(self, name: str) -> None:
        """Check the tensors tquant.load assigned (layer `name`) before anything reads them: perm a permutation of
        0..in_features-1, bias finite in the layer's float dtype, then the subclass's validate_buffers. ValueError
        "name.tensor: problem: what to do" on the first failure."""
        check = Check(name)
        self.validate_buffers(check)
        check.permutation("perm", self.perm, self.in_features)
        check("bias", self.bias, "model")

    def validate_buffers(self, check: Check) -> None:
        """The subclass's own buffers (dtypes, finite floats, index ranges), through check(tensor, t, dtype, ...)."""
        raise NotImplementedError

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

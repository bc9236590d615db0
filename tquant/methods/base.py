"""What every weight quantization method implements, and the registry that names them.

The driver (tquant.driver) owns the data flow; a method only sees one input stream at a time:

    state = method.new_state(name, linear)      # statistics of the input that `linear` (and any
                                                 # linears reading the same tensor, e.g. q/k/v) sees
    state.add_batch(x)                           # x: that input [.., K], once per calib batch
    qw = method.quantize(state, linear, name)    # -> QuantizedWeight (codes, scale, zero, perm)
Two optional hooks for methods that change more than one weight at a time:
    method.prepare_block(block, linears, groups, inputs, prefix)   # before a block's linears are quantized:
        may rewrite weights in place (smoothing, distillation); groups = names of linears sharing an input
    method.input_transform(name) -> fn(x) or None                  # what a quantized layer does to its input
    method.finish_block(block, linears, results, inputs, prefix)   # after a block's linears are quantized (and
        their de-quantized weights written back): may tune the results and the block's other parameters
Mixture-of-experts experts (fused 3-D weights, not nn.Linear) go through the same three calls, one expert projection
at a time: the driver builds a stand-in nn.Linear of expert e's gate_up (or down) weight and a state fed that
expert's calibration tokens. method.experts_refusal() says why a method cannot take part (None: it can).
Around the whole block loop (tquant.api): `with method.around_blocks(model, calib):` the driver's loop runs inside;
before its yield the model is still float (a method may take targets from it: QuIP#'s teacher logits), after it every
block holds its quantized modules (the head and embeddings too where asked) and the method may tune what is left
(QuIP#'s end-to-end fine-tuning). calib: the token ids [n, T] the blocks are calibrated on (None for data-free runs).
method.check_layer(linear, name) raises a ValueError naming a layer the method cannot quantize; the driver
calls it for every target before any work starts. When the caller left group_size at the method's default, the
driver first calls method.fit_group_size(in_features of every target): a default of 128 becomes the largest of
128 / 64 / 32 dividing them all (per channel if none), so the defaults work on any model.

Methods never launch kernels and never replace modules themselves.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..formats.weights import QuantizedWeight
from ..formats.quantizer import STANDARD_GROUP_SIZES, check_bits, fit_group_size, resolve_group_size

_REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    for name in (cls.name, *cls.aliases):
        _REGISTRY[name] = cls
    return cls


def get_method(name: str) -> type["Method"]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available_methods() -> dict[str, dict[str, str]]:
    """{method name: {option: description with default}}."""
    return {name: cls.describe_options() for name, cls in sorted(_REGISTRY.items()) if name == cls.name}


class LayerState:
    """Statistics of one input stream gathered over the calibration set (none for data-free methods).
    `name` and `linear` are those of the first linear reading it (for messages, sizes and device)."""

    def __init__(self, name: str, linear: nn.Linear):
        self.name = name
        self.linear = linear
        self.n_batches = 0

    def add_batch(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise ValueError(f"NaN or Inf in the calibration activations entering layer {self.name!r}")
        self.n_batches += 1
        self._accumulate(x.reshape(-1, x.shape[-1]))

    def _accumulate(self, x: torch.Tensor) -> None:
        pass


def option(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Method:
    """Base of weight-only methods. Options are dataclass fields: their metadata 'help' documents them."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()  # other names get_method accepts
    needs_calibration: ClassVar[bool] = True
    needs_layer_stats: ClassVar[bool] = True  # False: quantize() ignores its state (the driver skips the passes)
    state_class: ClassVar[type[LayerState]] = LayerState

    bits: int = option(4, "weight bits: 2, 3, 4 or 8")
    group_size: int = option(128, "input channels sharing a scale and zero; -1 = one per output channel")
    sym: bool = option(True, "symmetric grid (zero fixed at 2^(bits-1)); False = min-max with an integer zero")

    def __post_init__(self):
        check_bits(self.bits)

    @classmethod
    def describe_options(cls) -> dict[str, str]:
        return {
            f.name: f"{f.metadata.get('help', '')} (default {f.default!r})".strip()
            for f in dataclasses.fields(cls)
        }

    def new_state(self, name: str, linear: nn.Linear) -> LayerState:
        return self.state_class(name, linear)

    def fit_group_size(self, in_features) -> str:
        """Called instead of an explicit group_size (the caller gave none): a default among STANDARD_GROUP_SIZES
        becomes the largest of them, not above it, dividing every in_features (-1, per channel, if none does).
        Returns the line saying what changed ("" if nothing did); other defaults (per channel, SpQR's 16) stay."""
        if self.group_size not in STANDARD_GROUP_SIZES:
            return ""
        self.group_size, line = fit_group_size(in_features, self.group_size)
        return line

    def check_layer(self, linear: nn.Linear, name: str) -> None:
        self.layer_group_size(linear, name)

    def layer_group_size(self, linear: nn.Linear, name: str) -> int:
        return resolve_group_size(self.group_size, linear.in_features, name)

    def quantize(self, state: LayerState, linear: nn.Linear, name: str) -> QuantizedWeight:
        raise NotImplementedError

    def experts_refusal(self) -> str | None:
        """Why this method cannot quantize mixture-of-experts experts, or None where it can. The driver quantizes
        each expert's projection by new_state / add_batch / quantize on a stand-in nn.Linear, and PackedExperts stores
        weight-only QuantizedWeights (the uniform packed grid). Refused: methods with block- or model-level steps
        (prepare_model, prepare_block, finish_block, input_transform, kv_cache_method: smoothing, rotations, training,
        activation quantization), which act on the block's nn.Linear layers and would miss the experts, and methods
        whose quantize is annotated to return another weight type (SpQR's, BCQ's, ...). An unannotated method's
        weights are checked as they come (the driver's ValueError names the method)."""
        import typing

        steps = self.own_steps("prepare_model", "around_blocks", "prepare_block", "finish_block", "input_transform",
                               "kv_cache_method")
        if steps:
            return (f"its block- or model-level steps ({', '.join(steps)}) act on the block's nn.Linear layers and "
                    "do not reach the fused experts")
        try:
            returns = typing.get_type_hints(type(self).quantize).get("return")
        except Exception:  # noqa: BLE001 - an annotation that does not resolve says nothing
            returns = None
        if isinstance(returns, type) and returns is not QuantizedWeight:
            return (f"it makes {returns.__name__} weights, and the experts module (PackedExperts) stores the uniform "
                    "packed grid (QuantizedWeight) only")
        return None

    def own_steps(self, *steps: str) -> list[str]:
        """Those of the optional steps named (prepare_model, prepare_block, ...) that this method defines itself."""
        return [s for s in steps if getattr(type(self), s) is not getattr(Method, s)]

    def prepare_block(self, block: nn.Module, linears: dict[str, nn.Linear], groups: list[list[str]], inputs,
                      prefix: str) -> None:
        """inputs: [(args, kwargs)] of the block, one per calibration batch. Weight-only methods do nothing."""

    def finish_block(self, block: nn.Module, linears: dict[str, nn.Linear], results: dict, inputs,
                     prefix: str) -> None:
        """results: {linear name: its quantized weight}. Weight-only methods do nothing."""

    def input_transform(self, name: str):
        return None

    def prepare_model(self, model: nn.Module) -> None:
        """Change the float model before anything is calibrated or quantized (QoQ's rotation); nothing here."""

    @contextlib.contextmanager
    def around_blocks(self, model: nn.Module, calib: torch.Tensor | None):
        """The context the driver's block loop runs in (see the module docstring); nothing here."""
        yield

    def kv_cache_method(self):
        """A KV-cache method this weight method brings (QoQ's KV4), applied before its weights; None here."""
        return None

    def report(self) -> dict:
        """JSON-able facts the run measured (e.g. LKD errors, searched alphas), saved in quantization_config."""
        return {}


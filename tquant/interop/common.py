"""What the exporters and importers of tquant.interop share: dense bit packing, reading HF-style checkpoint folders
(writing them: tquant.interop.writer), building a model skeleton and filling it with tquant modules, and the errors
they raise.

Dense packing (compressed-tensors' pack_to_int32, AutoGPTQ / GPTQModel's 3-bit packing): value i of a row sits at
bits [i * bits, (i + 1) * bits) of the row's little-endian bit stream of int32 words, crossing word boundaries when
32 is not a multiple of bits (3 bits: 32 values in 3 words). For 2, 4 and 8 bits this is the same as
tquant.formats.packing's per-word layout.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
from safetensors import safe_open
from torch import nn

from ..config import write_imported_config
from ..formats.packing import pack_codes, unpack_codes
from ..formats.quantizer import SUPPORTED_BITS
from ..modules.packed_linear import PackedLinear


def pack_dense(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integer values [R, C] in [0, 2^bits) -> int32 [R, ceil(C * bits / 32)], packed along C as one dense
    little-endian bit stream per row."""
    r, c = values.shape
    v = values.to(torch.int64)
    if v.numel() and (v.min() < 0 or v.max() >= 2**bits):
        raise ValueError(f"values out of range for {bits}-bit packing")
    words = -(-c * bits // 32)
    out = torch.zeros(r, words + 1, dtype=torch.int64)
    start = torch.arange(c, dtype=torch.int64) * bits
    w, off = start // 32, start % 32
    shifted = v << off  # < 2^39: the low word's part and what spills into the next word
    out.index_add_(1, w, shifted & 0xFFFFFFFF)
    out.index_add_(1, w + 1, shifted >> 32)
    out = out[:, :words]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32).contiguous()


def unpack_dense(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """pack_dense's inverse: int32 [R, W] -> int64 [R, count] unsigned values."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed dtype {packed.dtype}, expected torch.int32")
    p = packed.to(torch.int64) & 0xFFFFFFFF
    p = torch.cat([p, torch.zeros(p.shape[0], 1, dtype=torch.int64)], dim=1)
    start = torch.arange(count, dtype=torch.int64) * bits
    w, off = start // 32, start % 32
    both = p[:, w] | (p[:, w + 1] << 32)
    return (both >> off) & (2**bits - 1)


def unpacked(module: PackedLinear) -> torch.Tensor:
    """A PackedLinear's codes int64 [K, N] in storage order (column k of x[..., perm] when it has a perm)."""
    return unpack_codes(module.qweight, module.bits, module.in_features).to(torch.int64)


def fail(tensor: str, problem: str, fix: str = "") -> None:
    raise ValueError(f"{tensor}: {problem}" + (f"; {fix}" if fix else ""))


def expect(name: str, t: torch.Tensor | None, shape: tuple, dtypes) -> torch.Tensor:
    """Tensor `name` exists with `shape` and one of `dtypes` (a dtype, a tuple, or "float"), else ValueError."""
    if t is None:
        fail(name, f"missing from the checkpoint (expected shape {list(shape)})")
    if tuple(t.shape) != tuple(shape):
        fail(name, f"shape {list(t.shape)}, expected {list(shape)}", "is the checkpoint for this model config?")
    ok = t.is_floating_point() if dtypes == "float" else t.dtype in (dtypes if isinstance(dtypes, tuple) else (dtypes,))
    if not ok:
        fail(name, f"dtype {t.dtype}, expected {dtypes if dtypes != 'float' else 'a float dtype'}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        fail(name, "holds non-finite values")
    return t


def check_kernel_bits(name: str, bits) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        fail(name, f"bits={bits!r}: tquant has kernels for {list(SUPPORTED_BITS)}-bit weights only")
    return bits


# ---- checkpoint folders ----

def read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors or of the shards listed in model.safetensors.index.json."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
        if not files:
            raise ValueError(f"{path!r} holds no .safetensors weights")
    tensors = {}
    for name in files:
        full = os.path.join(path, name)
        if os.path.basename(name) != name or not os.path.isfile(full):
            raise ValueError(f"{path!r}: weights file {name!r} is missing or not a plain name in the folder")
        with safe_open(full, framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def plain_tensors(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """The model's persistent state (parameters and persistent buffers) outside the modules in `skip`, each
    tensor once (a tied lm_head is left out, as save_pretrained does)."""
    seen, out = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        owner = name.rpartition(".")[0]
        if any(owner == s or owner.startswith(s + ".") for s in skip):
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t.detach()
    return out


def hf_config(model: nn.Module, quantization_config: dict) -> dict:
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    return config


# ---- building a model from a foreign checkpoint ----

@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device while keeping buffers (RoPE's inv_freq, computed at construction) real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def skeleton(config_dict: dict):
    """The HF model of a config.json (its quantization_config dropped), parameters on meta, buffers real, in the
    config's dtype."""
    import transformers

    data = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    config = transformers.AutoConfig.for_model(**data)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def linear_names(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def packed_linear(name: str, linear: nn.Module, *, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  bits: int, group_size: int, perm: torch.Tensor | None, bias: torch.Tensor | None) -> PackedLinear:
    """A PackedLinear replacing `linear` (layer `name`) from codes [K, N] in storage order (x[..., perm]), scales and
    integer-valued zeros [G, N]."""
    k, n = linear.in_features, linear.out_features
    check_kernel_bits(f"{name}.weight", bits)
    if k % group_size:
        fail(f"{name}", f"group size {group_size} does not divide in_features={k}")
    mod = PackedLinear(k, n, bits=bits, group_size=group_size, bias=bias is not None, has_perm=perm is not None,
                       dtype=scales.dtype, device="cpu")
    mod.qweight.copy_(pack_codes(codes.t(), bits))
    mod.scales.copy_(scales)
    mod.zeros.copy_(zeros.to(scales.dtype))
    if perm is not None:
        mod.perm.copy_(perm.to(torch.int32))
    if bias is not None:
        mod.bias.copy_(bias.to(scales.dtype))
    mod.validate(name)
    return mod


def finish(model: nn.Module, modules: dict[str, nn.Module], rest: dict[str, torch.Tensor], source: str,
           device=None) -> nn.Module:
    """Put the imported quantized modules in, load the other tensors, tie weights, record a tquant
    quantization_config (so tquant.save / tquant.export take the model), and check nothing is left empty."""
    for name, mod in modules.items():
        model.set_submodule(name, mod)
    state = model.state_dict(keep_vars=True)
    for key, value in rest.items():
        if key not in state:
            fail(key, f"the checkpoint has this tensor, the {type(model).__name__} does not",
                 "is the checkpoint for this model config?")
        if tuple(state[key].shape) != tuple(value.shape):
            fail(key, f"shape {list(value.shape)}, expected {list(state[key].shape)}")
    model.load_state_dict(rest, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and not isinstance(out, PackedLinear) and out.weight.device.type == "meta":
            out.weight = inp.weight
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if empty:
        fail(empty[0], "missing from the checkpoint" + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""))
    layers = {name: mod.layer_spec() for name, mod in modules.items()}
    bits = sorted({m.bits for m in modules.values()})
    write_imported_config(model, layers, bits[0] if len(bits) == 1 else None, source)
    return model.to(device or "cpu").eval()

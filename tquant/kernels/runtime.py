"""Where the Triton kernels run, and small launch helpers.

TRITON_INTERPRET=1 runs every kernel on the CPU through Triton's interpreter (tests, CI). Triton reads
the variable when a kernel is decorated, so it must be set before `tquant.kernels` is first imported.
"""
from __future__ import annotations

import functools
import os
import re

import torch
import triton.language as tl


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"



DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the float dtypes every kernel takes and returns


def dot_args(dtype: torch.dtype) -> dict:
    """A kernel's tl.dot constexprs for inputs of `dtype`: DOT_DTYPE, their own type (fp32 in "ieee" PRECISION,
    the 16-bit types "tf32", which Triton ignores for them). The interpreter (Triton 3.6-3.9) multiplies bf16 dot
    operands as raw uint16 bits, so there bf16 tiles are taken in fp32."""
    dot = {torch.float32: tl.float32, torch.float16: tl.float16,
           torch.bfloat16: tl.float32 if interpreter_on() else tl.bfloat16}[dtype]
    return dict(DOT_DTYPE=dot, PRECISION="ieee" if dot == tl.float32 else "tf32")


def check_device(tensors: dict[str, torch.Tensor | None]) -> None:
    """All given tensors on one device, and that device CUDA unless the interpreter is on."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name}: {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device; got {where}")
    device = devices.pop()
    if device.type != "cuda" and not interpreter_on():
        raise ValueError(
            f"the Triton kernels need CUDA tensors (got {device}); use the torch reference on CPU "
            "or set TRITON_INTERPRET=1 before importing tquant.kernels"
        )


def device_name(device: torch.device) -> str:
    """GPU name as a file-name-safe string, e.g. 'NVIDIA_H100_80GB_HBM3'; 'interpreter' off CUDA."""
    if device.type != "cuda":
        return "interpreter"
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(index)).strip("_")


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def check_tensors(expected: dict, context: str) -> None:
    """Raise ValueError naming the first tensor whose dtype or shape is off.
    expected: {name: (tensor or None to skip, shape, allowed dtypes)}; context says what the shapes follow from."""
    for name, (t, shape, dtypes) in expected.items():
        if t is None:
            continue
        if t.dtype not in dtypes:
            raise ValueError(f"{name} dtype {t.dtype} does not match: expected {' or '.join(map(str, dtypes))} "
                             f"for {context}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match: expected {tuple(shape)} for {context}")

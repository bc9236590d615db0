"""Compile Triton launches for a GPU that this machine does not have (a CPU-only dev machine or CI).

Inside `compiling_for(target)`, every `kernel[grid](*args, **kwargs)` launch is compiled for `target` (default
sm_90, Hopper) down to a cubin instead of being run, with the specialization the JIT would give the same
arguments (16-byte aligned pointers, integers divisible by 16), and recorded as a `Compiled` (name, registers,
spilled bytes, shared memory, SASS on request). Launchers run as usual around it on CPU tensors; their outputs are
left unwritten. A kernel that does not compile raises here, as it would on the first launch on that GPU. Needs
Triton kernels decorated with the interpreter off (TRITON_INTERPRET=0 before tquant.kernels is imported).
"""
from __future__ import annotations

import contextlib
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

HOPPER = GPUTarget("cuda", 90, 32)


@dataclass
class Compiled:
    name: str
    constexprs: dict
    registers: int
    spill_bytes: int
    shared_bytes: int
    cubin: bytes
    ttgir: str

    def sass(self) -> str:
        """The cubin disassembled by the nvdisasm that ships with Triton."""
        with TemporaryDirectory() as tmp:
            path = Path(tmp) / "k.cubin"
            path.write_bytes(self.cubin)
            return subprocess.run([_tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True,
                                  check=True).stdout


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, spilled bytes: local-memory stack) of the cubin's kernel, as cuobjdump reports them."""
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        log = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True,
                             text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", log).group(1)), int(re.search(r"STACK:(\d+)", log).group(1))


def compile_launch(fn: JITFunction, target: GPUTarget, args, kwargs) -> Compiled:
    """Compile one launch of `fn` with these arguments for `target`, as JITFunction.run would."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    regs, spills = _resources(kernel.asm["cubin"])
    names = {k: v for k, v in bound.items() if fn.params[fn.arg_names.index(k)].is_constexpr}
    return Compiled(fn.__name__, names, regs, spills, kernel.metadata.shared, kernel.asm["cubin"],
                    kernel.asm["ttgir"])


@contextlib.contextmanager
def compiling_for(target: GPUTarget = HOPPER):
    """Within the block, launches compile for `target` and are appended to the yielded list instead of running."""
    done: list[Compiled] = []
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        done.append(compile_launch(self, target, args, kwargs))

    JITFunction.run = compile_instead
    try:
        yield done
    finally:
        JITFunction.run = run

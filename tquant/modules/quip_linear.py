"""QuipLinear: an nn.Linear replacement holding QuIP#'s E8P lattice codes (tquant.formats.weights.LatticeWeight).

Buffers:
    su     float32 [K]          input sign vector         sv    float32 [N]  output signs times the layer scale
    codes  int16 [K / 8, N]     E8P12 index of W_r[n, 8b .. 8b + 7] at codes[b, n]
    codes2 uint8 [K / 8, N] (3 bits, E81B) | int16 [K / 8, N] (4 bits, E8P12) | absent (2 bits): RVQ residual
    bias   [N] (optional)
forward, with H_n the orthonormal Hadamard transform (tquant.kernels.hadamard) and D the decoded codes:
    y = (hadamard((x * su) along K) @ D^T, then hadamard^T along N) * sv + bias
three launches on CUDA (Triton kernels: su fused into the input transform, sv and bias into the output
transform's epilogue), their torch references on the CPU.
Fine-tuning (QuIP#'s end-to-end stage, tquant.methods.quip_sharp): inside `with layer.trainable():` su, sv (float32:
QuIP# makes the signs real-valued) and the bias (its dtype) are nn.Parameters, and the forward takes the torch
references, which autograd differentiates (the Triton kernels have no backward), each layer checkpointed (its
backward recomputes its forward, so it keeps only its input); the codes stay fixed. On exit they are buffers again,
holding the tuned values.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..formats.weights import LatticeWeight
from .base import QuantizedLinear


def _int16(codes: torch.Tensor) -> torch.Tensor:
    """16-bit indices (int64 in [0, 2^16)) as int16 [K / 8, N]."""
    c = codes.t() & 0xFFFF
    return torch.where(c >= 1 << 15, c - (1 << 16), c).to(torch.int16).contiguous()


class QuipLinear(QuantizedLinear, spec_type="quip_linear", weight_type=LatticeWeight):
    spec_fields = ("bits", "in_features", "out_features", "bias")
    perm_field = None

    def __init__(self, in_features, out_features, *, bits, bias=False, dtype=torch.float16, device=None):
        if bits not in (2, 3, 4) or in_features % 8:
            raise ValueError(f"QuipLinear takes 2, 3 or 4 bits and in_features divisible by 8; got bits={bits}, "
                             f"in_features={in_features}")
        super().__init__(in_features, out_features, bias=bias, perm=False, dtype=dtype, device=device)
        self.bits = bits
        blocks = in_features // 8
        self.register_buffer("su", torch.ones(in_features, dtype=torch.float32, device=device))
        self.register_buffer("sv", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("codes", torch.zeros(blocks, out_features, dtype=torch.int16, device=device))
        second = {2: None, 3: torch.uint8, 4: torch.int16}[bits]
        self.register_buffer("codes2", None if second is None else
                             torch.zeros(blocks, out_features, dtype=second, device=device))

    @classmethod
    def from_quantized(cls, qw: LatticeWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> "QuipLinear":
        n, blocks, _ = qw.codes.shape
        mod = cls(blocks * 8, n, bits=qw.bits, bias=bias is not None, dtype=dtype, device=qw.codes.device)
        mod.su.copy_(qw.su)
        mod.sv.copy_(qw.sv)
        mod.codes.copy_(_int16(qw.codes[..., 0]))
        if qw.bits == 3:
            mod.codes2.copy_(qw.codes[..., 1].t().to(torch.uint8))
        elif qw.bits == 4:
            mod.codes2.copy_(_int16(qw.codes[..., 1]))
        mod.copy_optional(bias=bias)
        return mod

    def validate_buffers(self, check) -> None:
        # every int16 is an E8P12 index (2^16 entries) and every uint8 an E81B one (256): the dtypes are the range
        check("su", self.su, torch.float32)
        check("sv", self.sv, torch.float32)
        check("codes", self.codes, torch.int16)
        check("codes2", self.codes2, {3: torch.uint8, 4: torch.int16}.get(self.bits))

    @contextlib.contextmanager
    def trainable(self):
        """su, sv and the bias (where there is one) as nn.Parameters of their dtypes while inside, backend "torch";
        on exit buffers holding their last values, and the backend it had."""
        backend, self.backend = self.backend, "torch"
        order = list(self._buffers)
        names = [name for name in ("su", "sv", "bias") if self._buffers[name] is not None]
        for name in names:
            self.register_parameter(name, nn.Parameter(self._buffers.pop(name)))
        try:
            yield
        finally:
            for name in names:
                self.register_buffer(name, self._parameters.pop(name).detach())
            for name in order:  # the buffers in their first order again (state_dict's, and so the saved files')
                self._buffers[name] = self._buffers.pop(name)
            self.backend = backend

    def _matmul(self, x2: torch.Tensor, kernel: bool) -> torch.Tensor:
        if torch.is_grad_enabled() and "su" in self._parameters:  # inside trainable()
            # the backward runs this forward again instead of keeping the decoded weight and every Hadamard stage
            return checkpoint(self._transforms, x2, kernel, use_reentrant=False)
        return self._transforms(x2, kernel)

    def _transforms(self, x2: torch.Tensor, kernel: bool) -> torch.Tensor:
        from ..kernels.e8p_matmul import e8p_matmul, e8p_matmul_ref
        from ..kernels.hadamard import hadamard_transform, hadamard_transform_ref

        had = hadamard_transform if kernel else hadamard_transform_ref
        matmul = e8p_matmul if kernel else e8p_matmul_ref
        y = matmul(had(x2, in_scale=self.su), self.codes, self.codes2, bits=self.bits)
        return had(y, transpose=True, out_scale=self.sv, bias=self.bias)

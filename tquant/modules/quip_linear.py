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
holding the tuned values. QuIP#'s per-block stage (and its end-to-end stage by default, quip#'s e2e_dense) tunes
the same way with `trainable(dense=True)`: the forward is then
    y = ((x * su) @ A^T) * sv + bias,   A^T = the transforms above without su, sv, bias applied to the identity
(A = H_N^T D H_K, float32 [K, N], computed once on entry and held while inside): the same function in another
evaluation order, one matmul a call instead of two Hadamard transforms, a decode and the checkpoint's recompute.
One SmolLM2-135M block, 4-bit codes, 4 x 512 tokens, float32, 1 CPU thread (benchmarks/quip_ft_step.py): 0.38 s a
training step (forward, backward, Adam) with dense=True, 1.97 s through the transforms (5.2x).
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
        self._dense = None  # A^T inside trainable(dense=True)

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
    def trainable(self, dense: bool = False):
        """su, sv and the bias (where there is one) as nn.Parameters of their dtypes while inside, backend "torch";
        on exit buffers holding their last values, and the backend it had. dense: the forward multiplies by the
        rotated-back weight A^T held while inside (module docstring) instead of running the transforms."""
        backend, self.backend = self.backend, "torch"
        order = list(self._buffers)
        names = [name for name in ("su", "sv", "bias") if self._buffers[name] is not None]
        for name in names:
            self.register_parameter(name, nn.Parameter(self._buffers.pop(name)))
        try:
            if dense:
                self._dense = self.rotated_back()
            yield
        finally:
            self._dense = None
            for name in names:
                self.register_buffer(name, self._parameters.pop(name).detach())
            for name in order:  # the buffers in their first order again (state_dict's, and so the saved files')
                self._buffers[name] = self._buffers.pop(name)
            self.backend = backend

    @torch.no_grad()
    def rotated_back(self, rows: int = 4096) -> torch.Tensor:
        """A^T = H_K^T D^T H_N, float32 [K, N]: the layer's weight with unit sign vectors and no bias, transposed;
        the torch references' transforms applied to the identity, `rows` of it at a time."""
        k, dev = self.in_features, self.codes.device
        parts = []
        for start in range(0, k, rows):
            eye = torch.zeros(min(rows, k - start), k, device=dev)
            eye[:, start : start + rows].fill_diagonal_(1.0)
            parts.append(self._transforms(eye, False, scaled=False))
        return torch.cat(parts)

    def _matmul(self, x2: torch.Tensor, kernel: bool) -> torch.Tensor:
        if self._dense is not None:  # inside trainable(dense=True)
            y = (x2.float() * self.su.float()) @ self._dense * self.sv.float()
            return (y if self.bias is None else y + self.bias.float()).to(x2.dtype)
        if torch.is_grad_enabled() and "su" in self._parameters:  # inside trainable()
            # the backward runs this forward again instead of keeping the decoded weight and every Hadamard stage
            return checkpoint(self._transforms, x2, kernel, use_reentrant=False)
        return self._transforms(x2, kernel)

    def _transforms(self, x2: torch.Tensor, kernel: bool, scaled: bool = True) -> torch.Tensor:
        """The forward's three stages; scaled=False: without su, sv and the bias."""
        from ..kernels.e8p_matmul import e8p_matmul, e8p_matmul_ref
        from ..kernels.hadamard import hadamard_transform, hadamard_transform_ref

        had = hadamard_transform if kernel else hadamard_transform_ref
        matmul = e8p_matmul if kernel else e8p_matmul_ref
        su, sv, bias = (self.su, self.sv, self.bias) if scaled else (None, None, None)
        y = matmul(had(x2, in_scale=su), self.codes, self.codes2, bits=self.bits)
        return had(y, transpose=True, out_scale=sv, bias=bias)

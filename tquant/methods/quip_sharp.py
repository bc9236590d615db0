"""QuIP# (Tseng et al., 2024): randomized Hadamard incoherence, BlockLDLQ with E8P lattice codebooks, RVQ.

Per linear W [N, K] with the Hessian H = 2/T X^T X of its inputs (tquant.methods.gptq.HessianState):
    H   <- H / mean(diag H) + sigma_reg I
    su, sv = random signs (seeded per layer)         W_r, H_r = rotate(W, H)   (tquant.formats.incoherence)
    scale s = RMS(W_r) / c, c from scale_grid: the c whose BlockLDLQ on scale_rows sampled rows gives the
              least proxy error tr(dW_r H_r dW_r^T) (c = QuIP#'s opt scale of the codebook if the grid is empty)
    H_r = L D L^T with L unit lower block-triangular (8 x 8 blocks)
    BlockLDLQ, blocks of 8 columns from the last to the first:
        W'_r[:, b] = Q( W_r[:, b] / s + (W_r / s - W'_r)[:, later] L[later, b] )
    Q = E8P12 (2 bits), E8P12 + E81B residual (3 bits), E8P12 + E8P12 residual (4 bits)  (tquant.formats.e8p_codebook)
The result is a LatticeWeight (codes, su, sv * s). Fine-tuning (ft_epochs > 0), per block after its
linears are quantized: each quantized linear runs as its QuipLinear (tuning_module) inside
QuipLinear.trainable(dense=True), its sign vectors su, sv real-valued and tuned with the block's unquantized
parameters (norms, biases) against the float block's outputs (tquant.calib.block_tuning; the codes stay fixed);
the tuned su, sv go back into the LatticeWeights.
End-to-end fine-tuning (e2e_epochs > 0; QuIP#'s second stage, its finetune_susv_e2e), after every block is
quantized (around_blocks): every QuipLinear's su, sv (real-valued) and bias (QuipLinear.trainable) and every other
floating parameter of the model but the input embedding's (norms, an untied lm_head; a head tied to the embedding
stays fixed with it, as QuIP# keeps the embedding) are tuned by Adam against the float model's
next-token distributions on the calibration set, codes fixed:
    min  mean_t KL_t(p_float || q_quantized),  p and q coarsened to the teacher's top e2e_topk tokens + the rest
(tquant.calib.logit_distill: the teacher's top-k log-probs are taken by one float forward before the blocks change,
n T (8 k + 4) bytes, instead of keeping a float copy of the model to recompute them each step; dropout off).
Evaluation order (e2e_dense): by default every QuipLinear runs inside trainable(dense=True), as in the per-block
stage, holding its rotated-back weight (float32, 4 bytes a weight); e2e_dense=False runs the Hadamard transforms
instead, each QuipLinear checkpointed (it keeps its input, not its decoded weight): the same function, slower.
Memory: the whole model in float32 with autograd through every block. Measured on SmolLM2-135M
(benchmarks/quip_e2e_cost.py, CPU, 4-bit codes, through the transforms): autograd keeps 763 MiB per 512-token window
in the model (1.5 MiB a token; --saved) and 192 MiB more for the loss over the 49152-token vocabulary; the process
peaked at 13.4 and 22.8 GiB in two runs at e2e_batch 4 (10.0 GiB in the dense order, its 425 MB of rotated-back
weights included). For an 8B Llama (an estimate, not measured: the per-token figure scaled by the hidden width 4096
/ 576 and the 32 blocks, flash attention keeping no attention matrix): about 10 MiB a token, so about 40 GiB for one
4096-token window, plus 4 GiB for the loss over 128256 tokens and 4.2 GiB for the float32 embedding and head (an
untied head: 2.1 GiB of gradient and 4.2 GiB of Adam moments more): one 80 GiB GPU at e2e_batch 1 x 4096 tokens
through the transforms. The dense order keeps 1473 MiB per window instead (2.9 MiB a token, measured; the checkpoint
keeps only each QuipLinear's input, the dense matmul's autograd more for the su / sv gradients), so for that Llama
about 80 GiB a 4096-token window plus ~26 GiB of rotated-back weights: e2e_dense=False there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import zlib

import torch
from torch import nn

from ..formats import e8p_codebook
from ..calib.block_io import outputs
from ..calib.block_tuning import distill, float32_training
from ..calib.logit_distill import distill_logits, teacher_topk
from ..formats.hadamard import hadamard_factors, random_signs
from ..formats.incoherence import rotate_hessian, rotate_weight
from ..formats.weights import LatticeWeight
from ..modules.quip_linear import QuipLinear
from .base import Method, option, register
from .gptq import HessianState

log = logging.getLogger("tquant")

BUFFER = 128  # columns per lazy update of BlockLDLQ


def block_ldl(h: torch.Tensor, block: int = 8) -> torch.Tensor:
    """L with H = L D L^T, L unit lower block-triangular (identity blocks on the diagonal); raises
    torch.linalg.LinAlgError when H is not positive definite."""
    k = h.shape[0]
    chol = torch.linalg.cholesky(h)
    diag = torch.stack([chol[i : i + block, i : i + block] for i in range(0, k, block)])
    inv = torch.linalg.inv(diag)  # [k / block, block, block]
    return torch.einsum("rjb,jbc->rjc", chol.reshape(k, k // block, block), inv).reshape(k, k)


def block_ldlq(w: torch.Tensor, lower: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockLDLQ of w [R, K] (already divided by its scale) with H = L D L^T: (w' [R, K], codes [R, K/8, stages])."""
    rows, k = w.shape
    hat = torch.zeros_like(w)
    stages = 1 if bits == 2 else 2
    codes = torch.zeros(rows, k // 8, stages, dtype=torch.int64, device=w.device)
    carried = torch.zeros_like(w)  # (w - w') of finished buffers times L, for the columns still to come
    for end in range(k, 0, -BUFFER):
        start = max(0, end - BUFFER)
        for i in range(end - 8, start - 1, -8):
            target = w[:, i : i + 8] + carried[:, i : i + 8]
            if i + 8 < end:
                target = target + (w[:, i + 8 : end] - hat[:, i + 8 : end]) @ lower[i + 8 : end, i : i + 8]
            hat[:, i : i + 8], codes[:, i // 8] = e8p_codebook.rvq_quantize(target, bits)
        if start:
            carried[:, :start] += (w[:, start:end] - hat[:, start:end]) @ lower[start:end, :start]
    return hat, codes


def proxy_error(delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """tr(delta H delta^T) of each delta [..., R, K] (a tensor of the leading dims)."""
    return ((delta @ h) * delta).sum((-2, -1))


@contextlib.contextmanager
def end_to_end_parameters(model, dense: bool = True):
    """(signs, others) while every QuipLinear of model is trainable (QuipLinear.trainable(dense)): signs the su / sv
    of each, others every other float parameter but the input embedding's (norms, biases, an untied head): what the
    end-to-end stage tunes. dense: every QuipLinear holds its rotated-back weight A^T (float32, 4 bytes a weight)
    and multiplies by it; False: through the Hadamard transforms, checkpointed."""
    layers = [m for m in model.modules() if isinstance(m, QuipLinear)]
    with contextlib.ExitStack() as stack:
        for m in layers:
            stack.enter_context(m.trainable(dense=dense))
        signs = [p for m in layers for p in (m.su, m.sv)]
        fixed = {id(p) for p in [*signs, *model.get_input_embeddings().parameters()]}
        yield signs, [p for p in model.parameters() if p.is_floating_point() and id(p) not in fixed]


@register
@dataclasses.dataclass
class QuipSharp(Method):
    name = "quip#"
    aliases = ("quip_sharp",)

    bits: int = option(2, "bits per weight: 2 (E8P12), 3 (E8P12 + E81B RVQ) or 4 (E8P12 + E8P12 RVQ)")
    group_size: int = option(-1, "not used: one scale per layer (-1)")
    sigma_reg: float = option(1e-2, "added to diag(H) after dividing H by its mean diagonal")
    seed: int = option(0, "seed of the random Hadamard sign vectors (combined with each layer's name)")
    scale_grid: str = option("0.8,0.85,0.9,0.95,1.0,1.05", "comma-separated c to search per layer, weight "
                                                          "scale = RMS(W_r) / c; '' = the codebook's own c")
    scale_rows: int = option(128, "rows of W_r the scale search runs BlockLDLQ on")
    ft_epochs: int = option(0, "fine-tuning epochs per block over the calibration set (0 = off)")
    ft_lr: float = option(5e-5, "Adam learning rate of the block's unquantized parameters (norms, biases)")
    ft_susv_lr: float = option(5e-4, "Adam learning rate of the sign vectors su, sv")
    ft_batch: int = option(4, "sequences per fine-tuning step")
    e2e_epochs: int = option(0, "end-to-end fine-tuning epochs over the calibration set after every block is "
                                "quantized: su, sv and the float parameters against the float model's logits (0 = off)")
    e2e_lr: float = option(5e-5, "end-to-end Adam learning rate of the float parameters (norms, biases, an untied "
                                 "lm_head)")
    e2e_susv_lr: float = option(5e-4, "end-to-end Adam learning rate of the sign vectors su, sv")
    e2e_batch: int = option(4, "sequences per end-to-end step (and per forward of the teacher and the KL checks)")
    e2e_topk: int = option(64, "teacher tokens kept per position: the loss is the KL over them and the rest's mass")
    e2e_dense: bool = option(True, "end-to-end stage in the dense order: every QuipLinear holds its rotated-back "
                                   "weight (float32, 4 bytes a weight: ~425 MB for SmolLM2-135M, ~26 GiB for an 8B "
                                   "Llama) and multiplies by it, the same function as the Hadamard transforms and "
                                   "3.5x faster a step on the CPU, but autograd keeps about twice the activations "
                                   "(1.9x a window); False: through the transforms, checkpointed, no dense copy "
                                   "(for a model or window too large for that, e.g. an 8B at 4096 tokens)")

    def __post_init__(self):
        e8p_codebook.check_bits(self.bits)
        if self.group_size not in (-1, 0):
            raise ValueError(f"quip# has no groups (one scale per layer); got group_size={self.group_size}")
        if not self.sym:
            raise ValueError("quip#'s lattice codebooks are symmetric; sym=False does not apply")
        self.scales = [float(c) for c in self.scale_grid.split(",") if c.strip()]
        if any(c <= 0 for c in self.scales):
            raise ValueError(f"scale_grid values must be positive, got {self.scale_grid!r}")
        if self.sigma_reg < 0 or self.scale_rows < 1 or self.ft_epochs < 0 or self.ft_batch < 1:
            raise ValueError("quip# needs sigma_reg >= 0, scale_rows >= 1, ft_epochs >= 0 and ft_batch >= 1")
        e2e = {"e2e_epochs": (self.e2e_epochs, 0, "0 turns it off"), "e2e_batch": (self.e2e_batch, 1, ""),
               "e2e_topk": (self.e2e_topk, 1, "")}
        for key, (value, least, note) in e2e.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"quip#: {key} must be an integer >= {least}{' (' + note + ')' if note else ''}; "
                                 f"got {value!r}")
        if not isinstance(self.e2e_dense, bool):
            raise ValueError(f"quip#: e2e_dense must be True or False; got {self.e2e_dense!r}")
        for key in ("e2e_lr", "e2e_susv_lr"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"quip#: {key} must be a positive finite learning rate; got {value!r}")
        self.ft_log: dict[str, tuple[float, float]] = {}
        self.e2e_log: dict = {}
        self.scale_log: dict[str, float] = {}

    def new_state(self, name, linear):
        return HessianState(name, linear)

    def check_layer(self, linear: nn.Linear, name: str) -> None:
        n, k = linear.weight.shape
        if k % 8:
            raise ValueError(f"quip# quantizes 8 input channels at a time: layer {name!r} has in_features={k}")
        for dim, size in (("in_features", k), ("out_features", n)):
            try:
                hadamard_factors(size)
            except ValueError as e:
                raise ValueError(f"quip# cannot rotate layer {name!r} ({dim}={size}): {e}") from None

    def report(self) -> dict:
        out = {"scale_c": self.scale_log}
        if self.ft_log:
            out["ft_mse_before_after"] = {b: list(e) for b, e in self.ft_log.items()}
        if self.e2e_log:
            out["e2e"] = self.e2e_log
        return out

    def _signs(self, size: int, name: str, side: str) -> torch.Tensor:
        return random_signs(size, self.seed * 1_000_003 + zlib.crc32(f"{name}:{side}".encode()))

    def quantize(self, state: HessianState, linear, name) -> LatticeWeight:
        if state.tokens == 0:
            raise ValueError(f"quip#: layer {name!r} saw no calibration data")
        n, k = linear.weight.shape
        dev = linear.weight.device
        h = state.hessian.double()
        h = h / h.diagonal().mean().clamp_min(1e-12)
        h.diagonal().add_(self.sigma_reg)
        su, sv = self._signs(k, name, "in").to(dev), self._signs(n, name, "out").to(dev)
        wr = rotate_weight(linear.weight.detach().double(), su.double(), sv.double())
        hr = rotate_hessian(h, su.double())
        try:
            lower = block_ldl(hr).float()
        except torch.linalg.LinAlgError:
            raise ValueError(f"quip#: the Hessian of layer {name!r} is not positive definite even with "
                             f"sigma_reg={self.sigma_reg}; raise sigma_reg or use more calibration data") from None
        wr, hr = wr.float(), hr.float()
        rms = wr.square().mean().sqrt().clamp_min(1e-12)
        c = self._search_scale(wr, hr, lower, rms, name)
        scale = rms / c
        _, codes = block_ldlq(wr / scale, lower, self.bits)
        self.scale_log[name] = c
        return LatticeWeight(codes, su.float(), (sv * scale).float(), self.bits)

    def _search_scale(self, wr, hr, lower, rms, name) -> float:
        """The grid's c with the least proxy error of BlockLDLQ on scale_rows sampled rows (rows are
        independent, so every c runs in one BlockLDLQ pass over the stacked, differently scaled samples)."""
        if len(self.scales) <= 1:
            return self.scales[0] if self.scales else e8p_codebook.OPT_SCALE[self.bits]
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        pick = torch.randperm(wr.shape[0], generator=g)[: self.scale_rows].to(wr.device)
        sample = wr[pick]
        steps = (rms / torch.tensor(self.scales, device=wr.device))[:, None, None]  # weight scale per c
        hat, _ = block_ldlq((sample / steps).reshape(-1, sample.shape[1]), lower, self.bits)
        delta = sample - hat.reshape(len(self.scales), *sample.shape) * steps
        return self.scales[int(proxy_error(delta, hr).argmin())]

    @contextlib.contextmanager
    def around_blocks(self, model, calib):
        if not self.e2e_epochs:
            yield
            return
        if any(p.is_meta for p in model.parameters()):
            raise ValueError("quip#: e2e_epochs > 0 tunes the whole model end to end and needs it in memory: quantize "
                             "without streaming (tquant.quantize), or pass e2e_epochs=0")
        training = model.training
        model.eval()  # the teacher's and the student's forwards without dropout
        teacher = teacher_topk(model, calib, self.e2e_topk, self.e2e_batch)
        yield
        try:
            self._tune_end_to_end(model, calib, teacher)
        finally:
            model.train(training)

    def _tune_end_to_end(self, model, calib, teacher):
        """Adam on every QuipLinear's su, sv and the float parameters but the input embedding's (module docstring)."""
        with end_to_end_parameters(model, dense=self.e2e_dense) as (signs, others):
            groups = [{"params": signs, "lr": self.e2e_susv_lr}] + ([{"params": others, "lr": self.e2e_lr}]
                                                                    if others else [])
            steps = self.e2e_epochs * math.ceil(calib.shape[0] / self.e2e_batch)
            with float32_training(model, signs + others):
                before, after = distill_logits(model, groups, calib, teacher, steps=steps, batch=self.e2e_batch,
                                               checks=self.e2e_epochs)
        self.e2e_log = {"kl_before_after": [before, after], "steps": steps, "dense": self.e2e_dense,
                        "teacher_rest_mass": teacher[0][..., -1].exp().mean().item(),
                        "tuned_parameters": {"signs": sum(p.numel() for p in signs),
                                             "float": sum(p.numel() for p in others)}}
        log.info(f"quip#: end-to-end fine-tuning, {steps} steps of {self.e2e_batch} sequences: mean KL to the float "
                 f"model (top-{teacher[1].shape[-1]} + rest) {before:.5g} -> {after:.5g}")

    def prepare_block(self, block, linears, groups, inputs, prefix):
        self._teacher = outputs(block, inputs) if self.ft_epochs else None

    def finish_block(self, block, linears, results, inputs, prefix):
        if not self.ft_epochs:
            return
        tuned = {n: tuning_module(linears[n], qw) for n, qw in results.items()}
        with contextlib.ExitStack() as stack:
            for n, mod in tuned.items():
                block.set_submodule(n, mod)
                stack.callback(block.set_submodule, n, linears[n])
                stack.enter_context(mod.trainable(dense=True))
            signs = [p for mod in tuned.values() for p in (mod.su, mod.sv)]
            fixed = {id(p) for p in signs}
            others = [p for p in block.parameters() if id(p) not in fixed and p.is_floating_point()]  # biases too
            batches = sum(a[0].shape[0] for a, _ in inputs)
            steps = self.ft_epochs * math.ceil(batches / self.ft_batch)
            groups = [{"params": signs, "lr": self.ft_susv_lr}] + ([{"params": others, "lr": self.ft_lr}]
                                                                    if others else [])
            with float32_training(block, signs + others):
                self.ft_log[prefix.rstrip(".")] = distill(block, groups, inputs, self._teacher, steps=steps,
                                                          batch=self.ft_batch, checks=self.ft_epochs)
        for n, mod in tuned.items():  # the tuned su, sv (and bias) into the results and the block's linears
            qw, linear = results[n], linears[n]
            qw.su, qw.sv = mod.su.float().to(qw.su.device), mod.sv.float().to(qw.sv.device)
            linear.weight.data = qw.dequantize().to(linear.weight.dtype)
            if linear.bias is not None:
                linear.bias.data.copy_(mod.bias)
        self._teacher = None


def tuning_module(linear: nn.Linear, qw: LatticeWeight) -> QuipLinear:
    """The QuipLinear that per-block fine-tuning runs in linear's place (inside its trainable(dense=True)): qw's
    codes and signs, linear's bias, on linear's device."""
    return QuipLinear.from_quantized(qw, linear.bias, linear.weight.dtype).to(linear.weight.device)

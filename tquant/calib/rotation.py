"""Input-module rotation (QuaRot; QoQ's rotation of the block inputs): the residual stream of a decoder-only model
turned by an orthogonal Q, folded into the weights, so the inputs of q/k/v_proj and gate/up_proj lose their
outlier channels while the model computes the same function.

    Q = diag(s) H_d        s random signs (hadamard.random_signs), H_d the orthonormal Hadamard matrix of the
                           hidden size d (hadamard.hadamard_dense); hidden states x become x Q
    RMSNorm(x Q) = RMSNorm(x) Q once the norm's weight γ is folded into the linears it feeds (rms(x Q) = rms(x))
    readers  (q/k/v_proj, gate/up_proj, lm_head):   W <- (W diag(γ)) Q,   γ <- 1
    writers  (o_proj, down_proj):                    W <- Q^T W,  b <- b Q
    embedding rows:                                  E <- E Q    (a tied lm_head is untied first)
Computed in float64 and checked on a random input: a relative change of the logits above CHECK_TOL restores the
model and raises. Blocks must be Llama-style (RMSNorm input_layernorm / post_attention_layernorm, self_attn
q/k/v/o_proj, mlp gate/up/down_proj); others raise by name.
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats.hadamard import hadamard_dense, hadamard_factors, random_signs

CHECK_TOL = 1e-4
READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def rotation_matrix(d: int, seed: int = 0) -> torch.Tensor:
    """Q = diag(s) H_d, float64 [d, d], orthogonal."""
    try:
        hadamard_factors(d)
    except ValueError as err:
        raise ValueError(f"rotation: hidden size {d} has no Hadamard matrix ({err})") from None
    return random_signs(d, seed).double()[:, None] * hadamard_dense(d, torch.float64)


def _norm_weight(norm: nn.Module, where: str) -> nn.Parameter:
    if "RMSNorm" not in type(norm).__name__ or getattr(norm, "bias", None) is not None:
        raise ValueError(f"rotation folds RMSNorm weights; {where} is {type(norm).__name__}")
    return norm.weight


def _layers(model):
    inner = getattr(model, "model", None)
    blocks = getattr(inner, "layers", None)
    if blocks is None or not hasattr(inner, "norm") or not hasattr(inner, "embed_tokens"):
        raise ValueError(f"rotation needs a Llama-style model (model.embed_tokens, model.layers, model.norm); got "
                         f"{type(model).__name__}")
    for i, block in enumerate(blocks):
        for name in [*READERS, *[n for group in READERS.values() for n in group], *WRITERS]:
            try:
                block.get_submodule(name)
            except AttributeError:
                raise ValueError(f"rotation: block {i} of {type(model).__name__} has no {name}") from None
    return inner, blocks


@torch.no_grad()
def rotate_residual(model: nn.Module, seed: int = 0) -> None:
    """Fold the norms and Q into model's weights in place (module docstring)."""
    inner, blocks = _layers(model)
    head = model.get_output_embeddings()
    d = inner.embed_tokens.weight.shape[1]
    q = rotation_matrix(d, seed).to(inner.embed_tokens.weight.device)
    probe = torch.randint(0, inner.embed_tokens.weight.shape[0], (2, 16), generator=torch.Generator().manual_seed(0))
    probe = probe.to(inner.embed_tokens.weight.device)
    before = model(probe).logits.double()
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    tied = head.weight is inner.embed_tokens.weight
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone())

    def read(linear: nn.Linear, gamma: torch.Tensor) -> None:
        linear.weight.copy_((linear.weight.double() * gamma.double()[None, :]) @ q)

    for i, block in enumerate(blocks):
        for norm_name, readers in READERS.items():
            gamma = _norm_weight(block.get_submodule(norm_name), f"block {i}'s {norm_name}")
            for name in readers:
                read(block.get_submodule(name), gamma)
            gamma.fill_(1.0)
        for name in WRITERS:
            writer = block.get_submodule(name)
            writer.weight.copy_(q.t() @ writer.weight.double())
            if writer.bias is not None:
                writer.bias.copy_(writer.bias.double() @ q)
    gamma = _norm_weight(inner.norm, "the final norm")
    read(head, gamma)
    gamma.fill_(1.0)
    inner.embed_tokens.weight.copy_(inner.embed_tokens.weight.double() @ q)
    after = model(probe).logits.double()
    change = ((after - before).norm() / before.norm()).item()
    if change > CHECK_TOL:
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n])
        if tied:
            head.weight = inner.embed_tokens.weight
        raise ValueError(f"rotation changed the model's logits by {change:.2e} (> {CHECK_TOL}): its blocks do not "
                         "read the residual stream only through the folded norms")
    if tied:
        model.config.tie_word_embeddings = False

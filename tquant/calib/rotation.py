"""Input-module rotation (QuaRot; QoQ's rotation of the block inputs): the residual stream of a decoder-only model
turned by an orthogonal Q, folded into the weights, so the inputs of q/k/v_proj and gate/up_proj lose their
outlier channels while the model computes the same function.

    Q = diag(s) H_d        s random signs (hadamard.random_signs), H_d the orthonormal Hadamard matrix of the
                           hidden size d (hadamard.hadamard_dense); hidden states x become x Q
    RMSNorm(x Q) = RMSNorm(x) Q once the norm's weight γ is folded into the linears it feeds (rms(x Q) = rms(x))
    readers  (q/k/v_proj, gate/up_proj, lm_head):   W <- (W diag(γ)) Q,   γ <- 1
    writers  (o_proj, down_proj):                    W <- Q^T W,  b <- b Q
    embedding rows:                                  E <- E Q    (a tied lm_head is untied first)
Computed in float64 per tensor and stored in the model's dtype. Checked first, one block at a time on a float32
copy of that block and a random probe (block_i(h Q) = block_i(h) Q, and the head's logits unchanged): a relative
error above CHECK_TOL raises before any weight changes. Blocks must be Llama-style (RMSNorm input_layernorm / post_attention_layernorm, self_attn
q/k/v/o_proj, mlp gate/up/down_proj); others raise by name.
"""
from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn

from ..formats.hadamard import hadamard_dense, hadamard_factors, random_signs
from .block_io import fp32, hidden, hooked

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


def _rotate_block(block: nn.Module, q: torch.Tensor, dtype=None) -> None:
    """Fold the block's norms and Q into its weights in place: computed in float64, stored in `dtype` (default:
    each tensor's own)."""
    def store(t: torch.Tensor, value: torch.Tensor) -> None:
        t.copy_(value.to(dtype or t.dtype))

    for norm_name, readers in READERS.items():
        gamma = block.get_submodule(norm_name).weight
        for name in readers:
            w = block.get_submodule(name).weight
            store(w, (w.double() * gamma.double()[None, :]) @ q)
        gamma.fill_(1.0)
    for name in WRITERS:
        writer = block.get_submodule(name)
        store(writer.weight, q.t() @ writer.weight.double())
        if writer.bias is not None:
            store(writer.bias, writer.bias.double() @ q)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _block_calls(model, blocks, ids: torch.Tensor) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of every block's call in one forward of the model on ids (the masks and position tables each
    block is handed: Gemma-style models hand layers of different kinds different ones)."""
    calls = []
    handles = [b.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True) for b in blocks]
    with hooked(handles):
        model(input_ids=ids, use_cache=False)
    if len(calls) != len(blocks):
        raise ValueError(f"rotation: {type(model).__name__} called its {len(blocks)} blocks {len(calls)} times in one "
                         "forward; the check needs each block called once")
    return calls


def _check(model, blocks, inner, head, q: torch.Tensor) -> None:
    """ValueError naming the first part whose rotated float32 copy does not compute the original's output turned
    by Q (relative error above CHECK_TOL) on a random probe; the model is not changed. One block at a time is
    copied (a float32 copy of one block, not of the model): block i's copy runs on the original hidden states h_i
    (block 0's from one forward of the model, the masks and position tables each block is handed) and, rotated, on
    h_i Q, which must give block_i(h_i) Q; the final norm and the first 256 rows of the head must give the same
    logits from h_L Q as the original from h_L."""
    device = inner.embed_tokens.weight.device
    probe = torch.randint(0, inner.embed_tokens.weight.shape[0], (2, 16), generator=torch.Generator().manual_seed(0))
    calls = _block_calls(model, blocks, probe.to(device))
    h = calls[0][0][0].float()
    q32 = q.float()
    for i, (block, (args, kwargs)) in enumerate(zip(blocks, calls)):
        rest, kwargs = fp32(args[1:]), fp32(kwargs)
        copy = deepcopy(block).float()
        want = hidden(copy(h, *rest, **kwargs)).float()
        _rotate_block(copy, q)
        got = hidden(copy(h @ q32, *rest, **kwargs)).float()
        change = _relative(got, want @ q32)
        if change > CHECK_TOL:
            raise ValueError(f"rotation: block {i} ({type(block).__name__}) changed its output by {change:.2e} (> "
                             f"{CHECK_TOL}) under Q: it does not read the residual stream only through the folded "
                             "norms (e.g. norms after the attention or the MLP, or norms with an offset weight); the "
                             "model is unchanged")
        h = want
        del copy
    norm = deepcopy(inner.norm).float()
    rows = head.weight[:256].double()
    want = norm(h).double() @ rows.t()
    gamma = norm.weight.double().clone()
    norm.weight.fill_(1.0)
    got = norm(h @ q32).double() @ ((rows * gamma[None, :]) @ q).t()
    change = _relative(got, want)
    if change > CHECK_TOL:
        raise ValueError(f"rotation: the final norm and the head changed the logits by {change:.2e} (> {CHECK_TOL}) "
                         "under Q; the model is unchanged")


@torch.no_grad()
def rotate_residual(model: nn.Module, seed: int = 0) -> None:
    """Fold the norms and Q into model's weights in place (module docstring), in the model's own dtype: every
    tensor is computed in float64 and rounded once to its dtype, so memory holds the model plus one float64 tensor
    (and, for the check, a float32 copy of one block), never a float32 copy of the model. Checked first, block by
    block (_check); a failed check raises and leaves the model as it was."""
    inner, blocks = _layers(model)
    head = model.get_output_embeddings()
    d = inner.embed_tokens.weight.shape[1]
    for i, block in enumerate(blocks):
        for norm_name in READERS:
            _norm_weight(block.get_submodule(norm_name), f"block {i}'s {norm_name}")
    _norm_weight(inner.norm, "the final norm")
    q = rotation_matrix(d, seed).to(inner.embed_tokens.weight.device)
    _check(model, blocks, inner, head, q)
    if head.weight is inner.embed_tokens.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    for block in blocks:
        _rotate_block(block, q)
    gamma = inner.norm.weight
    head.weight.copy_(((head.weight.double() * gamma.double()[None, :]) @ q).to(head.weight.dtype))
    gamma.fill_(1.0)
    emb = inner.embed_tokens.weight
    emb.copy_((emb.double() @ q).to(emb.dtype))

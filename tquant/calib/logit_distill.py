"""Tune some parameters of a whole model against the float model's next-token distributions (QuIP#'s end-to-end
fine-tuning), keeping only the teacher's top k tokens per position so its memory stays small.

Teacher (teacher_topk, taken from the float model before any block changes): for calibration sequence s and
position t, the float model's log-probabilities log p [V] over the vocabulary; kept: the k largest, their token ids
S, and the log-mass of every other token, log r = log sum_{i not in S} p_i:
    logp [n, T, k + 1] float32 (the rest's last), ids [n, T, k] int32:  n T (8 k + 4) bytes
(128 x 512 windows at k = 64: 32 MiB; the full distributions over SmolLM2's 49152 tokens would be 12 GiB, over
Llama-3's 128256 tokens at 128 x 2048: 125 GiB). Computing it costs one float forward over the calibration set.
Loss (topk_kl), per position: the KL divergence between p and the student's q, both coarsened to k + 1 outcomes
(each token of S, and "any other token"):
    KL_t = sum_{i in S} p_i (log p_i - log q_i) + r (log r - log q_rest),   q_rest = sum_{i not in S} q_i
It is >= 0 and zero iff q agrees with p on every token of S and on the rest's total mass; how that mass spreads
over the other tokens is not seen (k is capped at V - 1, so the rest is never empty). Averaged over positions.
distill_logits: Adam over random slices of `batch` consecutive calibration sequences
(tquant.calib.block_tuning.optimize: the mean KL over every calibration position is checked `checks` times, and the
best parameters seen are kept, the start included, so tuning never raises it).
"""
from __future__ import annotations

import torch

from .block_tuning import optimize


def _rest_logmass(logq: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log sum_{i not in ids} q_i of log-probabilities logq [..., V], ids [..., k] int64: [...]."""
    return logq.scatter(-1, ids, float("-inf")).logsumexp(-1)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits.float()


def topk_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [..., k + 1] float32: the k largest log-probabilities of logits [..., V], then the rest's log-mass;
    ids [..., k] int32: their tokens). k above V - 1 becomes V - 1."""
    logp = logits.float().log_softmax(-1)
    top, idx = logp.topk(min(k, logp.shape[-1] - 1), dim=-1)
    return torch.cat([top, _rest_logmass(logp, idx)[..., None]], dim=-1), idx.to(torch.int32)


@torch.no_grad()
def teacher_topk(model, calib: torch.Tensor, k: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_targets of the model's logits on calib [n, T], `batch` sequences a forward: (logp [n, T, k + 1],
    ids [n, T, k]) on the model's device."""
    targets = [topk_targets(_logits(model, calib[s : s + batch]), k) for s in range(0, calib.shape[0], batch)]
    return torch.cat([t[0] for t in targets]), torch.cat([t[1] for t in targets])


def topk_kl(logits: torch.Tensor, logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL_t between the teacher (logp [B, T, k + 1], ids [B, T, k]) and the student's
    logits [B, T, V]."""
    logq = logits.float().log_softmax(-1)
    index = ids.long()
    student = torch.cat([logq.gather(-1, index), _rest_logmass(logq, index)[..., None]], dim=-1)
    return (logp.exp() * (logp - student)).sum(-1).mean()


@torch.no_grad()
def kl_error(model, calib: torch.Tensor, teacher, batch: int) -> float:
    """topk_kl over every position of calib [n, T] against teacher = teacher_topk(...)."""
    logp, ids = teacher
    total = sum(topk_kl(_logits(model, calib[s : s + batch]), logp[s : s + batch], ids[s : s + batch]).item()
                * min(batch, calib.shape[0] - s) for s in range(0, calib.shape[0], batch))
    return total / calib.shape[0]


def distill_logits(model, param_groups: list[dict], calib: torch.Tensor, teacher, *, steps: int, batch: int,
                   checks: int, seed: int = 0) -> tuple[float, float]:
    """Run inside tquant.calib.block_tuning.float32_training(model, the groups' parameters). param_groups:
    torch.optim groups ({"params": [...], "lr": ...}). Returns (mean KL before, after)."""
    logp, ids = teacher
    n = calib.shape[0]

    def step_loss(g):
        s = int(torch.randint(max(1, n - batch + 1), (1,), generator=g))
        return topk_kl(_logits(model, calib[s : s + batch]), logp[s : s + batch], ids[s : s + batch])

    return optimize(param_groups, step_loss, lambda: kl_error(model, calib, teacher, batch), steps=steps,
                    checks=checks, seed=seed)

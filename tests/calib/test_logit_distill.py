"""The top-k teacher and its KL (tquant.calib.logit_distill) against the full KL divergence on random logits."""
import torch
from hypothesis import given, settings, strategies as st

from tquant.calib.logit_distill import topk_kl, topk_targets


def full_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    p, q = teacher.double().log_softmax(-1), student.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean()


def logits_pair(b, t, v, scale, seed):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, t, v, generator=g) * scale
    return teacher, teacher + torch.randn(b, t, v, generator=g) * scale * 0.5


shapes = dict(b=st.integers(1, 3), t=st.integers(1, 5), v=st.integers(2, 70), seed=st.integers(0, 10_000),
              scale=st.sampled_from([0.05, 1.0, 8.0, 60.0]))


@settings(max_examples=60, deadline=None)
@given(**shapes)
def test_keeping_all_tokens_but_one_gives_the_full_kl(b, t, v, scale, seed):
    teacher, student = logits_pair(b, t, v, scale, seed)
    logp, ids = topk_targets(teacher, v + 5)  # k beyond V - 1 is capped: the rest is one token
    assert logp.shape == (b, t, v) and ids.shape == (b, t, v - 1) and ids.dtype == torch.int32
    torch.testing.assert_close(topk_kl(student, logp, ids).double(), full_kl(teacher, student), rtol=1e-4, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 80), **shapes)
def test_topk_kl_is_between_zero_and_the_full_kl(k, b, t, v, scale, seed):
    """Coarsening both distributions to k + 1 outcomes can only lower the KL (data processing); the teacher against
    itself is 0; the kept log-probs are the largest, in order, and with the rest's mass sum to 1."""
    teacher, student = logits_pair(b, t, v, scale, seed)
    logp, ids = topk_targets(teacher, k)
    kept = min(k, v - 1)
    assert logp.shape == (b, t, kept + 1)
    torch.testing.assert_close(logp.logsumexp(-1), torch.zeros(b, t), atol=1e-5, rtol=0)
    full = teacher.float().log_softmax(-1)
    torch.testing.assert_close(logp[..., :-1], full.sort(-1, descending=True).values[..., :kept])
    torch.testing.assert_close(full.gather(-1, ids.long()), logp[..., :-1])
    loss = topk_kl(student, logp, ids).double()
    assert -1e-6 <= loss <= full_kl(teacher, student) + 1e-5 * (1 + full_kl(teacher, student))
    assert abs(topk_kl(teacher, logp, ids)) < 1e-5


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 8), **shapes)
def test_topk_kl_gradients_are_finite_for_peaked_logits(k, b, t, v, scale, seed):
    teacher, student = logits_pair(b, t, v, scale * 20, seed)  # up to 1200: one-hot in float32
    logp, ids = topk_targets(teacher, k)
    student.requires_grad_(True)
    loss = topk_kl(student, logp, ids)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()

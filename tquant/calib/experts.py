"""Calibration of mixture-of-experts experts: which tokens each expert's statistics are built from.

The driver (tquant.driver) captures, per calibration batch, what the block hands its experts module: the hidden
states x [T, H] and the router's choice top_k_index [T, k]. Expert e's gate_up projection is then calibrated on its
tokens' rows of x, and its down projection on act(gate) * up of those same tokens (computed with e's gate_up already
quantized when true-sequential, as the block computes it).

Which tokens (moe_calibration):
    "routed" (default)  the tokens the router sends to e (top-k) -- the inputs e sees when the model runs;
    "all"               every token to every expert, as llm-compressor's calibrate_all_experts does (the router's
                        choice and the block's output are unchanged: only the statistics see all tokens).
Too few tokens (moe_min_tokens): under "routed", an expert picked for fewer than N calibration tokens is calibrated on
all tokens instead (its statistics), and the driver logs it per layer ("layer 3: experts 5, 7 got 12 and 0 tokens,
below 256: calibrated on all tokens"). N defaults to 2 x the wider of the expert's two input widths, max(H, I):
GPTQ's Hessian X^T X of T tokens has rank <= T, so below K tokens it is singular and only its damping keeps it
invertible, and a covariance estimated from T samples is off by about sqrt(K / T) relative: 2K is the smallest round
multiple that keeps H full rank with a margin for both projections. It is a judgement, not a measured optimum
(moe_min_tokens sets it). The fallback takes all-token statistics rather than RTN: the method (its error feedback on a
full-rank H) is kept, and all tokens reaching the layer are the distribution the router picks the expert's from.
With many small experts the default asks for many tokens: DeepSeek-V3 (H 7168, 256 experts, top-8) under 128 x 2048
calibration tokens averages 8192 routed tokens an expert against N = 14336, so most of its experts would be calibrated
on all tokens (the per-layer lines say so); give more calibration tokens or a lower moe_min_tokens there.
"""
from __future__ import annotations

import torch

MODES = ("routed", "all")
EXPERT_ARGS = ("hidden_states", "top_k_index", "top_k_weights")  # transformers' experts forward(hidden_states, ...)


def check_options(mode: str, min_tokens: int | None) -> None:
    """ValueError for a moe_calibration other than MODES or a moe_min_tokens that is not a positive integer / None."""
    if mode not in MODES:
        raise ValueError(f"moe_calibration must be one of {MODES}, got {mode!r}")
    if min_tokens is not None and (isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1):
        raise ValueError(f"moe_min_tokens must be an integer >= 1 (or None: 2 x the expert's widest input), "
                         f"got {min_tokens!r}")


def default_min_tokens(hidden_dim: int, intermediate_dim: int) -> int:
    """N of the module docstring: 2 x max(H, I)."""
    return 2 * max(hidden_dim, intermediate_dim)


def experts_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states [T, H], top_k_index [T, k]) of a call of a transformers experts module, positional or named."""
    bound = dict(zip(EXPERT_ARGS, args)) | {k: v for k, v in kwargs.items() if k in EXPERT_ARGS}
    x, index = bound["hidden_states"], bound["top_k_index"]
    return x.detach().reshape(-1, x.shape[-1]), index.detach().reshape(x.numel() // x.shape[-1], -1)


def routed_counts(captured: list[tuple[torch.Tensor, torch.Tensor]], num_experts: int) -> list[int]:
    """Calibration tokens the router sent to each expert (a token counts once per expert it picked)."""
    counts = torch.zeros(num_experts, dtype=torch.int64)
    for _, index in captured:
        hit = index[(index >= 0) & (index < num_experts)]
        counts += torch.bincount(hit.flatten().cpu().long(), minlength=num_experts)[:num_experts]
    return counts.tolist()


def on_all_tokens(counts: list[int], mode: str, min_tokens: int) -> list[int]:
    """The experts calibrated on all tokens: every one under "all", those with fewer than min_tokens under
    "routed"."""
    return list(range(len(counts))) if mode == "all" else [e for e, c in enumerate(counts) if c < min_tokens]


def expert_tokens(captured, e: int, all_tokens: bool) -> list[torch.Tensor]:
    """Expert e's calibration inputs, one [T_e, H] per batch (batches without its tokens left out)."""
    if all_tokens:
        return [x for x, _ in captured if x.shape[0]]
    rows = [x[(index == e).any(dim=-1)] for x, index in captured]
    return [r for r in rows if r.shape[0]]


def gated(experts, x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up of x [T, H] through a gate_up weight [2I, H]: the down projection's input, as transformers'
    experts compute it (the gate rows first)."""
    gate, up = torch.nn.functional.linear(x, gate_up).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def summary(layer: str, counts: list[int], mode: str, min_tokens: int, fallback: list[int]) -> str:
    """The per-layer line the driver logs."""
    spread = f"routed tokens per expert {min(counts)}..{max(counts)}, mean {sum(counts) / len(counts):.0f}"
    if mode == "all":
        return f"layer {layer}: moe_calibration='all': every expert calibrated on all tokens ({spread})"
    if not fallback:
        return f"layer {layer}: every expert calibrated on its routed tokens ({spread}, each >= {min_tokens})"
    many = len(fallback) > 1
    got = ", ".join(str(counts[e]) for e in fallback[:-1]) + (" and " if many else "") + str(counts[fallback[-1]])
    return (f"layer {layer}: expert{'s' if many else ''} {', '.join(map(str, fallback))} got {got} tokens, below "
            f"{min_tokens}: calibrated on all tokens ({spread})")

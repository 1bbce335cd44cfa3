"""The GRPO objective (DeepSeekMath, R1; references §7) as pure functions of [B, T] tensors.

Kept apart from the trainer so it can be checked against a float64 transcription of the formula and reused by
any loop: group-normalised advantages, the clipped per-token surrogate with separate lower and upper clip
ranges (DAPO's clip-higher), the k3 estimator of KL to a frozen reference, and three ways of averaging tokens.
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("grpo", "dr_grpo", "dapo")
ADVANTAGE_SCALES = ("group", "batch", "none")


def group_advantages(rewards_B: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """(r - mean of its group) / (std + 1e-4): `group` std (GRPO), `batch` std, or `none` (Dr. GRPO).

    Rows are consecutive groups of `group_size` completions of one prompt. A group whose rewards are all equal
    gets zero advantage, so it adds no gradient.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"invalid advantage scale {scale!r}: must be one of {list(ADVANTAGE_SCALES)}")
    grouped = rewards_B.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).flatten()
    elif scale == "batch":
        std = rewards_B.std().expand_as(rewards_B)
    else:
        return centred
    return centred / (std + 1e-4)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token exp(ref - logp) - (ref - logp) - 1: an unbiased, never negative estimate of KL(policy || ref)."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    aggregation: str = "grpo",
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """The GRPO loss of a batch of completions.

    logprobs, old_logprobs, ref_logprobs, mask: [B, T] over completion tokens (mask 1 on real tokens);
    advantages: [B]. Per token: -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * k3 KL, with
    rho = exp(logprobs - old_logprobs). Aggregation: `grpo` averages each sequence's tokens then the sequences;
    `dr_grpo` sums every token and divides by B * max_completion_length (default T); `dapo` divides the sum by
    the number of real tokens.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"invalid aggregation {aggregation!r}: must be one of {list(AGGREGATIONS)}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the frozen reference model's log-probabilities)")
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    advantage = advantages.to(logprobs.dtype).unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.minimum(ratio * advantage, clipped * advantage)
    if beta > 0:
        per_token = per_token + beta * k3_kl(logprobs, ref_logprobs)
    if aggregation == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if aggregation == "dr_grpo":
        length = max_completion_length or logprobs.shape[1]
        return (per_token * mask).sum() / (logprobs.shape[0] * length)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def clip_fractions(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[float, float]:
    """Shares of real tokens whose ratio was clipped from below (A < 0) and from above (A > 0)."""
    ratio = torch.exp(logprobs - old_logprobs)
    advantage = advantages.unsqueeze(1)
    low = (ratio < 1 - epsilon_low) & (advantage < 0) & mask.bool()
    high = (ratio > 1 + epsilon_high) & (advantage > 0) & mask.bool()
    tokens = mask.sum().clamp(min=1)
    return float(low.sum() / tokens), float(high.sum() / tokens)

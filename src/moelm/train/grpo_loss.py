"""The GRPO objective (DeepSeekMath, R1; references §7) as pure functions of [B, T] tensors.

Kept apart from the trainer so it can be checked against a float64 transcription of the formula and reused by
any loop: group-normalised advantages, the clipped per-token surrogate with separate lower and upper clip
ranges (DAPO's clip-higher), GSPO's sequence-level ratio, TRL's two-sided clip, the k3 estimator of KL to a
frozen reference (with TRL's importance-sampling correction), and the four ways TRL averages tokens.
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
ADVANTAGE_SCALES = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")


def nan_mean_std(values: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and Bessel-corrected std over the finite entries (NaN marks a reward no function could judge)."""
    finite = torch.isfinite(values)
    count = finite.sum() if dim is None else finite.sum(dim=dim, keepdim=True)
    zeroed = torch.where(finite, values, torch.zeros_like(values))
    total = zeroed.sum() if dim is None else zeroed.sum(dim=dim, keepdim=True)
    mean = total / count.clamp(min=1)
    squares = torch.where(finite, (values - mean) ** 2, torch.zeros_like(values))
    spread = squares.sum() if dim is None else squares.sum(dim=dim, keepdim=True)
    std = torch.sqrt(spread / (count - 1).clamp(min=1))
    return mean, torch.where(count > 1, std, torch.full_like(std, float("nan")))


def group_advantages(rewards_B: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """(r - mean of its group) / (std + 1e-4): `group` std (GRPO), `batch` std, or `none` (Dr. GRPO).

    Rows are consecutive groups of `group_size` completions of one prompt. As TRL does: a reward of NaN (every
    reward function declined to judge the completion) is left out of its group's mean and std and gets advantage
    0, and so does every completion of a group of one. A group whose rewards are all equal gets zero advantage,
    so it adds no gradient.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"invalid advantage scale {scale!r}: must be one of {list(ADVANTAGE_SCALES)}")
    grouped = rewards_B.view(-1, group_size)
    if group_size == 1:
        return torch.zeros_like(rewards_B)
    mean, group_std = nan_mean_std(grouped, dim=1)
    centred = grouped - mean
    if scale == "group":
        advantages = centred / (group_std + 1e-4)
    elif scale == "batch":
        advantages = centred / (nan_mean_std(rewards_B)[1] + 1e-4)
    else:
        advantages = centred
    advantages = torch.where(torch.isfinite(advantages), advantages, torch.zeros_like(advantages))
    return advantages.flatten()


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token exp(ref - logp) - (ref - logp) - 1: an unbiased, never negative estimate of KL(policy || ref)."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def importance_weights(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, level: str
) -> torch.Tensor:
    """The ratio pi/pi_old: per token [B, T] (PPO, GRPO), or per sequence [B, 1] as GSPO's exp of the masked mean
    log-ratio (one weight for every token of a completion)."""
    if level not in IMPORTANCE_LEVELS:
        raise ValueError(f"invalid importance sampling level {level!r}: must be one of {list(IMPORTANCE_LEVELS)}")
    log_ratio = logprobs - old_logprobs
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
    return torch.exp(log_ratio)


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
    importance_sampling_level: str = "token",
    delta: float | None = None,
    bias_correction_kl: bool = True,
    num_items_in_batch: float | None = None,
    num_processes: int = 1,
) -> torch.Tensor:
    """The GRPO loss of one micro-batch of completions, as TRL 1.16's GRPOTrainer computes it (references §13).

    logprobs, old_logprobs, ref_logprobs, mask: [B, T] over completion tokens (mask 1 on real tokens);
    advantages: [B]. Per token: -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A), where r is the token's
    ratio (or its sequence's, `importance_sampling_level="sequence"`, GSPO) and, with `delta`, the unclipped
    term uses min(r, delta) (two-sided clipping); with beta > 0 plus beta * k3 KL, times r when
    `bias_correction_kl` (TRL's default). Aggregation:
    - `grpo`: each sequence's token mean, then the mean over sequences (length-biased);
    - `bnpo`: the micro-batch's token mean (what averaging micro-batches of unequal length gives);
    - `dr_grpo`: the token sum over B * max_completion_length (the configured maximum, never the padded width);
    - `dapo`: the token sum over num_items_in_batch / num_processes, where num_items_in_batch counts the
      completion tokens of the whole generation batch (every micro-batch, every rank): summed over micro-batches
      and averaged over ranks, the objective is the token mean of the whole batch.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"invalid aggregation {aggregation!r}: must be one of {list(AGGREGATIONS)}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the frozen reference model's log-probabilities)")
    if aggregation == "dr_grpo" and max_completion_length is None:
        raise ValueError("dr_grpo needs max_completion_length (the configured maximum, not the padded width)")
    if aggregation == "dapo" and num_items_in_batch is None:
        raise ValueError("dapo needs num_items_in_batch (completion tokens of the whole generation batch)")
    mask = mask.to(logprobs.dtype)
    ratio = importance_weights(logprobs, old_logprobs, mask, importance_sampling_level)
    advantage = advantages.to(logprobs.dtype).unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token = -torch.minimum(unclipped * advantage, clipped * advantage)
    if beta > 0:
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * (kl * ratio if bias_correction_kl else kl)
    per_token = per_token.expand_as(mask)
    if aggregation == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if aggregation == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if aggregation == "dr_grpo":
        return (per_token * mask).sum() / (logprobs.shape[0] * max_completion_length)
    return (per_token * mask).sum() / (num_items_in_batch / num_processes)


def clip_fractions(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    importance_sampling_level: str = "token",
) -> tuple[float, float]:
    """Shares of real tokens whose ratio was clipped from below (A < 0) and from above (A > 0)."""
    ratio = importance_weights(logprobs, old_logprobs, mask.to(logprobs.dtype), importance_sampling_level)
    advantage = advantages.unsqueeze(1)
    ratio = ratio.expand_as(mask)
    low = (ratio < 1 - epsilon_low) & (advantage < 0) & mask.bool()
    high = (ratio > 1 + epsilon_high) & (advantage > 0) & mask.bool()
    tokens = mask.sum().clamp(min=1)
    return float(low.sum() / tokens), float(high.sum() / tokens)

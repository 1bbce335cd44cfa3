"""Load balancing inside the network: auxiliary losses, router z-loss, expert capacity.

Everything here is a pure function of one layer's routing tensors; nothing is kept in module state, so the
values survive activation checkpointing and gradient accumulation unchanged. The aux-loss-free bias update is
training machinery and lives in `moelm.train.bias_balancer`. Formulas: references §2.
"""

from __future__ import annotations

import math

import torch


def _masked_mean(values_T: torch.Tensor, token_mask_T: torch.Tensor | None) -> torch.Tensor:
    if token_mask_T is None:
        return values_T.mean(0)
    weights = token_mask_T.to(values_T.dtype)
    shape = (-1,) + (1,) * (values_T.dim() - 1)
    return (values_T * weights.view(shape)).sum(0) / weights.sum().clamp(min=1)


def assignment_counts(expert_ids_TK: torch.Tensor, num_experts: int, token_mask_T: torch.Tensor | None) -> torch.Tensor:
    """Assignments per expert [E] (float), padding tokens excluded."""
    ones = torch.ones_like(expert_ids_TK, dtype=torch.float32)
    if token_mask_T is not None:
        ones = ones * token_mask_T.unsqueeze(-1).float()
    counts = torch.zeros(num_experts, dtype=torch.float32, device=expert_ids_TK.device)
    return counts.scatter_add_(0, expert_ids_TK.flatten(), ones.flatten())


def switch_loss(
    logits_TE: torch.Tensor, expert_ids_TK: torch.Tensor, token_mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/GShard: E * sum_i f_i * P_i; f = share of the T*k assignments, P = mean full-softmax prob.

    Equals 1 at perfect balance (multiply by alpha outside). f carries no gradient; P pushes probability
    mass away from overloaded experts.
    """
    num_experts = logits_TE.shape[-1]
    counts = assignment_counts(expert_ids_TK, num_experts, token_mask_T)
    fraction = counts / counts.sum().clamp(min=1)
    mean_prob = _masked_mean(logits_TE.float().softmax(dim=-1), token_mask_T)
    return num_experts * (fraction * mean_prob).sum()


def sequence_balance_loss(
    scores_BTE: torch.Tensor, expert_ids_BTK: torch.Tensor, token_mask_BT: torch.Tensor | None = None
) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise loss sum_i f_i P_i per sequence, averaged over sequences.

    f_i = E / (k T) * #{t : i in TopK(t)}, P_i = mean_t s_it / sum_j s_jt (T = the sequence's real tokens).
    """
    batch, _, num_experts = scores_BTE.shape
    top_k = expert_ids_BTK.shape[-1]
    mask = (
        torch.ones(scores_BTE.shape[:2], device=scores_BTE.device) if token_mask_BT is None else token_mask_BT.float()
    )
    lengths = mask.sum(dim=1).clamp(min=1)  # [B]
    hits = torch.zeros(batch, num_experts, device=scores_BTE.device)
    hits.scatter_add_(1, expert_ids_BTK.flatten(1), mask.unsqueeze(-1).expand_as(expert_ids_BTK).flatten(1))
    fraction = hits * num_experts / (top_k * lengths.unsqueeze(-1))
    normalised = scores_BTE.float() / scores_BTE.float().sum(dim=-1, keepdim=True).clamp(min=1e-20)
    mean_prob = (normalised * mask.unsqueeze(-1)).sum(dim=1) / lengths.unsqueeze(-1)
    return (fraction * mean_prob).sum(dim=-1).mean()


def router_z_loss(logits_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2, keeping router logits small."""
    return _masked_mean(torch.logsumexp(logits_TE.float(), dim=-1).square(), token_mask_T)


def cv_squared(values: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation, population var / mean^2 as in Shazeer et al.'s code; 0 for one value."""
    values = values.float()
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.var(unbiased=False) / (values.mean().square() + eps)


def smooth_load(
    clean_logits_TE: torch.Tensor, noisy_logits_TE: torch.Tensor, noise_std_TE: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Shazeer's differentiable load estimate: sum_x P(expert i stays in the top-k under fresh noise) [E].

    The threshold for expert i is the k-th largest noisy logit among the other experts: the (k+1)-th largest
    overall when i is in the top-k, the k-th largest otherwise.
    """
    num_experts = noisy_logits_TE.shape[-1]
    keep = min(top_k + 1, num_experts)
    top_values = noisy_logits_TE.topk(keep, dim=-1).values
    threshold_if_in = top_values[:, keep - 1 : keep]
    threshold_if_out = top_values[:, top_k - 1 : top_k]
    is_in = noisy_logits_TE > threshold_if_in
    normal = torch.distributions.Normal(0.0, 1.0)
    prob_if_in = normal.cdf((clean_logits_TE - threshold_if_in) / noise_std_TE)
    prob_if_out = normal.cdf((clean_logits_TE - threshold_if_out) / noise_std_TE)
    return torch.where(is_in, prob_if_in, prob_if_out).sum(0)


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: floor(k * capacity_factor * T / E), at least 1."""
    return max(1, math.floor(top_k * capacity_factor * num_tokens / num_experts))


def capacity_drops(expert_ids_TK: torch.Tensor, num_experts: int, slots: int) -> torch.Tensor:
    """Bool [T, k]: assignments beyond an expert's capacity. Column 0 (first choices) of every token is
    served before any second choice, then tokens in order (GShard / Switch priority)."""
    num_tokens, top_k = expert_ids_TK.shape
    priority_ids = expert_ids_TK.t().flatten()  # all first choices, then all second choices, ...
    order = priority_ids.argsort(stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=expert_ids_TK.device)
    counts.scatter_add_(0, priority_ids, torch.ones_like(priority_ids))
    starts = counts.cumsum(0) - counts
    position = torch.empty_like(priority_ids)
    position[order] = torch.arange(priority_ids.numel(), device=priority_ids.device) - starts[priority_ids[order]]
    return (position >= slots).view(top_k, num_tokens).t()

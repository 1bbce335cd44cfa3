"""Sampling as a pure function of logits and parameters: greedy, temperature, top-k, top-p, min-p, repetition
penalty, with an optional seeded generator (one per request) so results are reproducible."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelm.schema import NON_NEGATIVE_INT, Constraint, at_least, check, interval, setting


@dataclass(frozen=True)
class SamplingParams:
    """How to turn next-token logits into a token; temperature 0 means greedy."""

    temperature: float = setting(0.0, check=at_least(0, "a number >= 0 (0 = greedy)"))
    top_k: int = setting(0, check=Constraint("an integer >= 0 (0 = off)", NON_NEGATIVE_INT.test))
    top_p: float = setting(1.0, check=interval(0, 1, low_open=True))
    min_p: float = setting(0.0, check=interval(0, 1, high_open=True))
    repetition_penalty: float = setting(1.0, check=Constraint("a number > 0 (1 = off)", lambda v: v > 0))

    def __post_init__(self) -> None:
        check(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits_BV: torch.Tensor, history_BS: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL/HF rule for tokens already seen: positive logits divided by the penalty, negative multiplied.
    History entries < 0 (padding) are ignored."""
    if penalty == 1.0 or history_BS.numel() == 0:
        return logits_BV
    valid = (history_BS >= 0).to(logits_BV.dtype)
    seen = torch.zeros_like(logits_BV).scatter_add_(1, history_BS.clamp(min=0), valid) > 0
    penalised = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return torch.where(seen, penalised, logits_BV)


def filter_logits(logits_BV: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Mask (to -inf) tokens outside the top-k, outside the smallest set with probability >= top_p, and
    below min_p times the most likely token's probability. The most likely token always survives."""
    if top_k > 0 and top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits_BV.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = logits_BV.softmax(dim=-1)
        threshold = min_p * probs.max(dim=-1, keepdim=True).values
        logits_BV = logits_BV.masked_fill(probs < threshold, float("-inf"))
    return logits_BV


def token_distribution(
    logits_BV: torch.Tensor, params: SamplingParams, history_BS: torch.Tensor | None = None
) -> torch.Tensor:
    """The probabilities sampling draws from (one-hot on the argmax when greedy)."""
    logits_BV = logits_BV.float()
    if history_BS is not None:
        logits_BV = apply_repetition_penalty(logits_BV, history_BS, params.repetition_penalty)
    if params.greedy:
        return torch.nn.functional.one_hot(logits_BV.argmax(dim=-1), logits_BV.shape[-1]).float()
    logits_BV = filter_logits(logits_BV / params.temperature, params.top_k, params.top_p, params.min_p)
    return logits_BV.softmax(dim=-1)


def sample(
    logits_BV: torch.Tensor,
    params: SamplingParams,
    generators: list[torch.Generator] | torch.Generator | None = None,
    history_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token id per row [B]. `generators`: one per row (per request) or one for the whole batch."""
    if params.greedy:
        logits_BV = logits_BV.float()
        if history_BS is not None:
            logits_BV = apply_repetition_penalty(logits_BV, history_BS, params.repetition_penalty)
        return logits_BV.argmax(dim=-1)
    return draw(token_distribution(logits_BV, params, history_BS), generators)


def draw(probs_BV: torch.Tensor, generators: list[torch.Generator] | torch.Generator | None = None) -> torch.Tensor:
    """Sample one id per row from probabilities, with per-row generators when given."""
    if isinstance(generators, list):
        rows = [torch.multinomial(row, 1, generator=g) for row, g in zip(probs_BV, generators, strict=True)]
        return torch.cat(rows)
    return torch.multinomial(probs_BV, 1, generator=generators).squeeze(-1)

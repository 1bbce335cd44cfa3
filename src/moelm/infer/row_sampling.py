"""Sampling for a whole batch at once, on the logits' device, with every row's own settings and seed.

Each row carries its own temperature, top-k, top-p, min-p and repetition penalty as tensors, so one set of
kernels samples a batch of requests with different parameters; greedy rows take the argmax. The random number
a row draws for its n-th token is a pure function of (the row's seed, n) computed by an integer hash on the
device (a counter-based generator, the idea behind Philox): no generator object per row, no host round trip,
and a seeded request draws the same numbers alone or in any batch, in any row. A draw picks the token by
inverse CDF over the filtered distribution, in sorted order for a row that filters by rank (top-k, top-p) and
in vocabulary order for any other, whatever its neighbours do; the distribution is exactly the one
`sampling.token_distribution` describes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moelm.infer.sampling import SamplingParams

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for x < 2^32 in int64, split in 16-bit halves so no product overflows."""
    low = (x & 0xFFFF) * constant
    high = (((x >> 16) * constant) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (xor-shift-multiply, Wellons' lowbias32 constants)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seed_B: torch.Tensor, counter_B: torch.Tensor) -> torch.Tensor:
    """A float64 uniform in [0, 1) per row, determined by (seed, counter) alone (53 random bits)."""
    seed_B, counter_B = seed_B.long(), counter_B.long()
    key = _mix32((seed_B & _MASK32) ^ _mix32(((seed_B >> 32) & _MASK32) ^ 0x9E3779B9))
    state = _mix32(key ^ _mix32((counter_B & _MASK32) ^ 0x85EBCA6B))
    first, second = _mix32(state ^ 0x2545F491), _mix32(state ^ 0x68E31DA4)
    return ((first >> 5).double() * 67108864.0 + (second >> 6).double()) / 9007199254740992.0


class RowSettings:
    """Per-row sampling settings of a batch as device tensors (a row of a continuous batch is one request)."""

    def __init__(self, rows: int, device: torch.device | str = "cpu") -> None:
        self.temperature = torch.zeros(rows, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)
        self.top_p = torch.ones(rows, device=device)
        self.min_p = torch.zeros(rows, device=device)
        self.penalty = torch.ones(rows, device=device)
        self.seed = torch.zeros(rows, dtype=torch.long, device=device)
        self.drawn = torch.zeros(rows, dtype=torch.long, device=device)  # tokens this row's request has sampled
        self.params: list[SamplingParams | None] = [None] * rows  # host copy: which kernels a batch needs

    @classmethod
    def for_batch(cls, params: SamplingParams, seeds: Sequence[int], device: torch.device | str = "cpu") -> RowSettings:
        settings = cls(len(seeds), device)
        for row, seed in enumerate(seeds):
            settings.assign(row, params, seed)
        return settings

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.temperature, self.top_k, self.top_p, self.min_p, self.penalty, self.seed, self.drawn

    def assign(self, row: int, params: SamplingParams, seed: int) -> None:
        """Give `row` a new request's settings; its draw counter starts at 0."""
        values = (params.temperature, params.top_k, params.top_p, params.min_p, params.repetition_penalty, seed, 0)
        for tensor, value in zip(self._tensors(), values, strict=True):
            tensor[row] = value
        self.params[row] = params

    def move(self, source: int, target: int) -> None:
        for tensor in self._tensors():
            tensor[target] = tensor[source]
        self.params[target] = self.params[source]

    def sample(self, logits_BV: torch.Tensor, seen_BV: torch.Tensor | None = None, first: int = 0) -> torch.Tensor:
        """One token per row of `logits_BV` (rows first..first+B-1 of these settings); advances their draw
        counters."""
        tokens = sample_rows(logits_BV, self, seen_BV, first)
        self.drawn[first : first + logits_BV.shape[0]] += 1
        return tokens


def sample_rows(
    logits_BV: torch.Tensor, settings: RowSettings, seen_BV: torch.Tensor | None = None, first: int = 0
) -> torch.Tensor:
    """Tokens [B] for rows first..first+B-1 of `settings`; `seen_BV` marks tokens the repetition penalty
    applies to."""
    rows = slice(first, first + logits_BV.shape[0])
    params = settings.params[rows]
    logits = logits_BV.float()
    if seen_BV is not None and any(p is not None and p.repetition_penalty != 1.0 for p in params):
        penalty = settings.penalty[rows, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen_BV, penalised, logits)
    greedy = logits.argmax(dim=-1)
    if all(p is None or p.greedy for p in params):
        return greedy
    temperature = settings.temperature[rows]
    is_greedy = temperature == 0
    scaled = logits / torch.where(is_greedy, 1.0, temperature)[:, None]
    ranked = [p is not None and not p.greedy and (p.top_k > 0 or p.top_p < 1.0) for p in params]
    by_rank = any(ranked)
    if by_rank:  # rows that filter by rank draw in sorted order, the others in vocabulary order, batch or not
        order = scaled.argsort(dim=-1, descending=True)
        vocabulary = torch.arange(scaled.shape[-1], device=scaled.device).expand_as(order)
        order = torch.where(torch.tensor(ranked, device=scaled.device)[:, None], order, vocabulary)
        scaled = scaled.gather(1, order)
    probs = scaled.softmax(dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if by_rank:  # top-k 0 and top-p 1 (every row that does not rank) keep everything
        rank = torch.arange(probs.shape[-1], device=probs.device)
        top_k = settings.top_k[rows, None]
        keep &= (top_k == 0) | (rank < top_k)
        # top-p measures mass within the top-k survivors, renormalised (the k filter runs first, as in HF)
        within_k = probs.masked_fill(~keep, 0.0)
        mass_before = (within_k.cumsum(dim=-1) - within_k) / within_k.sum(dim=-1, keepdim=True)
        top_p = settings.top_p[rows, None]
        keep &= (top_p >= 1.0) | (mass_before < top_p)
        keep[:, 0] = True  # the most likely token always survives
    # min-p compares with the most likely token, so it reads the same on filtered or unfiltered probabilities
    keep &= probs >= settings.min_p[rows, None] * probs.max(dim=-1, keepdim=True).values
    cdf = probs.masked_fill(~keep, 0.0).double().cumsum(dim=-1)
    target = counter_uniform(settings.seed[rows], settings.drawn[rows]) * cdf[:, -1]
    index = torch.searchsorted(cdf, target.unsqueeze(1), right=True).clamp(max=probs.shape[-1] - 1).squeeze(1)
    drawn = order.gather(1, index.unsqueeze(1)).squeeze(1) if by_rank else index
    return torch.where(is_greedy, greedy, drawn)

"""OpenAI's per-request logit adjustments for the rows of a continuous batch, applied before sampling.

- logit_bias: a fixed amount added to chosen tokens' logits (-100 bans a token, +100 all but forces it);
- presence_penalty / frequency_penalty: subtracted once per token that already occurs in the request's own
  completion, and once per occurrence (OpenAI's formula, over generated tokens only, as vLLM applies it);
- min_tokens: the end tokens (EOS and the request's stop_token_ids) are banned until that many were generated.
State lives only for the rows that use a rule: the [rows, V] tensors are made on first use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class RowLogitRules:
    """Per-row rule state of a batch whose row i is one request; rows move as the batch compacts."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.rows, self.vocab_size, self.device = rows, vocab_size, device
        self.bias: torch.Tensor | None = None  # [rows, V] added to the logits
        self.counts: torch.Tensor | None = None  # [rows, V] generated occurrences per token
        self.presence = torch.zeros(rows, device=device)
        self.frequency = torch.zeros(rows, device=device)
        self.active = [False] * rows  # host copy: does the row use any rule (skip the work when none does)

    def _table(self, name: str) -> torch.Tensor:
        if getattr(self, name) is None:
            setattr(self, name, torch.zeros(self.rows, self.vocab_size, device=self.device))
        return getattr(self, name)

    def assign(
        self,
        row: int,
        logit_bias: dict[int, float] | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        min_tokens: int = 0,
    ) -> None:
        """Give `row` a new request's rules (its counts start empty)."""
        self.presence[row], self.frequency[row] = presence_penalty, frequency_penalty
        if self.bias is not None or logit_bias:
            bias = self._table("bias")
            bias[row] = 0.0
            if logit_bias:
                ids = torch.tensor(list(logit_bias), device=self.device)
                bias[row, ids] = torch.tensor(list(logit_bias.values()), device=self.device)
        if self.counts is not None:
            self.counts[row] = 0.0
        penalised = presence_penalty != 0.0 or frequency_penalty != 0.0
        if penalised:
            self._table("counts")
        self.active[row] = bool(logit_bias) or penalised or min_tokens > 0

    def move(self, source: int, target: int) -> None:
        self.presence[target], self.frequency[target] = self.presence[source], self.frequency[source]
        for table in (self.bias, self.counts):
            if table is not None:
                table[target] = table[source]
        self.active[target] = self.active[source]

    def apply(
        self, logits_BV: torch.Tensor, first: int, banned_ends: Sequence[Iterable[int]] | None = None
    ) -> torch.Tensor:
        """The logits of rows first..first+B-1 with their rules applied; banned_ends[i]: end tokens row
        first+i may not produce yet (min_tokens)."""
        rows = slice(first, first + logits_BV.shape[0])
        if not any(self.active[rows]):
            return logits_BV
        logits = logits_BV.float()
        if self.bias is not None:
            logits = logits + self.bias[rows]
        if self.counts is not None:
            counts = self.counts[rows]
            logits = logits - self.frequency[rows, None] * counts - self.presence[rows, None] * (counts > 0)
        if banned_ends and any(banned_ends):
            logits = logits.clone()
            for index, ends in enumerate(banned_ends):
                ends = list(ends)
                if ends:
                    logits[index, ends] = float("-inf")
        return logits

    def record(self, first: int, tokens: torch.Tensor) -> None:
        """Count the tokens rows first..first+B-1 just generated."""
        if self.counts is not None:
            rows = torch.arange(first, first + tokens.shape[0], device=self.device)
            self.counts[rows, tokens] += 1.0

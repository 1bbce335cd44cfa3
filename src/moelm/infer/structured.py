"""Structured output: a grammar (JSON schema, any JSON object, a regex, a choice of strings) decides which tokens
a request may sample next, with llguidance (one of vLLM's structured-output backends; the `structured` extra).

A `GrammarFactory` holds the tokenizer as llguidance sees it (built once per tokenizer: about a second); each
request gets a `Constraint`, a matcher that starts at the grammar's beginning, fills the request's row of a token
bitmask before each sampling step and consumes the sampled token after it. The engine applies the bitmask to the
logits of the rows that have one, so a constrained request samples only tokens that keep its text inside the
grammar; EOS is allowed once the grammar accepts and is the only choice when it cannot continue.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice")
# JSON without whitespace between tokens (llguidance's option): a free-whitespace grammar lets a weak model fill
# the output with blank lines until max_tokens, which the demo model here did
COMPACT_JSON = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A grammar that cannot be compiled (the message says why); or llguidance is not installed."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request asks its output to match: kind is one of GRAMMAR_KINDS."""

    kind: str
    value: Any = None  # a schema dict, a regex string or a list of strings; None for json_object
    source: str = "grammar"  # the request field it came from, for error messages

    def grammar(self) -> str:
        """The llguidance grammar text for this spec."""
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.value, defaults=COMPACT_JSON)
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=COMPACT_JSON)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.value)
        if self.kind == "choice":
            return LLMatcher.grammar_from_regex("|".join(f"({re.escape(choice)})" for choice in self.value))
        raise GrammarError(f"unknown grammar kind {self.kind!r}: must be one of {', '.join(GRAMMAR_KINDS)}")


class GrammarFactory:
    """Compiles grammar specs against one tokenizer (`tokenizer_json`: tokenizer.json's text)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        try:
            import llguidance
        except ImportError:
            raise GrammarError("structured output needs llguidance: pip install 'moelm[structured]'") from None
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))

    def constraint(self, spec: GrammarSpec) -> Constraint:
        """A fresh matcher for one request; GrammarError names what is wrong with the grammar."""
        from llguidance import LLMatcher

        try:
            text = spec.grammar()
        except ValueError as error:
            raise GrammarError(str(error)) from None
        matcher = LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return Constraint(matcher)


class Constraint:
    """One request's position in its grammar."""

    def __init__(self, matcher: Any) -> None:  # llguidance.LLMatcher
        self.matcher = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into `bitmask` row `row` (llguidance's packed int32 layout)."""
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, bitmask, row)

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """The grammar reached its end (nothing may follow) or an error state."""
        return self.matcher.is_stopped() or self.matcher.is_error()


def masked_logits(logits_BV: torch.Tensor, constraints: Sequence[Constraint | None]) -> torch.Tensor:
    """The logits with every constrained row's disallowed tokens at -inf (rows without a constraint as they are)."""
    if not any(c is not None for c in constraints):
        return logits_BV
    from llguidance.torch import allocate_token_bitmask, apply_token_bitmask_inplace

    rows = [i for i, c in enumerate(constraints) if c is not None]
    bitmask = allocate_token_bitmask(len(rows), logits_BV.shape[-1])
    for index, row in enumerate(rows):
        constraints[row].fill(bitmask, index)
    masked = logits_BV.float().clone()
    constrained = masked[rows]
    apply_token_bitmask_inplace(constrained, bitmask.to(constrained.device))
    masked[rows] = constrained
    return masked


def choice_spec(choices: list[str]) -> GrammarSpec:
    return GrammarSpec("choice", list(choices))


def schema_spec(schema: dict[str, Any] | str) -> GrammarSpec:
    return GrammarSpec("json_schema", json.loads(schema) if isinstance(schema, str) else schema)

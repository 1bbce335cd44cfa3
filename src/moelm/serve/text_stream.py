"""Generated tokens -> the text a client sees: reasoning split from the answer, stop strings, streaming deltas.

A reasoning model writes `<think>\\n...\\n</think>\\n answer`. As DeepSeek's API does, chat responses return the
part inside the tags as `reasoning_content` and the rest as `content`; the split is made on the tag tokens
(special tokens of moelm's tokenizer), so each part is decoded on its own. Stop strings end the answer (the
stop string itself is not returned). Streaming emits only text that can no longer change: a trailing partial
character, the start of a stop string, or newlines that may turn out to precede `</think>` are held back until
the next token decides them, so the streamed pieces always add up to the full response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moelm.infer.text import THINK_CLOSE, THINK_OPEN, TextGenerator, cut_at_stop


@dataclass
class Parts:
    """Visible text of one completion so far."""

    reasoning: str
    content: str


class TextStream:
    """Turns one completion's tokens into (reasoning, content) text, whole or as deltas."""

    def __init__(
        self,
        generator: TextGenerator,
        stop: Sequence[str] = (),
        split_reasoning: bool = False,
        starts_in_reasoning: bool = False,
    ) -> None:
        self.generator = generator
        self.stop = list(stop)
        tokenizer = generator.tokenizer
        self.open_id = tokenizer.token_to_id(THINK_OPEN) if split_reasoning else None
        self.close_id = tokenizer.token_to_id(THINK_CLOSE) if split_reasoning else None
        self.starts_in_reasoning = starts_in_reasoning and self.close_id is not None
        self.sent = Parts("", "")

    def _split_tokens(self, tokens: Sequence[int]) -> tuple[list[int], list[int], bool]:
        """(reasoning tokens, content tokens, reasoning closed?) at the tag tokens."""
        if self.close_id is None:
            return [], list(tokens), True
        tokens = list(tokens)
        inside = self.starts_in_reasoning
        if not inside and tokens and tokens[0] == self.open_id:
            inside, tokens = True, tokens[1:]
        if not inside:
            return [], tokens, True
        if self.close_id in tokens:
            cut = tokens.index(self.close_id)
            return tokens[:cut], tokens[cut + 1 :], True
        return tokens, [], False

    def full(self, tokens: Sequence[int]) -> Parts:
        """The whole visible text (what a non-streamed response carries)."""
        return self._visible(tokens, final=True)

    def stopped(self, tokens: Sequence[int]) -> bool:
        """Did the answer reach a stop string?"""
        if not self.stop:
            return False
        _, content, _ = self._split_tokens(tokens)
        text = self.generator.detokenize(content, skip_special_tokens=True)
        return any(s in text for s in self.stop)

    def delta(self, tokens: Sequence[int], final: bool = False) -> Parts:
        """Text that became certain since the last call (final=True releases everything held back)."""
        now = self._visible(tokens, final)
        out = Parts(now.reasoning[len(self.sent.reasoning) :], now.content[len(self.sent.content) :])
        if now.reasoning.startswith(self.sent.reasoning) and now.content.startswith(self.sent.content):
            self.sent = now
            return out
        return Parts("", "")  # cannot happen with the hold-backs below; never send text that would contradict

    def _visible(self, tokens: Sequence[int], final: bool) -> Parts:
        reasoning_ids, content_ids, closed = self._split_tokens(tokens)
        detokenize = self.generator.detokenize
        reasoning = detokenize(reasoning_ids, skip_special_tokens=True).lstrip("\n") if reasoning_ids else ""
        content = detokenize(content_ids, skip_special_tokens=True).lstrip("\n") if content_ids else ""
        if closed or final:
            reasoning = reasoning.rstrip("\n")
        else:
            reasoning = _hold_back(reasoning.rstrip("\n"), final)
        stopped = cut_at_stop(content, self.stop)
        if final or len(stopped) < len(content):
            return Parts(reasoning, stopped)
        return Parts(reasoning, _hold_back(_without_stop_prefix(content, self.stop), final))


def _hold_back(text: str, final: bool) -> str:
    """Text without a trailing replacement character (the first bytes of a character still being decoded)."""
    return text if final else text.rstrip("\ufffd")


def _without_stop_prefix(text: str, stops: Sequence[str]) -> str:
    """Text without its longest ending that could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return text[: len(text) - longest]

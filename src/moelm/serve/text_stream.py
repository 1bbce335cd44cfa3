"""Generated tokens -> the text a client sees: reasoning split from the answer, stop strings, streaming deltas.

A reasoning model writes `<think>\\n...\\n</think>\\n answer`. As DeepSeek's API does, chat responses return the
part inside the tags as `reasoning_content` and the rest as `content`; the split is made on the tag tokens
(special tokens of moelm's tokenizer), so each part is decoded on its own, incrementally (each token decoded
once, `moelm.infer.text.IncrementalDetokenizer`). Stop strings end the answer (the stop string itself is not
returned). Streaming emits only text that can no longer change: a partial character, the start of a stop
string, or newlines that may turn out to precede `</think>` are held back until the next token decides them,
so the streamed pieces always add up to the full response. A completion's text is returned as decoded; a
chat's parts drop the newlines around the tags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moelm.data.tokenizer import THINK_CLOSE, THINK_OPEN
from moelm.infer.text import IncrementalDetokenizer, StopFinder, TextGenerator, cut_at_stop


@dataclass
class Parts:
    """Visible text of one completion so far."""

    reasoning: str
    content: str


class _Reader:
    """One consumer's incremental view of a completion's tokens: the reasoning and the content text, each
    decoded incrementally (the engine thread's stop checks and the event loop's deltas each own one)."""

    def __init__(self, stream: TextStream) -> None:
        self.stream = stream
        tokenizer, eos = stream.generator.tokenizer, stream.generator.eos_ids()
        self.reasoning = IncrementalDetokenizer(tokenizer, stream.skip_special_tokens, eos)
        self.content = IncrementalDetokenizer(tokenizer, stream.skip_special_tokens, eos)
        self.inside = stream.starts_in_reasoning  # inside <think> ... </think>
        self.consumed = 0
        self.content_tokens: set[int] = set()  # positions of the tokens decoded into the content
        self.ended = False

    def read(self, tokens: Sequence[int], final: bool = False) -> None:
        stream = self.stream
        for token in tokens[self.consumed :]:
            if self.ended or token in self.content.stop_ids:
                self.ended = True
                continue
            if self.consumed == 0 and not self.inside and stream.open_id is not None and token == stream.open_id:
                self.inside = True
            elif self.inside and token == stream.close_id:
                self.inside = False
            elif self.inside:
                self.reasoning.push(token)
            else:
                self.content.push(token)
                self.content_tokens.add(self.consumed)
            self.consumed += 1
        self.consumed = len(tokens)
        if final:
            self.reasoning.finish()
            self.content.finish()


class TextStream:
    """Turns one completion's tokens into (reasoning, content) text, whole or as deltas, decoding each token
    once."""

    def __init__(
        self,
        generator: TextGenerator,
        stop: Sequence[str] = (),
        split_reasoning: bool = False,
        starts_in_reasoning: bool = False,
        include_stop: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.generator = generator
        self.stop = list(stop)
        self.include_stop = include_stop  # vLLM's include_stop_str_in_output: the text ends with the stop string
        self.skip_special_tokens = skip_special_tokens
        tokenizer = generator.tokenizer
        self.split_reasoning = split_reasoning
        self.open_id = tokenizer.token_to_id(THINK_OPEN) if split_reasoning else None
        self.close_id = tokenizer.token_to_id(THINK_CLOSE) if split_reasoning else None
        self.starts_in_reasoning = starts_in_reasoning and self.close_id is not None
        self.sent = Parts("", "")
        self._deltas = _Reader(self)  # the event loop's
        self._stop_reader: _Reader | None = None  # the engine thread's
        self._stop_finder = StopFinder(self.stop)

    def full(self, tokens: Sequence[int]) -> Parts:
        """The whole visible text (what a non-streamed response carries)."""
        return self._visible(tokens, final=True)

    def stopped(self, tokens: Sequence[int]) -> bool:
        """Did the answer reach a stop string? (Called with every new token, on the engine thread.)"""
        if not self.stop:
            return False
        if self._stop_reader is None:
            self._stop_reader = _Reader(self)
        self._stop_reader.read(tokens)
        return self._stop_finder.search(self._stop_reader.content.text) is not None

    def delta(self, tokens: Sequence[int], final: bool = False) -> Parts:
        """Text that became certain since the last call (final=True releases everything held back)."""
        now = self._visible(tokens, final)
        out = Parts(now.reasoning[len(self.sent.reasoning) :], now.content[len(self.sent.content) :])
        if now.reasoning.startswith(self.sent.reasoning) and now.content.startswith(self.sent.content):
            self.sent = now
            return out
        return Parts("", "")  # cannot happen with the hold-backs below; never send text that would contradict

    def content_offsets(self, tokens: Sequence[int]) -> list[int]:
        """Where each token's text starts in the returned content, as OpenAI's `text_offset`: a token whose text
        is not part of it (</think>, a reasoning token, one after a stop string or EOS) sits at the offset
        reached so far, so the offsets never pass the end of the text."""
        reader = _Reader(self)  # its own: the delta reader's state belongs to the stream
        returned = self._parts(reader, tokens, final=True).content
        decoded = reader.content.text
        lead = len(decoded) - len(decoded.lstrip("\n")) if self.split_reasoning else 0  # newlines a chat drops
        starts = iter(reader.content.offsets)
        offsets, reached = [], 0
        for position in range(len(tokens)):
            if position in reader.content_tokens:
                reached = max(reached, min(max(next(starts) - lead, 0), len(returned)))
            offsets.append(reached)
        return offsets

    def _visible(self, tokens: Sequence[int], final: bool) -> Parts:
        return self._parts(self._deltas, tokens, final)

    def _parts(self, reader: _Reader, tokens: Sequence[int], final: bool) -> Parts:
        reader.read(tokens, final)
        # the newlines around the tags belong to the format, not to the text (trailing ones of the reasoning
        # are held back until </think> or the end decides them)
        reasoning = reader.reasoning.text.strip("\n")
        content = reader.content.text.lstrip("\n") if self.split_reasoning else reader.content.text
        stopped = cut_at_stop(content, self.stop, include=self.include_stop)
        if final or len(stopped) < len(content):
            return Parts(reasoning, stopped)
        return Parts(reasoning, _without_stop_prefix(content, self.stop))


def _without_stop_prefix(text: str, stops: Sequence[str]) -> str:
    """Text without its longest ending that could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return text[: len(text) - longest]

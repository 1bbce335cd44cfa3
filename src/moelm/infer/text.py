"""Text in, text out: a model directory's tokenizer around the token-level engine.

A model directory is self-contained: `tokenizer.json` (HF tokenizers) sits beside `config.json`. Stop strings
are checked on the decoded text of each sequence; streaming yields text pieces as tokens arrive (a piece is
emitted once it decodes cleanly, so multi-byte characters are never split).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moelm.data.chat import DEFAULT_CHAT_TEMPLATE, has_chat_template, load_chat_template, render_chat
from moelm.data.tokenizer import THINK_CLOSE, THINK_OPEN, load_tokenizer_file
from moelm.infer.compiled import CompiledDecode, compile_decode
from moelm.infer.generate import GenerationStats, generate, left_pad, stream
from moelm.infer.sampling import SamplingParams
from moelm.model.quantize import QUANTIZATIONS, quantize_int8
from moelm.model.transformer import MoELM


def resolve_activation_dtype(
    spec: torch.dtype | str | None, weights: torch.dtype | None, device: torch.device
) -> torch.dtype | None:
    """The activation dtype `spec` stands for with these weights on this device: "auto" is float32 for
    half-precision weights on a CPU and None (the weights' dtype) otherwise; a dtype name or dtype is itself."""
    if spec != "auto":
        return getattr(torch, spec) if isinstance(spec, str) else spec
    half = weights in (torch.bfloat16, torch.float16)
    return torch.float32 if half and device.type == "cpu" else None


@dataclass
class TextGenerator:
    """Generate text from a moelm model directory (or a model and tokenizer in memory)."""

    model: MoELM
    tokenizer: object
    chat_template: str = DEFAULT_CHAT_TEMPLATE
    skip_special_tokens: bool = True  # False keeps <think>/</think> in the text (chat, reasoning evaluation)
    compiled: CompiledDecode | None = None  # set by compile(): decode steps run through a compiled graph
    chat_tuned: bool = True  # False: the directory states no chat template (a base model; replies may be empty)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        activation_dtype: torch.dtype | str | None = "auto",
        quantize: str | None = None,
    ) -> TextGenerator:
        """A generator for a model directory. activation_dtype: the residual stream's dtype; "auto" keeps it
        float32 under bf16 / f16 weights on a CPU (llama.cpp's convention there, see
        MoELM.set_activation_dtype) and in the weights' dtype elsewhere (on GPUs bf16 activations are the norm).
        quantize="int8": weight-only int8 projections (moelm.model.quantize), fast in compiled batch-1 decode."""
        if quantize not in (None, *QUANTIZATIONS):
            raise ValueError(f"invalid quantize={quantize!r}: must be one of {', '.join(QUANTIZATIONS)} or None")
        device = torch.device(device)
        activations = resolve_activation_dtype(activation_dtype, dtype, device)
        model = MoELM.from_pretrained(
            model_dir, dtype=dtype, device=device, mtp=False, float32_norms=activations == torch.float32
        )
        model.set_activation_dtype(activations)
        if quantize == "int8":
            quantize_int8(model.eval())
        tokenizer_file = Path(model_dir) / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found: a model directory needs it to take text prompts")
        template, tuned = load_chat_template(model_dir), has_chat_template(model_dir)
        return cls(model, load_tokenizer_file(tokenizer_file), template, chat_tuned=tuned)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def compile(self, backend: str = "auto") -> TextGenerator:
        """Run decode steps through a compiled graph from now on (see moelm.infer.compiled)."""
        self.compiled = compile_decode(self.model, backend)
        return self

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """The conversation rendered with the model's chat template, ending where the assistant writes."""
        return render_chat(messages, self.chat_template, add_generation_prompt=True)

    def detokenize(self, tokens: list[int], skip_special_tokens: bool | None = None) -> str:
        """Text of generated tokens up to (not including) the first EOS; specials kept or dropped as asked
        (default: the generator's `skip_special_tokens`)."""
        eos = set(self.eos_ids())
        kept = []
        for token in tokens:
            if token in eos:
                break
            kept.append(token)
        skip = self.skip_special_tokens if skip_special_tokens is None else skip_special_tokens
        return self.tokenizer.decode(kept, skip_special_tokens=skip)

    def eos_ids(self) -> list[int]:
        ids = [self.model.config.eos_token_id] if self.model.config.eos_token_id is not None else []
        for token in ("</s>", "<|endoftext|>", "<|eos|>"):
            token_id = self.tokenizer.token_to_id(token)
            if token_id is not None:
                ids.append(token_id)
        return ids

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        params: SamplingParams | None = None,
        stop_strings: Sequence[str] = (),
        seed: int | None = None,
        stats: GenerationStats | None = None,
        speculative: bool = False,
    ) -> Iterator[str]:
        """Yield decoded text pieces of one completion as they are produced (they add up to the whole text,
        cut before the first stop string)."""
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        text = IncrementalDetokenizer(self.tokenizer, self.skip_special_tokens, self.eos_ids())
        stops = StopFinder(stop_strings)

        def read(_row: int, tokens: list[int]) -> bool:  # each new token, in order, on this thread
            text.push(tokens[-1])
            return stops.search(text.text) is not None

        steps = stream(
            self.model,
            torch.tensor([ids], device=self.device),
            max_new_tokens,
            params,
            eos_token_id=self.eos_ids(),
            stop=read,
            seed=seed,
            speculative=speculative,
            stats=stats,
            compiled=self.compiled,
        )
        emitted = 0
        for _ in steps:
            visible = text.text[: stops.cut] if stops.cut is not None else text.text
            if len(visible) > emitted:
                yield visible[emitted:]
                emitted = len(visible)
        text.finish()  # whatever was held back for a partial character
        cut = stops.search(text.text)
        final = text.text if cut is None else text.text[:cut]
        if len(final) > emitted:
            yield final[emitted:]

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        skip_special_tokens: bool | None = None,
        **kwargs,  # noqa: ANN003
    ) -> list[str]:
        """Completions for a batch of prompts (left-padded into one batch)."""
        encoded = [self.tokenizer.encode(p).ids for p in prompts]
        ids, mask = left_pad(encoded)
        ids, mask = ids.to(self.device), mask.to(self.device)
        kwargs.setdefault("compiled", self.compiled)
        out = generate(self.model, ids, max_new_tokens, attention_mask=mask, eos_token_id=self.eos_ids(), **kwargs)
        return [self.detokenize(row, skip_special_tokens) for row in out[:, ids.shape[1] :].tolist()]


class IncrementalDetokenizer:
    """The text of a growing list of tokens, each new token costing O(1) decoding.

    Decoding the whole list after every token is O(n) per token. Here each push decodes only the tokens since
    the last emitted piece plus the ones before it (the window byte-level BPE needs: a character's bytes can
    span tokens), as `prefix + new` minus `prefix`; a piece ending in a partial character (U+FFFD) waits for
    the next token. The pieces add up to `decode(all tokens)`; `finish()` releases what is still held back.
    Decoding stops for good at the first of `stop_ids` (EOS), which is not part of the text.
    """

    def __init__(self, tokenizer: object, skip_special_tokens: bool = True, stop_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop_ids = frozenset(stop_ids)
        self.tokens: list[int] = []
        self.text = ""
        self.offsets: list[int] = []  # where each pushed token's text starts in `text` (after it is released)
        self.ended = False
        self._prefix_start = 0  # window start: tokens before it never change the text again
        self._read = 0  # tokens whose text is already in `text`

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def push(self, token: int) -> str:
        """Add one token; returns the text that became certain (possibly empty)."""
        if self.ended or token in self.stop_ids:
            self.ended = True
            return ""
        self.tokens.append(token)
        return self._release(final=False)

    def finish(self) -> str:
        """Release text held back for a partial character (the decoding of the tokens as they are)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._read == len(self.tokens):
            return ""
        prefix = self._decode(self.tokens[self._prefix_start : self._read])
        whole = self._decode(self.tokens[self._prefix_start :])
        if not final and (len(whole) <= len(prefix) or whole.endswith("\ufffd")):
            return ""
        piece = whole[len(prefix) :]
        start = len(self.text)
        self.offsets.extend([start] * (len(self.tokens) - self._read))
        self.text += piece
        self._prefix_start, self._read = self._read, len(self.tokens)
        return piece


class StopFinder:
    """Where the first stop string occurs in a growing text, searching only what is new (plus the length of the
    longest stop string, for one that straddles the old end)."""

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stops = [s for s in stop_strings if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.cut: int | None = None  # the first stop string's start, once found
        self._searched = 0

    def search(self, text: str) -> int | None:
        if self.cut is None and self.stops:
            start = max(0, self._searched - self.longest + 1)
            found = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
            self.cut = min(found) if found else None
            self._searched = len(text)
        return self.cut


def cut_at_stop(text: str, stop_strings: Sequence[str], include: bool = False) -> str:
    """The text before the first occurrence of any stop string (through it, with include: vLLM's
    include_stop_str_in_output; of stop strings starting at the same place, the longest)."""
    found = [(text.index(s), -len(s)) for s in stop_strings if s in text]
    if not found:
        return text
    start, minus_length = min(found)
    return text[: start - minus_length] if include else text[:start]


def render_thinking(text: str, show: bool, inside: bool, dim: bool = True) -> tuple[str, bool]:
    """ANSI-dim the parts of a streamed piece inside <think>...</think> (or drop them when show=False).

    `dim=False` keeps the reasoning as plain text, for output that is not a colour terminal.
    """
    out = []
    while text:
        marker = THINK_CLOSE if inside else THINK_OPEN
        head, found, text = text.partition(marker)
        if inside:
            out.append("" if not (show and head) else f"\033[2m{head}\033[0m" if dim else head)
        else:
            out.append(head)
        if found and show and not dim:
            out.append(marker)
        if found:
            inside = not inside
    return "".join(out), inside

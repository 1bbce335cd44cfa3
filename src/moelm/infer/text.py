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
from moelm.data.tokenizer import load_tokenizer_file
from moelm.infer.compiled import CompiledDecode, compile_decode
from moelm.infer.generate import GenerationStats, generate, left_pad, stream
from moelm.infer.sampling import SamplingParams
from moelm.model.transformer import MoELM

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


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
        cls, model_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> TextGenerator:
        model = MoELM.from_pretrained(model_dir, dtype=dtype, device=device, mtp=False)
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
        """Yield decoded text pieces of one completion as they are produced."""
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        new: list[int] = []
        emitted = ""

        def hit_stop(_row: int, tokens: list[int]) -> bool:
            text = self.detokenize(tokens)
            return any(s in text for s in stop_strings)

        steps = stream(
            self.model,
            torch.tensor([ids], device=self.device),
            max_new_tokens,
            params,
            eos_token_id=self.eos_ids(),
            stop=hit_stop if stop_strings else None,
            seed=seed,
            speculative=speculative,
            stats=stats,
            compiled=self.compiled,
        )
        for step in steps:
            new.extend(step.tokens_BN[0].tolist())
            text = cut_at_stop(self.detokenize(new), stop_strings)
            if text.startswith(emitted) and not text.endswith("\ufffd"):
                yield text[len(emitted) :]
                emitted = text
        text = cut_at_stop(self.detokenize(new), stop_strings)
        if text != emitted and text.startswith(emitted):  # whatever was held back for a partial character
            yield text[len(emitted) :]

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


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    cuts = [text.index(s) for s in stop_strings if s in text]
    return text[: min(cuts)] if cuts else text


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

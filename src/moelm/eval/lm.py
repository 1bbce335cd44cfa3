"""The requests every task makes of a model, with lm-evaluation-harness's tokenisation and truncation rules.

- generate-until: prompts cut from the left to leave room for the new tokens (the harness's rule: the question
  at the end survives, the oldest few-shot examples go), run through the continuous-batching engine (a row that
  stops early is replaced at once; decode steps compiled when the generator is).
- log-likelihood of a continuation: trailing spaces of the context move to the continuation, context +
  continuation are encoded together and split where the context's own encoding ends, an empty context is
  replaced by the prefix token (BOS, else EOS), and the input is cut to the model's last positions; requests that
  feed the same tokens share one forward (the four one-token answers of a multiple-choice question cost one).
- rolling log-likelihood of a whole text: disjoint windows of the model's length, each after the prefix token or
  the end of the previous window, every token predicted once.

These are the harness's `hf` backend rules, so the same model directory gives the same per-request numbers
through `moelm eval`, `lm_eval --model moelm` and `lm_eval --model hf`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moelm.infer.engine import Engine, EngineRequest, TokenEvent
from moelm.infer.prefix_cache import PrefixCache
from moelm.infer.sampling import SamplingParams
from moelm.infer.text import IncrementalDetokenizer, StopFinder, TextGenerator, cut_at_stop

TokenPair = tuple[list[int], list[int]]  # (context ids, continuation ids)


@dataclass
class EvalModel:
    """A TextGenerator with batched generate-until and log-likelihood scoring."""

    generator: TextGenerator
    batch_size: int = 8
    progress: Callable[[int], None] | None = None
    # Told how many requests a call is about to run, so a progress bar can show a total before they finish.
    expect: Callable[[int], None] | None = None
    prefix_caching: bool = True  # few-shot prompts share their examples: prefilled once per call

    @property
    def max_length(self) -> int:
        return self.generator.model.config.max_position_embeddings

    @property
    def prefix_token_id(self) -> int:
        """What stands before a text with no context: BOS when the model has one, else EOS (the harness's rule)."""
        config = self.generator.model.config
        token = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
        if token is None:
            raise ValueError("the model config names neither bos_token_id nor eos_token_id (needed as a prefix)")
        return int(token)

    def encode(self, text: str) -> list[int]:
        return self.generator.tokenizer.encode(text).ids

    def encode_pair(self, context: str, continuation: str) -> TokenPair:
        """Context and continuation ids as the harness splits them (see the module docstring)."""
        if context == "":
            ids = self.encode(continuation)
            if ids and ids[0] == self.prefix_token_id:
                return ids[:1], ids[1:]
            return [self.prefix_token_id], ids
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, context_ids = self.encode(context + continuation), self.encode(context)
        return context_ids, whole[len(context_ids) :]

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        skip_special: bool = True,
    ) -> list[str]:
        """Completions cut at the first stop string; request i is sampled with seed + i (reproducible).

        `skip_special` drops special tokens from the text as the harness's backend does; the R1-format task keeps
        them so that </think> reaches its answer extraction.
        """
        if max_new_tokens >= self.max_length:
            raise ValueError(
                f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's {self.max_length} "
                "positions: pass a smaller --max-new-tokens"
            )
        budget = self.max_length - max_new_tokens
        encoded = [self.encode(p)[-budget:] or [self.prefix_token_id] for p in prompts]
        params = SamplingParams(temperature=temperature, top_p=top_p)
        if self.expect is not None:
            self.expect(len(encoded))
        rows = self._generate_continuous(encoded, max_new_tokens, stop, params, seed)
        return [cut_at_stop(self.generator.detokenize(row, skip_special_tokens=skip_special), stop) for row in rows]

    def _stop_check(self, stop: Sequence[str]) -> Callable[[list[int]], bool] | None:
        """A request's stop check: its text decoded incrementally (each token once) and searched only where new
        text arrived; called by the engine with every new token, in order."""
        if not stop:
            return None
        text = IncrementalDetokenizer(self.generator.tokenizer, skip_special_tokens=False)
        finder = StopFinder(stop)

        def hit(tokens: list[int]) -> bool:
            text.push(tokens[-1])
            return finder.search(text.text) is not None

        return hit

    def _generate_continuous(
        self, encoded: list[list[int]], max_new_tokens: int, stop: Sequence[str], params: SamplingParams, seed: int
    ) -> list[list[int]]:
        """Every prompt through one engine, stepped here: a row that stops early is replaced at once, and decode
        steps run through the generator's compiled graph when it has one."""
        model = self.generator.model
        engine = Engine(
            model,
            self.generator.eos_ids(),
            max_batch=self.batch_size,
            max_waiting=len(encoded) + 1,
            pad_token_id=model.config.pad_token_id or 0,
            compiled=self.generator.compiled,
            prefix_cache=PrefixCache() if self.prefix_caching else None,
        )
        errors: list[str] = []

        def on_event(event: TokenEvent) -> None:
            if event.error is not None:
                errors.append(event.error)
            if event.finish_reason is not None and self.progress is not None:
                self.progress(1)

        requests = [
            EngineRequest(ids, max_new_tokens, on_event, params, seed=seed + i, stop=self._stop_check(stop))
            for i, ids in enumerate(encoded)
        ]
        for request in requests:
            engine.add(request)
        with torch.inference_mode():
            while engine.busy:
                engine.step()
        if errors:
            raise RuntimeError(errors[0])
        return [request.new_tokens for request in requests]

    # ------------------------------------------------------------------ scoring
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """Sum of log p(continuation | context) per (context, continuation) text pair."""
        return [score for score, _ in self.loglikelihood_greedy(requests)]

    def loglikelihood_greedy(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(log-likelihood, whether greedy decoding would produce the continuation) per text pair."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Log-likelihood of each whole text after the prefix token, in windows of the model's length."""
        windows = [(index, pair) for index, text in enumerate(texts) for pair in self.rolling_windows(text)]
        scores = self.loglikelihood_tokens([pair for _, pair in windows])
        totals = [0.0] * len(texts)
        for (index, _), (score, _) in zip(windows, scores, strict=True):
            totals[index] += score
        return totals

    def rolling_windows(self, text: str) -> Iterator[TokenPair]:
        """Disjoint (context, continuation) windows covering every token of the text exactly once.

        The first window predicts up to max_length tokens after the prefix token; each later one predicts the
        next tokens with as many preceding tokens as fit as its context, so every window is a full model length.
        """
        tokens, length = self.encode(text), self.max_length
        if not tokens:
            return
        first = min(length, len(tokens))
        yield [self.prefix_token_id], tokens[:first]
        done = first
        while done < len(tokens):
            end = min(len(tokens), done + length)
            yield tokens[max(0, end - length - 1) : done], tokens[done:end]
            done = end

    @torch.no_grad()
    def loglikelihood_tokens(self, requests: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        """Scores of tokenised (context, continuation) pairs; inputs longer than the model keep their end.

        Only the tokens before the last are fed, and requests whose fed tokens coincide share one forward.
        """
        pieces = []
        for context, continuation in requests:
            ids = (list(context) + list(continuation))[-(self.max_length + 1) :]
            pieces.append((ids, min(len(continuation), len(ids) - 1)))
        sharing: dict[tuple[int, ...], list[int]] = {}
        for index, (ids, _) in enumerate(pieces):
            sharing.setdefault(tuple(ids[:-1]), []).append(index)
        inputs = sorted((key for key in sharing if key), key=len)
        if self.expect is not None:
            self.expect(sum(len(sharing[key]) for key in inputs))
        results = [(0.0, True)] * len(requests)  # an empty input means an empty continuation: log-likelihood 0
        model = self.generator.model
        device = self.generator.device
        for first in range(0, len(inputs), self.batch_size):
            rows = inputs[first : first + self.batch_size]
            width = max(len(key) for key in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, key in enumerate(rows):
                ids[r, : len(key)] = torch.tensor(key)
                mask[r, : len(key)] = 1
            logits = model(ids.to(device), attention_mask=mask.to(device)).logits.float()
            logprobs = F.log_softmax(logits, dim=-1).cpu()
            done = 0
            for r, key in enumerate(rows):
                for i in sharing[key]:
                    seq, n_cont = pieces[i]
                    positions = torch.arange(len(seq) - 1 - n_cont, len(seq) - 1)
                    target = torch.tensor(seq[len(seq) - n_cont :])
                    chosen = logprobs[r, positions]
                    greedy = bool((chosen.argmax(-1) == target).all())
                    results[i] = (float(chosen[torch.arange(n_cont), target].sum()), greedy)
                    done += 1
            if self.progress is not None:
                self.progress(done)
        return results

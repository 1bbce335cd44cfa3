"""The two requests every task makes of a model: generate until a stop string, and score a continuation.

Prompts longer than the model's positions are cut from the left (the harness's convention: the question at the
end survives, the oldest few-shot examples go). Batches are formed from prompts of similar length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moelm.infer.generate import left_pad, stream
from moelm.infer.sampling import SamplingParams
from moelm.infer.text import TextGenerator, cut_at_stop


@dataclass
class EvalModel:
    """A TextGenerator with batched generate-until and log-likelihood scoring."""

    generator: TextGenerator
    batch_size: int = 8
    progress: Callable[[int], None] | None = None

    @property
    def max_length(self) -> int:
        return self.generator.model.config.max_position_embeddings

    def _encode(self, text: str) -> list[int]:
        return self.generator.tokenizer.encode(text).ids

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[str]:
        """Completions cut at the first stop string; request i is sampled with seed + i (reproducible)."""
        budget = max(1, self.max_length - max_new_tokens)
        encoded = [self._encode(p)[-budget:] or [0] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        outputs: list[str] = [""] * len(prompts)
        model = self.generator.model
        eos = self.generator.eos_ids()
        for first in range(0, len(order), self.batch_size):
            rows = order[first : first + self.batch_size]
            ids, mask = left_pad([encoded[i] for i in rows], model.config.pad_token_id or 0)
            ids, mask = ids.to(self.generator.device), mask.to(self.generator.device)

            def hit_stop(_row: int, tokens: list[int]) -> bool:
                tail = self.generator.tokenizer.decode(tokens[-24:], skip_special_tokens=False)
                return any(s in tail for s in stop)

            steps = stream(
                model,
                ids,
                max_new_tokens,
                SamplingParams(temperature=temperature, top_p=top_p),
                attention_mask=mask,
                eos_token_id=eos,
                stop=hit_stop if stop else None,
                generators=[torch.Generator().manual_seed(seed + i) for i in rows],
                compiled=self.generator.compiled,
            )
            new = torch.cat([step.tokens_BN for step in steps], dim=1)
            for i, row in zip(rows, new.tolist(), strict=True):
                # specials kept: <think>/</think> must reach the answer extraction
                outputs[i] = cut_at_stop(self.generator.detokenize(row, skip_special_tokens=False), stop)
            if self.progress is not None:
                self.progress(len(rows))
        return outputs

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """Sum of log p(continuation | context) per request, context and continuation encoded separately.

        Only the tokens before the last are fed, and requests whose fed tokens coincide share one forward: the
        four single-token answers of a multiple-choice question cost one pass over its prompt, not four.
        """
        pieces = []
        for context, continuation in requests:
            ctx, cont = self._encode(context), self._encode(continuation)
            ids = (ctx + cont)[-(self.max_length + 1) :]
            pieces.append((ids, min(len(cont), len(ids) - 1)))
        sharing: dict[tuple[int, ...], list[int]] = {}
        for index, (ids, _) in enumerate(pieces):
            sharing.setdefault(tuple(ids[:-1]), []).append(index)
        inputs = sorted((key for key in sharing if key), key=len)
        scores = [0.0] * len(requests)  # an empty input means an empty continuation: log-likelihood 0
        model = self.generator.model
        for first in range(0, len(inputs), self.batch_size):
            rows = inputs[first : first + self.batch_size]
            width = max(len(key) for key in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, key in enumerate(rows):
                ids[r, : len(key)] = torch.tensor(key)
                mask[r, : len(key)] = 1
            device = self.generator.device
            logprobs = F.log_softmax(model(ids.to(device), attention_mask=mask.to(device)).logits.float(), dim=-1)
            logprobs = logprobs.cpu()
            done = 0
            for r, key in enumerate(rows):
                for i in sharing[key]:
                    seq, n_cont = pieces[i]
                    positions = torch.arange(len(seq) - 1 - n_cont, len(seq) - 1)
                    scores[i] = float(logprobs[r, positions, torch.tensor(seq[len(seq) - n_cont :])].sum())
                    done += 1
            if self.progress is not None:
                self.progress(done)
        return scores

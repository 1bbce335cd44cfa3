"""GRPO prompts: where they come from, and which are drawn for the next rollout.

Most rollout groups of a small model carry no gradient: every completion is right (a prompt already mastered)
or every one is wrong (a prompt out of reach), so the group's rewards are equal and its advantages zero.
`PromptSampler` keeps each training prompt's observed pass rate and prefers prompts whose rate lies strictly
inside (0, 1) (unseen prompts count as promising), and, as a curriculum, draws only from the easiest difficulty
levels until the model passes them often enough. Its state is part of the checkpoint, so a resumed run draws
what the uninterrupted run would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moelm.config import ConfigError
from moelm.data.builtin import builtin_corpus
from moelm.data.source_specs import BuiltinSource, JsonlSource, SourceSpec
from moelm.data.sources import DataError, jsonl_records


@dataclass
class Prompt:
    """One task to reinforce: what the model is asked, and what its answer is checked against."""

    text: str  # the question (rendered through the chat template when grpo.chat_template)
    answer: str | None
    domain: str | None
    tests: list[str] | None = None
    difficulty: int = 1


def load_prompts(sources: list[SourceSpec]) -> list[Prompt]:
    """Prompts from builtin records (math, logic, code with its asserts) or JSONL {prompt, answer[, tests]}."""
    prompts: list[Prompt] = []
    for number, source in enumerate(sources):
        if isinstance(source, BuiltinSource):
            hardest = source.max_difficulty or 99
            records = builtin_corpus(source.num_records, seed=source.seed, domains=tuple(source.domains))
            for record in (r for r in records if r.difficulty <= hardest):
                tests = record.text.split("\n\n\n", 1)[1].strip().splitlines() if record.domain == "code" else None
                prompts.append(Prompt(record.prompt, record.answer, record.domain, tests, record.difficulty))
        elif isinstance(source, JsonlSource):
            path = Path(source.path)
            for line, row in jsonl_records(path):
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise DataError(f"{path}:{line}: expected an object with a string 'prompt'")
                answer = row.get("answer")
                tests = row.get("tests")
                prompts.append(Prompt(row["prompt"], None if answer is None else str(answer), row.get("domain"), tests))
        else:
            raise ConfigError(f"grpo.sources[{number}] needs format builtin or jsonl, got {source.format!r}")
    if not prompts:
        raise DataError("the GRPO sources hold no prompts")
    return prompts


@dataclass
class PromptSampler:
    """Draws training prompts uniformly, or weighted by how informative their groups are likely to be.

    weighted: a prompt seen before weighs 4 p (1 - p) for its pass rate p, at least `floor` (so a mastered or
    hopeless prompt is still revisited now and then); an unseen prompt weighs 1. curriculum: only prompts up to
    the current difficulty level are drawn; the next level opens when the pass rate over the drawn levels
    reaches `unlock_at`.
    """

    prompts: list[Prompt]
    weighted: bool = False
    curriculum: bool = False
    unlock_at: float = 0.6
    floor: float = 0.05
    passes: np.ndarray = field(init=False)
    tries: np.ndarray = field(init=False)
    level: int = field(init=False)

    def __post_init__(self) -> None:
        self.passes = np.zeros(len(self.prompts))
        self.tries = np.zeros(len(self.prompts))
        self.difficulty = np.array([p.difficulty for p in self.prompts])
        self.levels = sorted(set(self.difficulty.tolist()))
        self.level = self.levels[0] if self.curriculum else self.levels[-1]

    def draw(self, rng: np.random.Generator, count: int) -> list[int]:
        """`count` prompt indices (with replacement, as the uniform draw always was)."""
        if not self.weighted and not self.curriculum:
            return rng.choice(len(self.prompts), count).tolist()
        eligible = np.flatnonzero(self.difficulty <= self.level)
        weights = np.ones(len(eligible))
        if self.weighted:
            seen = self.tries[eligible] > 0
            rate = self.passes[eligible] / np.maximum(self.tries[eligible], 1)
            weights = np.where(seen, np.maximum(4 * rate * (1 - rate), self.floor), 1.0)
        return rng.choice(eligible, count, p=weights / weights.sum()).tolist()

    def observe(self, indices: list[int], passed: list[list[bool]]) -> None:
        """Record each drawn prompt's completions (passed or not), then open the next level if it is earned."""
        for index, results in zip(indices, passed, strict=True):
            self.passes[index] += sum(results)
            self.tries[index] += len(results)
        if self.curriculum and self.level < self.levels[-1]:
            open_levels = self.difficulty <= self.level
            tries = self.tries[open_levels].sum()
            if tries and self.passes[open_levels].sum() / tries >= self.unlock_at:
                self.level = next(level for level in self.levels if level > self.level)

    def metrics(self) -> dict[str, float]:
        seen = self.tries > 0
        rate = self.passes[seen] / self.tries[seen]
        return {
            "prompts/level": float(self.level),
            "prompts/seen": float(seen.sum()),
            "prompts/pass_rate": float(self.passes.sum() / max(self.tries.sum(), 1)),
            "prompts/inside_share": float(((rate > 0) & (rate < 1)).mean()) if len(rate) else 0.0,
        }

    def state(self) -> dict[str, Any]:
        return {"passes": self.passes.tolist(), "tries": self.tries.tolist(), "level": self.level}

    def load_state(self, state: dict[str, Any]) -> None:
        self.passes = np.asarray(state["passes"], dtype=np.float64)
        self.tries = np.asarray(state["tries"], dtype=np.float64)
        self.level = int(state["level"])

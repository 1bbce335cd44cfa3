"""Verifiable rewards: plain functions `f(prompts, completions, **columns) -> list[float | None]`.

Columns carry what a task knows about each prompt (`answer`, `domain`, `tests`, `completion_tokens`, ...),
repeated for each of a prompt's completions. `None` means "cannot judge" (no parseable gold answer, no tests):
the trainer leaves it out of the weighted sum instead of rewarding or punishing it. The code reward runs each
test in the hardened sandbox, where only a program that ran to its end passes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from moelm.data.tokenizer import THINK_CLOSE, THINK_OPEN
from moelm.eval.exact_match import normalise
from moelm.eval.metrics import INVALID, gsm8k_flexible, gsm8k_strict
from moelm.eval.sandbox import SandboxLimits, run_programs

Reward = Callable[..., list[float | None]]
R1_FORMAT = re.compile(r"^\s*<think>(?:(?!<think>|</think>).)*</think>\s*(?:(?!<think>|</think>)\S)", re.DOTALL)


def answer_part(completion: str) -> str:
    """What a completion answers: the text after its last </think>, or all of it without reasoning tags."""
    return completion.rsplit(THINK_CLOSE, 1)[-1] if THINK_CLOSE in completion else completion


def extract_answer(completion: str, domain: str | None = None) -> str:
    """The final answer: "#### n" or the last number for math (GSM8K rules), else the trimmed answer text."""
    text = answer_part(completion)
    if domain in ("math", "gsm8k"):
        strict = gsm8k_strict(text)
        return strict if strict != INVALID else gsm8k_flexible(text)
    first_line = text.strip().split("\n", 1)[0] if text.strip() else ""
    return normalise(first_line)


def accuracy_reward(
    prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any] | None = None, **columns: Any
) -> list[float | None]:
    """1 when the final answer equals the gold answer, else 0; None when there is no usable gold answer.

    The answer counts only outside the reasoning: an answer written inside <think> but not after it scores 0.
    """
    domains = columns.get("domain") or [None] * len(completions)
    rewards: list[float | None] = []
    for index, completion in enumerate(completions):
        gold = None if answer is None else answer[index]
        if gold is None or str(gold).strip() == "" or domains[index] == "code":
            rewards.append(None)
            continue
        gold_text = normalise(str(gold))
        predicted = extract_answer(completion, domains[index])
        if domains[index] in ("math", "gsm8k"):
            predicted = normalise(predicted)
        rewards.append(1.0 if predicted == gold_text else 0.0)
    return rewards


def format_reward(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float | None]:
    """R1's format: one <think>…</think> block first, nothing nested, then a non-empty answer."""
    return [
        1.0 if R1_FORMAT.match(c) and c.count(THINK_OPEN) == 1 == c.count(THINK_CLOSE) else 0.0 for c in completions
    ]


def tag_count_reward(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float | None]:
    """A quarter each for: exactly one <think>, exactly one </think>, in that order, and text after it."""
    rewards: list[float | None] = []
    for completion in completions:
        score = 0.25 * (completion.count(THINK_OPEN) == 1) + 0.25 * (completion.count(THINK_CLOSE) == 1)
        opened, closed = completion.find(THINK_OPEN), completion.find(THINK_CLOSE)
        score += 0.25 * (0 <= opened < closed)
        score += 0.25 * bool(completion.rsplit(THINK_CLOSE, 1)[-1].strip()) * (closed >= 0)
        rewards.append(score)
    return rewards


def code_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    tests: Sequence[Sequence[str] | None] | None = None,
    limits: SandboxLimits | None = None,
    **columns: Any,
) -> list[float | None]:
    """Share of a completion's tests that pass, each test its own sandboxed program (prompt + body + one test).

    None for prompts without tests. Each program must run to its end to pass, so a completion that exits early
    with status 0 scores nothing.
    """
    limits = limits or SandboxLimits(timeout_s=5, cpu_s=5)
    programs, owners = [], []
    for index, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        for test in (tests[index] if tests is not None else None) or []:
            programs.append(f"{code_source(prompt, answer_part(completion))}\n\n{test}\n")
            owners.append(index)
    results = run_programs(programs, limits) if programs else []
    passed: dict[int, list[bool]] = {}
    for owner, result in zip(owners, results, strict=True):
        passed.setdefault(owner, []).append(result.passed)
    return [sum(passed[i]) / len(passed[i]) if i in passed else None for i in range(len(completions))]


def code_source(prompt: str, body: str) -> str:
    """The function a completion finishes: its header from the prompt's last `def` onwards, then the body."""
    header = prompt[prompt.rfind("def ") :] if "def " in prompt else prompt
    body = body if body.startswith((" ", "\t")) else "    " + body.lstrip()
    return f"{header}{body}"


def overlong_penalty(max_tokens: int, cache_tokens: int) -> Reward:
    """DAPO's soft overlong penalty: 0 up to max - cache tokens, then linearly down to -1 at max (and beyond)."""

    def reward(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float | None]:
        lengths = columns.get("completion_tokens")
        if lengths is None:
            return [None] * len(completions)
        free = max_tokens - cache_tokens
        return [0.0 if n <= free else max(-1.0, (free - n) / max(cache_tokens, 1)) for n in lengths]

    return reward


REWARDS: dict[str, Reward] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "tag_count": tag_count_reward,
    "code": code_reward,
}


def combine(per_function: dict[str, list[float | None]], weights: dict[str, float]) -> list[float]:
    """The weighted sum per completion over the functions that could judge it (None entries left out); NaN where
    no function could judge it, so the advantages leave that completion out (TRL's rule)."""
    count = len(next(iter(per_function.values()))) if per_function else 0
    total = [0.0] * count
    judged = [False] * count
    for name, values in per_function.items():
        for index, value in enumerate(values):
            if value is not None:
                total[index] += weights.get(name, 1.0) * value
                judged[index] = True
    return [value if seen else math.nan for value, seen in zip(total, judged, strict=True)]

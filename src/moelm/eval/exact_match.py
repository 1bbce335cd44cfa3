"""Exact match of a chat model's final answers: what fine-tuning and the built-in tasks are judged by.

The final answer is the text after the last `</think>` (R1 format) or the whole reply when there is none,
whitespace-trimmed, with thousands separators and a trailing period removed, so "1,234." matches "1234".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from moelm.data.tokenizer import THINK_CLOSE


def final_answer(reply: str) -> str:
    """The answer part of a reply: after the last </think>, trimmed and normalised."""
    answer = reply.rsplit(THINK_CLOSE, 1)[-1].strip()
    return normalise(answer)


def normalise(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip()
    if answer.replace(",", "").lstrip("-").replace(".", "", 1).isdigit():
        answer = answer.replace(",", "")
    return answer


def chat_exact_match(
    generator: Any,  # moelm.infer.text.TextGenerator
    examples: Sequence[Any],  # SFTExample-like: messages (last one the gold assistant turn), task, answer
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy replies to each example's conversation (without its last assistant turn), scored per task.

    Returns the metrics (`exact_match` overall and `exact_match/<task>`) and the per-sample records.
    """
    judged = [e for e in examples if e.answer is not None]
    samples: list[dict[str, Any]] = []
    for first in range(0, len(judged), batch_size):
        chunk = judged[first : first + batch_size]
        prompts = [generator.chat_prompt(e.messages[:-1]) for e in chunk]
        # specials kept: the </think> marker must survive decoding
        replies = generator.generate(prompts, max_new_tokens, skip_special_tokens=False)
        for example, reply in zip(chunk, replies, strict=True):
            predicted = final_answer(reply)
            correct = predicted == normalise(str(example.answer))
            samples.append(
                {
                    "task": example.task,
                    "difficulty": example.difficulty,
                    "reply": reply,
                    "predicted": predicted,
                    "correct": correct,
                }
            )
    per_task: dict[str, list[bool]] = defaultdict(list)
    for sample in samples:
        per_task[sample["task"]].append(sample["correct"])
    metrics = {f"exact_match/{task}": sum(v) / len(v) for task, v in sorted(per_task.items())}
    if samples:
        metrics["exact_match"] = sum(s["correct"] for s in samples) / len(samples)
    return metrics, samples

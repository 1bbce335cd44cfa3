"""R1's data stages: rejection sampling of verified reasoning traces, the SFT data for the next round or for
distilling a teacher into a smaller student (`moelm sft` on the traces file).

Each prompt gets G sampled completions from the teacher through the engine; the same reward functions GRPO uses
judge them; the kept ones become SFT records {prompt, reasoning, response} plus their verdict.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moelm.data.source_specs import BuiltinSource, JsonlSource
from moelm.data.sources import DataError, jsonl_records
from moelm.data.tokenizer import THINK_CLOSE, THINK_OPEN
from moelm.eval.metrics import gsm8k_gold
from moelm.infer.text import TextGenerator
from moelm.train.prompts import Prompt, load_prompts
from moelm.train.rewards import accuracy_reward, answer_part, code_reward

KEEP = ("correct", "best", "all")


def trace_prompts(source: str, data_dir: Path | None, limit: int, seed: int) -> list[Prompt]:
    """Prompts with gold answers (or tests) from builtin, gsm8k (train split), mbpp (train ids) or a JSONL path."""
    if source == "builtin":
        spec = BuiltinSource(num_records=limit, seed=seed, domains=["math", "logic", "code"])
        return load_prompts([spec])[:limit]
    if source in ("gsm8k", "mbpp"):
        if data_dir is None:
            raise DataError(f"--source {source} reads local benchmark files: pass --data-dir DIR")
        if source == "gsm8k":
            rows = [row for _, row in jsonl_records(data_dir / "gsm8k" / "train.jsonl")]
            return [Prompt(r["question"], gsm8k_gold(r["answer"]), "math") for r in rows[:limit]]
        rows = [row for _, row in jsonl_records(data_dir / "mbpp" / "mbpp.jsonl") if 511 <= int(row["task_id"]) <= 1000]
        return [Prompt(_mbpp_prompt(r), None, "code", list(r["test_list"])) for r in rows[:limit]]
    path = Path(source)
    if not path.is_file():
        raise DataError(f"--source {source!r}: expected builtin, gsm8k, mbpp or a JSONL file of prompts")
    return load_prompts([JsonlSource(path=str(path))])[:limit]


def _mbpp_prompt(row: dict[str, Any]) -> str:
    tests = "\n".join(row["test_list"])
    header = row["code"].strip().split("\n", 1)[0] if row["code"].strip().startswith("def ") else ""
    return f"{row['text']}\nYour code should pass these tests:\n{tests}\n{header}"


def split_trace(completion: str) -> tuple[str | None, str]:
    """(reasoning inside <think>…</think>, the answer after it); no reasoning when the tags are not one pair."""
    if completion.count(THINK_OPEN) == 1 == completion.count(THINK_CLOSE):
        inside = completion.split(THINK_OPEN, 1)[1].split(THINK_CLOSE, 1)[0].strip()
        return inside or None, answer_part(completion).strip()
    return None, completion.strip()


def sample_traces(
    generator: TextGenerator,
    prompts: list[Prompt],
    samples: int,
    temperature: float,
    max_new_tokens: int,
    keep: str,
    seed: int,
    batch_prompts: int = 8,
) -> Iterator[dict[str, Any]]:
    """SFT records of the kept completions, prompt by prompt."""
    if keep not in KEEP:
        raise ValueError(f"invalid keep {keep!r}: must be one of {list(KEEP)}")
    for first in range(0, len(prompts), batch_prompts):
        chunk = prompts[first : first + batch_prompts]
        asked = [generator.chat_prompt([{"role": "user", "content": p.text}]) for p in chunk for _ in range(samples)]
        completions = generator.generate(
            asked, max_new_tokens, skip_special_tokens=False, temperature=temperature, seed=seed + first
        )
        repeated = [p for p in chunk for _ in range(samples)]
        scores = _verdicts(repeated, completions)
        for index, prompt in enumerate(chunk):
            rows = range(index * samples, (index + 1) * samples)
            chosen = _choose([(completions[i], scores[i]) for i in rows], keep)
            for completion, score in chosen:
                reasoning, response = split_trace(completion)
                record = {"prompt": prompt.text, "response": response, "verdict": score, "correct": score == 1.0}
                if reasoning:
                    record["reasoning"] = reasoning
                record.update(domain=prompt.domain, answer=prompt.answer)
                yield record


def _verdicts(prompts: list[Prompt], completions: list[str]) -> list[float]:
    """1.0 for a correct answer (or all tests passing), the pass fraction for code, 0 otherwise."""
    accuracy = accuracy_reward(
        [""] * len(prompts), completions, answer=[p.answer for p in prompts], domain=[p.domain for p in prompts]
    )
    code = code_reward([p.text for p in prompts], completions, tests=[p.tests for p in prompts])
    return [a if a is not None else (c if c is not None else 0.0) for a, c in zip(accuracy, code, strict=True)]


def _choose(candidates: list[tuple[str, float]], keep: str) -> list[tuple[str, float]]:
    if keep == "all":
        return candidates
    if keep == "best":
        return [max(candidates, key=lambda pair: pair[1])]
    seen, kept = set(), []
    for completion, score in candidates:
        if score == 1.0 and completion not in seen:  # verified, each distinct trace once
            seen.add(completion)
            kept.append((completion, score))
    return kept


def write_traces(records: Iterator[dict[str, Any]], out: Path) -> Counter:
    """Write records as JSONL (atomically) and count them per domain and verdict."""
    from moelm.files import atomic_path

    counts: Counter = Counter()
    with atomic_path(out) as tmp, open(tmp, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
            counts[f"{record['domain']}/{'correct' if record['correct'] else 'other'}"] += 1
    return counts

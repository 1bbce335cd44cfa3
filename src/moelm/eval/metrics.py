"""Scoring rules shared by the tasks: pass@k and the answer extractors of lm-evaluation-harness.

Extraction follows the harness (references §8) so a moelm number means what the harness's number means:
GSM8K strict `#### N` (or "The answer is N." for chain-of-thought prompts), GSM8K flexible = the last number,
BBH = the text after "the answer is " without its final character (the period).
"""

from __future__ import annotations

import re

import numpy as np

GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_COT_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+)\.")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
BBH_ANSWER = re.compile(r"(?<=the answer is )(.*)(?=.)")
INVALID = "[invalid]"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def normalise_number(text: str) -> str:
    """The harness's filters: drop ',' and '$', strip, drop a trailing '.'."""
    text = text.replace(",", "").replace("$", "").strip()
    return text[:-1] if text.endswith(".") else text


def gsm8k_strict(completion: str, cot: bool = False) -> str:
    match = (GSM8K_COT_STRICT if cot else GSM8K_STRICT).search(completion)
    return normalise_number(match.group(1)) if match else INVALID


def gsm8k_flexible(completion: str) -> str:
    matches = GSM8K_FLEXIBLE.findall(completion)
    if not matches:
        return INVALID
    last = matches[-1]
    return normalise_number(last[0] or last[1])


def gsm8k_gold(answer: str) -> str:
    return normalise_number(answer.split("####")[-1])


def bbh_extract(completion: str) -> str:
    match = BBH_ANSWER.search(completion)
    return match.group(1).strip() if match else completion.strip()

"""Scoring rules shared by the tasks: pass@k and the answer extractors of lm-evaluation-harness.

Extraction follows the harness (references §8) so a moelm number means what the harness's number means:
GSM8K strict `#### N` (or "The answer is N." for chain-of-thought prompts), GSM8K flexible = the last number,
BBH = the text after "the answer is " without its final character (the period), "[invalid]" when absent.
`regex_filter` and `harness_exact_match` are lm-eval 0.4's `regex` filter and `exact_match` metric.
"""

from __future__ import annotations

import re

import numpy as np

GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
# lm-eval's gsm8k_cot pattern ends in an unescaped "." (any character), so "The answer is 6\n" matches too.
GSM8K_COT_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# What lm-eval's gsm8k tasks strip from prediction and reference (in this order) before comparing, ignoring case.
GSM8K_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
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


def regex_filter(text: str, pattern: re.Pattern[str], group_select: int = 0) -> str:
    """lm-eval's `regex` filter: the group_select-th match (a tuple match gives its first non-empty group),
    stripped; "[invalid]" when nothing matches."""
    matches = pattern.findall(text)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((group for group in match if group), INVALID)
    return match.strip()


def harness_exact_match(
    prediction: str, reference: str, regexes_to_ignore: tuple[str, ...] = (), ignore_case: bool = False
) -> bool:
    """lm-eval's `exact_match`: each regex removed from both strings in turn, then (optionally) lower-cased."""
    for pattern in regexes_to_ignore:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    return prediction == reference


def normalise_number(text: str) -> str:
    """The harness's filters: drop ',' and '$', strip, drop a trailing '.'."""
    text = text.replace(",", "").replace("$", "").strip()
    return text[:-1] if text.endswith(".") else text


def gsm8k_strict(completion: str, cot: bool = False) -> str:
    """The strict answer, normalised for comparison by string equality (rewards and the built-in tasks)."""
    answer = regex_filter(completion, GSM8K_COT_STRICT if cot else GSM8K_STRICT)
    return answer if answer == INVALID else normalise_number(answer)


def gsm8k_flexible(completion: str) -> str:
    """The last number in the completion, normalised like `gsm8k_strict`."""
    answer = regex_filter(completion, GSM8K_FLEXIBLE, group_select=-1)
    return answer if answer == INVALID else normalise_number(answer)


def gsm8k_gold(answer: str) -> str:
    return normalise_number(answer.split("####")[-1])


def bbh_extract(completion: str) -> str:
    """lm-eval's bbh get-answer filter: the text after "the answer is " less its last character, else invalid."""
    return regex_filter(completion, BBH_ANSWER)

"""GSM8K: grade-school math word problems, exact match of the final number, as lm-evaluation-harness 0.4 runs them.

Variants:
- `gsm8k` (lm-eval `gsm8k`, version 3.0): "Question: {q}\\nAnswer:" after 5 worked train solutions ("... #### N")
  drawn per question by the harness's seeded sampler, greedy, stop at "Question:", "</s>", "<|im_end|>"; strict =
  `#### N`, flexible = the last number.
- `gsm8k_cot` (lm-eval `gsm8k_cot`, version 3.0): "Q: {q}\\nA:" after the 8 fixed exemplars of Wei et al.; stop at
  "Q:", "</s>", "<|im_end|>"; strict = "The answer is N", flexible = the last number.
- `gsm8k_reasoning` (moelm's own, no harness twin): zero-shot through the model's chat template; the model reasons
  inside <think> and answers after it (R1 format); strict = the answer after </think>, flexible = its last number.

The harness task draws its shots with one `random.Random(fewshot_seed)` for the whole task, `sample(train, 5)`
per evaluated question in document order, so the shots of question i depend on every draw before it; the answers
are compared with lm-eval's exact_match (",", "$", everything up to "#### " and a final "." removed from both
sides, case ignored).
"""

from __future__ import annotations

import random
from pathlib import Path

from moelm.data.tokenizer import THINK_CLOSE
from moelm.eval.common import EvalSettings, TaskResult, harness_record, limited, read_jsonl, require
from moelm.eval.gsm8k_cot_exemplars import EXEMPLARS
from moelm.eval.lm import EvalModel
from moelm.eval.metrics import (
    GSM8K_COT_STRICT,
    GSM8K_FLEXIBLE,
    GSM8K_IGNORE,
    GSM8K_STRICT,
    INVALID,
    gsm8k_flexible,
    gsm8k_gold,
    harness_exact_match,
    normalise_number,
    regex_filter,
)

VARIANTS = {"gsm8k": 5, "gsm8k_cot": 8, "gsm8k_reasoning": 0}
VERSION = "2"
HARNESS_TASKS = {"gsm8k": 3.0, "gsm8k_cot": 3.0}
STOP = {"gsm8k": ["Question:", "</s>", "<|im_end|>"], "gsm8k_cot": ["Q:", "</s>", "<|im_end|>"]}
MAX_NEW_TOKENS = 256  # lm-eval's default max_gen_toks: neither task sets its own


def load(data_dir: Path) -> tuple[list[dict], list[dict]]:
    test = read_jsonl(require(data_dir / "gsm8k" / "test.jsonl", "GSM8K test split"))
    train = read_jsonl(require(data_dir / "gsm8k" / "train.jsonl", "GSM8K train split (few-shot examples)"))
    return test, train


def harness_shot_indices(pool_size: int, shots: int, documents: int, seed: int = 1234) -> list[list[int]]:
    """The train indices lm-eval's default sampler gives each of the first `documents` questions.

    `Random.sample` picks by position, so sampling `range(pool_size)` draws the same indices as sampling the
    records themselves.
    """
    rnd = random.Random(seed)
    return [rnd.sample(range(pool_size), shots) for _ in range(documents)]


def build_prompt(variant: str, question: str, shots: list[dict] | list[tuple[str, str]]) -> str:
    """A harness prompt: shots as "{text} {target}\\n\\n", then the question's text."""
    if variant == "gsm8k":
        context = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
        return f"{context}Question: {question}\nAnswer:"
    context = "".join(f"Q: {q}\nA: {target}\n\n" for q, target in shots)
    return f"{context}Q: {question}\nA:"


def prompts_for(variant: str, docs: list[dict], train: list[dict], shots: int, fewshot_seed: int) -> list[str]:
    """The prompt of each document as the harness builds it (plain text, no chat template)."""
    if variant == "gsm8k_cot":
        return [build_prompt(variant, d["question"], list(EXEMPLARS[:shots])) for d in docs]
    if shots == 0:
        return [build_prompt(variant, d["question"], []) for d in docs]
    if shots > len(train):
        raise ValueError(f"--num-fewshot {shots}: the GSM8K train split has {len(train)} examples")
    draws = harness_shot_indices(len(train), shots, len(docs), fewshot_seed)
    return [
        build_prompt(variant, d["question"], [train[i] for i in picked]) for d, picked in zip(docs, draws, strict=True)
    ]


def extract(variant: str, completion: str) -> tuple[str, str]:
    """(strict, flexible) answers of one completion, as the harness's filters leave them."""
    if variant == "gsm8k_reasoning":
        answer = completion.rsplit(THINK_CLOSE, 1)[-1] if THINK_CLOSE in completion else ""
        strict = normalise_number(answer) if answer.strip() else INVALID
        return strict, gsm8k_flexible(answer or completion)
    strict = regex_filter(completion, GSM8K_COT_STRICT if variant == "gsm8k_cot" else GSM8K_STRICT)
    return strict, regex_filter(completion, GSM8K_FLEXIBLE, group_select=-1)


def is_correct(variant: str, answer: str, reference: str) -> bool:
    """lm-eval's exact_match for the harness variants; string equality of normalised numbers for the R1 one."""
    if variant == "gsm8k_reasoning":
        return answer == gsm8k_gold(reference)
    return harness_exact_match(answer, reference, GSM8K_IGNORE, ignore_case=True)


def score(variant: str, docs: list[dict], completions: list[str]) -> tuple[dict[str, float], list[dict]]:
    samples = []
    for doc, completion in zip(docs, completions, strict=True):
        gold = gsm8k_gold(doc["answer"])
        strict, flexible = extract(variant, completion)
        # the harness compares with the whole answer field; its ignore-regexes reduce it to the final number
        samples.append(
            {
                "question": doc["question"],
                "gold": gold,
                "completion": completion,
                "strict": strict,
                "flexible": flexible,
                "strict_match": is_correct(variant, strict, doc["answer"]),
                "flexible_match": is_correct(variant, flexible, doc["answer"]),
            }
        )
    n = max(len(samples), 1)
    metrics = {
        "exact_match_strict": sum(s["strict_match"] for s in samples) / n,
        "exact_match_flexible": sum(s["flexible_match"] for s in samples) / n,
        "n": len(samples),
    }
    return metrics, samples


def evaluate(model: EvalModel, data_dir: Path, settings: EvalSettings, variant: str = "gsm8k") -> TaskResult:
    test, train = load(data_dir)
    docs = limited(test, settings.limit)
    k = VARIANTS[variant] if settings.num_fewshot is None else settings.num_fewshot
    if variant == "gsm8k_cot" and k > len(EXEMPLARS):
        raise ValueError(f"--num-fewshot: gsm8k_cot has {len(EXEMPLARS)} fixed exemplars, got {k}")
    max_new = settings.max_new_tokens or MAX_NEW_TOKENS
    if variant == "gsm8k_reasoning":
        prompts = [model.generator.chat_prompt([{"role": "user", "content": d["question"]}]) for d in docs]
        completions = model.generate(
            prompts, max_new, ["<|user|>"], settings.temperature, settings.top_p, settings.seed, skip_special=False
        )
        config = {"num_fewshot": 0, "max_new_tokens": max_new, "stop": ["<|user|>"], "chat_template": True}
    else:
        prompts = prompts_for(variant, docs, train, k, settings.fewshot_seed)
        if settings.apply_chat_template:
            prompts = [model.generator.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
        stop = STOP[variant]
        completions = model.generate(prompts, max_new, stop, settings.temperature, settings.top_p, settings.seed)
        sampler = "fixed exemplars (first_n)" if variant == "gsm8k_cot" else f"default (seed {settings.fewshot_seed})"
        config = {"num_fewshot": k, "max_new_tokens": max_new, "stop": stop, "fewshot_sampler": sampler}
        config["lm_eval"] = harness_record(variant, HARNESS_TASKS[variant])
    metrics, samples = score(variant, docs, completions)
    for sample, prompt in zip(samples, prompts, strict=True):
        sample["prompt"] = prompt
    return TaskResult(variant, VERSION, metrics, config, samples)

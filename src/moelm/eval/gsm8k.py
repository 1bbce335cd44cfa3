"""GSM8K: grade-school math word problems, exact match of the final number (lm-evaluation-harness rules).

Variants:
- `gsm8k`: "Question: {q}\\nAnswer:" with K=5 worked train solutions as shots (ending "#### N"), greedy, stop at
  "Question:"; strict = `#### N`, flexible = the last number.
- `gsm8k_cot`: "Q: {q}\\nA:" with K=8 chain-of-thought shots written from train solutions ("... The answer is
  N."), stop at "Q:" or a blank line; strict = "The answer is N.", flexible = the last number.
- `gsm8k_reasoning`: zero-shot through the model's chat template; the model reasons inside <think> and answers
  after it (R1 format); strict = the answer after </think>, flexible = its last number.
"""

from __future__ import annotations

import re
from pathlib import Path

from moelm.eval.common import EvalSettings, TaskResult, limited, read_jsonl, require
from moelm.eval.lm import EvalModel
from moelm.eval.metrics import INVALID, gsm8k_flexible, gsm8k_gold, gsm8k_strict, normalise_number
from moelm.infer.text import THINK_CLOSE

VARIANTS = {"gsm8k": 5, "gsm8k_cot": 8, "gsm8k_reasoning": 0}
VERSION = "1"
CALCULATOR = re.compile(r"<<[^>]*>>")


def load(data_dir: Path) -> tuple[list[dict], list[dict]]:
    test = read_jsonl(require(data_dir / "gsm8k" / "test.jsonl", "GSM8K test split"))
    train = read_jsonl(require(data_dir / "gsm8k" / "train.jsonl", "GSM8K train split (few-shot examples)"))
    return test, train


def cot_solution(answer: str) -> str:
    """A train solution as chain of thought: calculator notes removed, lines joined, "The answer is N."."""
    work, final = answer.split("####")
    steps = " ".join(line.strip() for line in CALCULATOR.sub("", work).splitlines() if line.strip())
    return f"{steps} The answer is {normalise_number(final)}."


def build_prompt(variant: str, question: str, shots: list[dict]) -> str:
    if variant == "gsm8k":
        context = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
        return f"{context}Question: {question}\nAnswer:"
    context = "".join(f"Q: {s['question']}\nA: {cot_solution(s['answer'])}\n\n" for s in shots)
    return f"{context}Q: {question}\nA:"


def extract(variant: str, completion: str) -> tuple[str, str]:
    """(strict, flexible) answers of one completion."""
    if variant == "gsm8k_reasoning":
        answer = completion.rsplit(THINK_CLOSE, 1)[-1] if THINK_CLOSE in completion else ""
        strict = normalise_number(answer) if answer.strip() else INVALID
        return strict, gsm8k_flexible(answer or completion)
    return gsm8k_strict(completion, cot=variant == "gsm8k_cot"), gsm8k_flexible(completion)


def score(variant: str, docs: list[dict], completions: list[str]) -> tuple[dict[str, float], list[dict]]:
    samples = []
    for doc, completion in zip(docs, completions, strict=True):
        gold = gsm8k_gold(doc["answer"])
        strict, flexible = extract(variant, completion)
        samples.append(
            {
                "question": doc["question"],
                "gold": gold,
                "completion": completion,
                "strict": strict,
                "flexible": flexible,
                "strict_match": strict == gold,
                "flexible_match": flexible == gold,
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
    shots = train[:k]  # the first K train problems, as the harness's first_n sampler
    if variant == "gsm8k_reasoning":
        prompts = [model.generator.chat_prompt([{"role": "user", "content": d["question"]}]) for d in docs]
        stop = ["<|user|>"]
    else:
        prompts = [build_prompt(variant, d["question"], shots) for d in docs]
        if settings.apply_chat_template:
            prompts = [model.generator.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
        stop = ["Question:", "</s>", "<|im_end|>"] if variant == "gsm8k" else ["Q:", "</s>", "<|im_end|>", "\n\n"]
    max_new = settings.max_new_tokens or 256
    completions = model.generate(prompts, max_new, stop, settings.temperature, settings.top_p, settings.seed)
    metrics, samples = score(variant, docs, completions)
    for sample, prompt in zip(samples, prompts, strict=True):
        sample["prompt"] = prompt
    config = {"num_fewshot": k, "max_new_tokens": max_new, "stop": stop, "fewshot_sampler": "first_n"}
    return TaskResult(variant, VERSION, metrics, config, samples)

"""The built-in tasks, held out: math and logic by exact match, code by running the record's asserts.

Records come from the built-in corpus generator with a seed no training recipe uses (default 1000; pre-training
defaults to 0 and configs/sft-tiny.yaml to 1), so the problems are new to the model. Plain prompts follow the
corpus format a pre-trained model knows ("Question: ...\\nAnswer:", "Q: ...\\nA:", a function header); with
apply_chat_template the question is asked through the chat template and the answer read after </think>.
Accuracy is reported per domain and per difficulty level.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from moelm.data.builtin import Record, builtin_corpus
from moelm.eval.common import EvalSettings, TaskResult
from moelm.eval.exact_match import final_answer, normalise
from moelm.eval.lm import EvalModel
from moelm.eval.metrics import INVALID, gsm8k_flexible, gsm8k_strict
from moelm.eval.sandbox import SandboxLimits, run_programs

VERSION = "1"
HELD_OUT_SEED = 1000
DOMAINS = ("math", "logic", "code")
ANSWER_IS = re.compile(r"the answer is (.*)", re.IGNORECASE)
CODE_STOP = ["\ndef", "\nclass", "\nassert", "\nif", "\nprint", "\n#", "\n\n\n"]


def plain_prompt(record: Record) -> tuple[str, list[str]]:
    if record.domain == "math":
        return f"Question: {record.prompt}\nAnswer:", ["Question:", "\n\n", "</s>"]
    if record.domain == "logic":
        return f"Q: {record.prompt}\nA:", ["\n", "</s>"]
    return record.prompt, CODE_STOP


def plain_answer(record: Record, completion: str) -> str:
    if record.domain == "math":
        strict = gsm8k_strict(completion)
        return strict if strict != INVALID else gsm8k_flexible(completion)
    stated = ANSWER_IS.search(completion)
    return normalise(stated.group(1) if stated else completion)


def program(record: Record, completion: str) -> str:
    asserts = record.text.split("\n\n\n", 1)[1]
    body = completion if completion.startswith((" ", "\t")) else "    " + completion.lstrip()
    return f"{record.prompt}{body}\n\n{asserts}"


def evaluate(model: EvalModel, data_dir: Path | None, settings: EvalSettings, num_records: int = 300) -> TaskResult:
    records = list(builtin_corpus(settings.limit or num_records, seed=HELD_OUT_SEED, domains=DOMAINS))
    max_new = settings.max_new_tokens or 64
    by_stop: dict[tuple[str, ...], list[int]] = defaultdict(list)
    prompts: list[str] = []
    for index, record in enumerate(records):
        if settings.apply_chat_template:
            prompt, stop = model.generator.chat_prompt([{"role": "user", "content": record.prompt}]), ["<|user|>"]
        else:
            prompt, stop = plain_prompt(record)
        prompts.append(prompt)
        by_stop[tuple(stop)].append(index)
    completions: list[str] = [""] * len(records)
    for stop, indices in by_stop.items():
        outs = model.generate(
            [prompts[i] for i in indices],
            max_new,
            list(stop),
            settings.temperature,
            settings.top_p,
            settings.seed,
            skip_special=False,  # </think> must reach final_answer
        )
        for i, out in zip(indices, outs, strict=True):
            completions[i] = out
    code = [i for i, r in enumerate(records) if r.domain == "code"]
    replies = {i: final_answer(completions[i]) if settings.apply_chat_template else completions[i] for i in code}
    runs = run_programs([program(records[i], replies[i]) for i in code], SandboxLimits(timeout_s=5, cpu_s=5))
    passed = dict(zip(code, (r.passed for r in runs), strict=True))
    samples: list[dict[str, Any]] = []
    for index, (record, completion) in enumerate(zip(records, completions, strict=True)):
        if record.domain == "code":
            predicted, correct = replies[index], passed[index]
        else:
            predicted = final_answer(completion) if settings.apply_chat_template else plain_answer(record, completion)
            correct = predicted == normalise(record.answer)
        samples.append(
            {
                "domain": record.domain,
                "difficulty": record.difficulty,
                "prompt": prompts[index],
                "gold": record.answer,
                "completion": completion,
                "predicted": predicted,
                "correct": correct,
            }
        )
    groups: dict[str, list[bool]] = defaultdict(list)
    for sample in samples:
        groups[f"accuracy/{sample['domain']}"].append(sample["correct"])
        groups[f"accuracy/{sample['domain']}/level{sample['difficulty']}"].append(sample["correct"])
    metrics = {name: sum(v) / len(v) for name, v in sorted(groups.items())}
    metrics["accuracy"] = sum(s["correct"] for s in samples) / max(len(samples), 1)
    metrics["n"] = len(samples)
    config = {"seed": HELD_OUT_SEED, "domains": list(DOMAINS), "max_new_tokens": max_new}
    return TaskResult("builtin", VERSION, metrics, config, samples)

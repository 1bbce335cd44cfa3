"""BIG-Bench Hard: 27 tasks, 3-shot chain-of-thought prompts, exact match of the extracted answer.

Prompt: the task's cot-prompts file (without its canary line and separator) followed by
"\\n\\nQ: {input}\\nA: Let's think step by step.\\n"; greedy until the next "Q:"; the answer is what follows
"the answer is " without the final period (lm-evaluation-harness's regex), compared exactly with the target.
"""

from __future__ import annotations

import json
from pathlib import Path

from moelm.eval.common import EvalSettings, TaskResult, require
from moelm.eval.lm import EvalModel
from moelm.eval.metrics import bbh_extract

VERSION = "1"


def cot_header(path: Path) -> str:
    """The few-shot text of a cot-prompts file: everything after the '-----' line under the canary."""
    text = path.read_text(encoding="utf-8")
    return text.split("-----\n", 1)[1].strip() if "-----\n" in text else text.strip()


def load(data_dir: Path, tasks: list[str] | None = None) -> dict[str, tuple[str, list[dict]]]:
    root = require(data_dir / "bbh", "BIG-Bench Hard folder (bbh/bbh/*.json and bbh/cot-prompts/*.txt)")
    files = sorted(require(root / "bbh", "BBH task files").glob("*.json"))
    out = {}
    for file in files:
        if tasks and file.stem not in tasks:
            continue
        prompt = require(root / "cot-prompts" / f"{file.stem}.txt", f"BBH chain-of-thought prompt for {file.stem}")
        out[file.stem] = (cot_header(prompt), json.loads(file.read_text())["examples"])
    if not out:
        raise FileNotFoundError(f"no BBH task files found in {root / 'bbh'}")
    return out


def evaluate(model: EvalModel, data_dir: Path, settings: EvalSettings) -> TaskResult:
    tasks = load(data_dir)
    docs = []
    for task, (header, examples) in tasks.items():
        for example in examples[: settings.limit] if settings.limit else examples:
            prompt = f"{header}\n\nQ: {example['input']}\nA: Let's think step by step.\n"
            if settings.apply_chat_template:
                prompt = model.generator.chat_prompt([{"role": "user", "content": prompt}])
            docs.append((task, prompt, example["target"]))
    max_new = settings.max_new_tokens or 256
    stop = ["\n\nQ:", "Q:", "</s>", "<|im_end|>"]
    completions = model.generate(
        [p for _, p, _ in docs], max_new, stop, settings.temperature, settings.top_p, settings.seed
    )
    samples, per_task = [], {}
    for (task, prompt, target), completion in zip(docs, completions, strict=True):
        predicted = bbh_extract(completion)
        correct = predicted == target
        per_task.setdefault(task, []).append(correct)
        samples.append(
            {
                "task": task,
                "target": target,
                "completion": completion,
                "predicted": predicted,
                "correct": correct,
                "prompt": prompt,
            }
        )
    metrics = {f"exact_match/{t}": sum(v) / len(v) for t, v in sorted(per_task.items())}
    metrics["exact_match"] = sum(s["correct"] for s in samples) / max(len(samples), 1)
    metrics["exact_match_task_mean"] = sum(sum(v) / len(v) for v in per_task.values()) / max(len(per_task), 1)
    metrics["n"] = len(samples)
    return TaskResult("bbh", VERSION, metrics, {"num_fewshot": 3, "max_new_tokens": max_new, "stop": stop}, samples)

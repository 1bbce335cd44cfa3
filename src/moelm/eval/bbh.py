"""BIG-Bench Hard: 27 tasks, 3-shot chain-of-thought, exact match, as lm-eval 0.4's `bbh` (cot_fewshot) runs them.

Each task's cot-prompts file (the BIG-Bench-Hard repository's, read from --data-dir) holds a description and
three "Q: ...\\nA: Let's think step by step. ..." exemplars. The harness keeps them as description, input and
target and lays them out as "{description}\\n\\n" + "Q: {input}\\nA: Let's think step by step.\\n{target}\\n\\n"
per shot + "Q: {input}\\nA: Let's think step by step.\\n" for the question, so a target that the file writes on
the same line as "step by step." (sports_understanding) moves to the next line. Greedy until "</s>", "Q" or a
blank line, at most 1024 new tokens; the answer is what follows "the answer is " without its last character,
"[invalid]" when the phrase is missing; exact match against the target.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from moelm.data.sources import DataError
from moelm.eval.common import EvalSettings, TaskResult, harness_record, require
from moelm.eval.lm import EvalModel
from moelm.eval.metrics import bbh_extract

VERSION = "2"
HARNESS_TASK = ("bbh", 3.0)  # the group bbh_cot_fewshot; each bbh_cot_fewshot_<task> is version 4.0
STOP = ["</s>", "Q", "\n\n"]
MAX_NEW_TOKENS = 1024
ANSWER_CUE = "A: Let's think step by step."
SHOT = re.compile(r"Q: (?P<input>.*)\nA: Let's think step by step\.[\n ](?P<target>.*)", re.DOTALL)


@dataclass(frozen=True)
class FewShot:
    description: str
    shots: tuple[tuple[str, str], ...]  # (input, target)


def parse_cot_prompts(path: Path) -> FewShot:
    """Description and exemplars of one cot-prompts file: paragraphs before the first "Q: " describe the task."""
    text = path.read_text(encoding="utf-8")
    body = text.split("\n-----\n", 1)[-1].strip("\n")
    paragraphs = body.split("\n\n")
    first = next((i for i, p in enumerate(paragraphs) if p.startswith("Q: ")), len(paragraphs))
    shots = []
    for paragraph in paragraphs[first:]:
        match = SHOT.fullmatch(paragraph.strip())
        if match is None:
            raise DataError(f"{path}: a few-shot block does not read 'Q: ...\\n{ANSWER_CUE} ...': {paragraph[:60]!r}")
        shots.append((match["input"], match["target"].strip()))
    return FewShot("\n\n".join(paragraphs[:first]), tuple(shots))


def build_prompt(fewshot: FewShot, question: str, shots: int = 3) -> str:
    context = "".join(f"Q: {q}\n{ANSWER_CUE}\n{target}\n\n" for q, target in fewshot.shots[:shots])
    return f"{fewshot.description}\n\n{context}Q: {question}\n{ANSWER_CUE}\n"


def load(data_dir: Path, tasks: list[str] | None = None) -> dict[str, tuple[FewShot, list[dict]]]:
    root = require(data_dir / "bbh", "BIG-Bench Hard folder (bbh/bbh/*.json and bbh/cot-prompts/*.txt)")
    files = sorted(require(root / "bbh", "BBH task files").glob("*.json"))
    out = {}
    for file in files:
        if tasks and file.stem not in tasks:
            continue
        prompt = require(root / "cot-prompts" / f"{file.stem}.txt", f"BBH chain-of-thought prompt for {file.stem}")
        out[file.stem] = (parse_cot_prompts(prompt), json.loads(file.read_text())["examples"])
    if not out:
        raise FileNotFoundError(f"no BBH task files found in {root / 'bbh'}")
    return out


def evaluate(model: EvalModel, data_dir: Path, settings: EvalSettings) -> TaskResult:
    tasks = load(data_dir)
    k = 3 if settings.num_fewshot is None else settings.num_fewshot
    docs = []
    for task, (fewshot, examples) in tasks.items():
        if k > len(fewshot.shots):
            raise ValueError(f"--num-fewshot: bbh task {task} has {len(fewshot.shots)} exemplars, got {k}")
        for example in examples[: settings.limit] if settings.limit else examples:
            prompt = build_prompt(fewshot, example["input"], k)
            if settings.apply_chat_template:
                prompt = model.generator.chat_prompt([{"role": "user", "content": prompt}])
            docs.append((task, prompt, example["target"]))
    max_new = settings.max_new_tokens or MAX_NEW_TOKENS
    completions = model.generate(
        [p for _, p, _ in docs], max_new, STOP, settings.temperature, settings.top_p, settings.seed
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
    config = {"num_fewshot": k, "max_new_tokens": max_new, "stop": STOP, "lm_eval": harness_record(*HARNESS_TASK)}
    return TaskResult("bbh", VERSION, metrics, config, samples)

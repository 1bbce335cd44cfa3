"""Running tasks on a model directory, scoring precomputed predictions, and the results file.

The results JSON records what is needed to audit and reproduce a run: the model directory and its config, each
task's version and prompt settings, the sampling parameters and seed, metrics, and every sample's prompt,
output and verdict.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moelm.eval import bbh, builtin, code, gsm8k, mmlu
from moelm.eval.common import EvalSettings, TaskResult, read_jsonl
from moelm.eval.lm import EvalModel
from moelm.files import atomic_write_text

TASKS: dict[str, Callable[[EvalModel, Path | None, EvalSettings], TaskResult]] = {
    "gsm8k": lambda m, d, s: gsm8k.evaluate(m, _need(d, "gsm8k"), s, "gsm8k"),
    "gsm8k_cot": lambda m, d, s: gsm8k.evaluate(m, _need(d, "gsm8k_cot"), s, "gsm8k_cot"),
    "gsm8k_reasoning": lambda m, d, s: gsm8k.evaluate(m, _need(d, "gsm8k_reasoning"), s, "gsm8k_reasoning"),
    "mmlu": lambda m, d, s: mmlu.evaluate(m, _need(d, "mmlu"), s),
    "bbh": lambda m, d, s: bbh.evaluate(m, _need(d, "bbh"), s),
    "humaneval": code.evaluate_humaneval,
    "mbpp": lambda m, d, s: code.evaluate_mbpp(m, _need(d, "mbpp"), s),
    "builtin": builtin.evaluate,
}
# Each task's data, read without a model: run before the first model call so a missing file fails at once.
TASK_DATA: dict[str, Callable[[Path | None], object]] = {
    "gsm8k": lambda d: gsm8k.load(_need(d, "gsm8k")),
    "gsm8k_cot": lambda d: gsm8k.load(_need(d, "gsm8k_cot")),
    "gsm8k_reasoning": lambda d: gsm8k.load(_need(d, "gsm8k_reasoning")),
    "mmlu": lambda d: (mmlu.load_split(_need(d, "mmlu"), "dev"), mmlu.load_split(_need(d, "mmlu"), "test")),
    "bbh": lambda d: bbh.load(_need(d, "bbh")),
    "humaneval": code.load_humaneval,
    "mbpp": lambda d: code.load_mbpp(_need(d, "mbpp")),
    "builtin": lambda d: None,
}
PREDICTION_TASKS = ("humaneval", "mbpp", "gsm8k")


def _need(data_dir: Path | None, task: str) -> Path:
    if data_dir is None:
        raise FileNotFoundError(
            f"task {task} reads local benchmark files: pass --data-dir DIR (no downloads at run time)"
        )
    return data_dir


def check_task_data(tasks: list[str], data_dir: Path | None) -> None:
    """Read every task's files now, so a missing or malformed one is reported before any model call."""
    for name in tasks:
        try:
            TASK_DATA[name](data_dir)
        except (OSError, ValueError) as error:
            raise type(error)(f"task {name}: {error}") if "task " not in str(error) else error from None


def parse_tasks(spec: str) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {unknown or spec!r}; available: {', '.join(TASKS)}")
    return names


def run_tasks(
    model: EvalModel, model_dir: str, tasks: list[str], data_dir: Path | None, settings: EvalSettings
) -> dict[str, Any]:
    """Evaluate each task and assemble the auditable results document.

    A task that fails does not take the others' results with it: its message goes under "failed" and the
    remaining tasks still run.
    """
    results, failed = {}, {}
    for name in tasks:
        start = time.perf_counter()
        try:
            result = TASKS[name](model, data_dir, settings)
        except Exception as error:  # any task error: keep what finished, report this one by name
            failed[name] = f"{type(error).__name__}: {error}"
            continue
        results[name] = _task_entry(result, time.perf_counter() - start)
    document = {
        "model": {"path": str(model_dir), "config": model.generator.model.config.to_dict()},
        "settings": vars(settings),
        "data_dir": str(data_dir) if data_dir else None,
        "environment": {"python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
        "results": results,
    }
    if failed:
        document["failed"] = failed
    return document


def _task_entry(result: TaskResult, seconds: float) -> dict[str, Any]:
    return {
        "version": result.version,
        "metrics": result.metrics,
        "config": result.config,
        "seconds": seconds,
        "samples": result.samples,
    }


def score_predictions(task: str, predictions: Path, data_dir: Path | None) -> dict[str, Any]:
    """Score a JSONL of {"task_id", "completion"} lines (openai/human-eval's sample format) without a model.

    GSM8K lines carry "task_id" as the 0-based index in test.jsonl (or "question") and the completion text.
    """
    if task not in PREDICTION_TASKS:
        raise ValueError(f"--predictions scores {', '.join(PREDICTION_TASKS)}; got {task!r}")
    lines = read_jsonl(predictions)
    for number, line in enumerate(lines, 1):
        if "completion" not in line or not ("task_id" in line or "question" in line):
            raise ValueError(f"{predictions}:{number}: expected an object with task_id and completion")
    if task == "gsm8k":
        test, _ = gsm8k.load(_need(data_dir, task))
        by_question = {doc["question"]: doc for doc in test}
        docs = [by_question[line["question"]] if "question" in line else test[int(line["task_id"])] for line in lines]
        metrics, samples = gsm8k.score("gsm8k", docs, [line["completion"] for line in lines])
        result = TaskResult("gsm8k", gsm8k.VERSION, metrics, {"source": str(predictions)}, samples)
    else:
        if task == "humaneval":
            problems = {p["task_id"]: p for p in code.load_humaneval(data_dir)}
            build = code.humaneval_program
        else:
            problems = code.load_mbpp(_need(data_dir, task))
            build = code.mbpp_program
        grouped: dict[Any, list[str]] = {}
        for number, line in enumerate(lines, 1):
            task_id = line["task_id"] if task == "humaneval" else int(line["task_id"])
            if task_id not in problems:
                raise ValueError(f"{predictions}:{number}: unknown {task} task_id {line['task_id']!r}")
            grouped.setdefault(task_id, []).append(line["completion"])
        chosen = [problems[task_id] for task_id in grouped]
        metrics, samples = code.score(chosen, list(grouped.values()), build, "task_id")
        result = TaskResult(task, code.VERSION, metrics, {"source": str(predictions)}, samples)
    return {"predictions": str(predictions), "results": {task: _task_entry(result, 0.0)}}


def results_table(document: dict[str, Any]) -> str:
    """The headline metrics of each task, one line per metric (per-subject and per-task detail stays in JSON)."""
    lines = [f"{'task':<18} {'metric':<34} {'value':>8}"]
    for task, entry in document["results"].items():
        shots = entry.get("config", {}).get("num_fewshot")
        if shots is not None:  # stated, since a shot count changes what a number means (MMLU 0 vs 5)
            lines.append(f"{task:<18} {'num_fewshot':<34} {shots:>8d}")
        for name, value in entry["metrics"].items():
            if name.count("/") == 0 or name.startswith(("acc_category/", "accuracy/")) and name.count("/") == 1:
                shown = f"{value:>8d}" if _is_count(value) else f"{value:>8.4f}"
                lines.append(f"{task:<18} {name:<34} {shown}")
    return "\n".join(lines)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def write_results(document: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, json.dumps(document, indent=2, default=str))

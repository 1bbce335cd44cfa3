"""Supervised fine-tuning examples: record formats, benchmark converters, difficulty.

Every source becomes a list of `SFTExample` (a conversation, its task name and a difficulty, 1 = easiest):
- JSONL `{"messages": [...]}` or `{"prompt", "response"[, "reasoning"]}` (optional `task`, `difficulty`);
- the public benchmark files in their original formats (GSM8K train, MBPP train task_ids 511-1000 and the
  prompting split 1-10, BBH, MMLU dev); HumanEval is evaluation only and has no converter;
- the built-in corpus (its records carry a level).
Malformed records are reported with file and line: skipped with a warning by default, fatal with strict=True;
they are never dropped silently.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelm.data.builtin import DOMAINS, Record, builtin_corpus
from moelm.data.chat import ChatFormatError, validate_messages
from moelm.data.source_specs import BuiltinSource, FileSource, SourceSpec
from moelm.data.sources import DataError, jsonl_records

FORMATS = ("jsonl", "gsm8k", "mbpp", "bbh", "mmlu", "builtin")


@dataclass
class SFTExample:
    messages: list[dict[str, str]]
    task: str
    difficulty: float = 1.0
    answer: str | None = None  # the gold final answer when the task has one (held-out exact match)


@dataclass
class LoadReport:
    """What a loader read and what it skipped (with file:line reasons)."""

    loaded: int = 0
    skipped: list[str] = field(default_factory=list)


def _chat(prompt: str, response: str, reasoning: str | None = None, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    assistant = {"role": "assistant", "content": response}
    if reasoning:
        assistant["reasoning"] = reasoning
    return [*messages, {"role": "user", "content": prompt}, assistant]


def _jsonl_rows(path: Path, report: LoadReport, strict: bool) -> Iterable[tuple[int, Any]]:
    if not path.is_file():
        raise DataError(f"SFT data file {path} not found")
    yield from jsonl_records(path, lambda message: _reject(report, strict, message))


def _reject(report: LoadReport, strict: bool, reason: str) -> None:
    if strict:
        raise DataError(reason)
    report.skipped.append(reason)


def _record_example(row: Any, task: str) -> SFTExample:
    """One generic JSONL record; raises ChatFormatError/ValueError with what is wrong."""
    if not isinstance(row, dict):
        raise ChatFormatError(f"expected an object, got {type(row).__name__}")
    task = str(row.get("task", task))
    difficulty = float(row.get("difficulty", 1.0))
    if "messages" in row:
        return SFTExample(validate_messages(row["messages"]), task, difficulty, row.get("answer"))
    if isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        messages = _chat(row["prompt"], row["response"], row.get("reasoning"), row.get("system"))
        return SFTExample(messages, task, difficulty, row.get("answer"))
    raise ChatFormatError('expected "messages" or string "prompt" and "response" fields')


def load_jsonl(path: str | Path, task: str | None = None, strict: bool = False) -> tuple[list[SFTExample], LoadReport]:
    path, report = Path(path), LoadReport()
    examples = []
    for line_no, row in _jsonl_rows(path, report, strict):
        try:
            examples.append(_record_example(row, task or path.stem))
        except (ChatFormatError, ValueError, TypeError) as error:
            _reject(report, strict, f"{path}:{line_no}: {error}")
    report.loaded = len(examples)
    return examples, report


CALCULATOR = re.compile(r"<<[^>]*>>")


def gsm8k_example(row: dict[str, str]) -> SFTExample:
    """Worked solution as reasoning (calculator annotations removed), the number after #### as the answer.

    Difficulty = number of solution steps (lines), the count GSM8K's own paper uses for problem hardness.
    """
    solution, answer = row["answer"].split("####")
    solution = CALCULATOR.sub("", solution).strip()
    answer = answer.strip().replace(",", "")
    steps = len([line for line in solution.splitlines() if line.strip()])
    return SFTExample(_chat(row["question"], answer, solution), "gsm8k", float(steps), answer)


def load_gsm8k(path: str | Path, strict: bool = False) -> tuple[list[SFTExample], LoadReport]:
    path, report = Path(path), LoadReport()
    examples = []
    for line_no, row in _jsonl_rows(path, report, strict):
        try:
            examples.append(gsm8k_example(row))
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            _reject(report, strict, f"{path}:{line_no}: not a GSM8K record {{question, answer with ####}} ({error})")
    report.loaded = len(examples)
    return examples, report


MBPP_TRAIN = range(511, 1001)
MBPP_PROMPTING = range(1, 11)


def mbpp_prompt(text: str, tests: list[str]) -> str:
    """The MBPP task statement in the lm-evaluation-harness wording (references §8)."""
    return (
        f"You are an expert Python programmer, and here is your task: {text} "
        f"Your code should pass these tests:\n\n" + "\n".join(tests) + "\n"
    )


def load_mbpp(path: str | Path, strict: bool = False) -> tuple[list[SFTExample], LoadReport]:
    """MBPP train split (task_ids 511-1000) and prompting split (1-10); difficulty = solution lines."""
    path, report = Path(path), LoadReport()
    examples = []
    for line_no, row in _jsonl_rows(path, report, strict):
        try:
            task_id = int(row["task_id"])
            if task_id not in MBPP_TRAIN and task_id not in MBPP_PROMPTING:
                continue
            code = row["code"].replace("\r\n", "\n").strip()
            lines = len([line for line in code.splitlines() if line.strip()])
            examples.append(SFTExample(_chat(mbpp_prompt(row["text"], row["test_list"]), code), "mbpp", float(lines)))
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            _reject(report, strict, f"{path}:{line_no}: not an MBPP record ({error})")
    report.loaded = len(examples)
    return examples, report


def _file_or_folder(path: Path, suffix: str, what: str, expected: str) -> list[Path]:
    files = sorted(path.glob(f"*{suffix}")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise DataError(f"{what} {path} not found (expected {expected} or a folder of them)")
    return files


def bbh_task_difficulty(task: str) -> float:
    """BBH difficulty by task: the object-count variants rank 3 < 5 < 7, every other task sits in the middle."""
    for words, level in (("three", 1.0), ("five", 2.0), ("seven", 3.0)):
        if task.endswith(f"{words}_objects"):
            return level
    return 2.0


def load_bbh(path: str | Path, strict: bool = False) -> tuple[list[SFTExample], LoadReport]:
    """A BBH task file or a folder of them ({"examples": [{"input", "target"}]})."""
    path, report = Path(path), LoadReport()
    files = _file_or_folder(path, ".json", "BBH data", "a task .json file")
    examples = []
    for file in files:
        try:
            rows = json.loads(file.read_text())["examples"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            _reject(report, strict, f"{file}: not a BBH task file ({error})")
            continue
        for index, row in enumerate(rows):
            if not (isinstance(row, dict) and isinstance(row.get("input"), str) and "target" in row):
                _reject(report, strict, f"{file}: examples[{index}] lacks input/target")
                continue
            task = f"bbh/{file.stem}"
            target = str(row["target"])
            examples.append(SFTExample(_chat(row["input"], target), task, bbh_task_difficulty(file.stem), target))
    report.loaded = len(examples)
    return examples, report


LETTERS = "ABCD"


def read_mmlu_csv(path: Path) -> list[tuple[str, list[str], str]]:
    """(question, four choices, answer letter) rows from either MMLU CSV form.

    The original Hendrycks files have no header and a letter answer; converted copies have a header
    `question,choice0..3,answer` and an integer answer. Both are accepted.
    """
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if rows and [cell.strip().lower() for cell in rows[0]][:1] == ["question"]:
        rows = rows[1:]
    out = []
    for line_no, row in enumerate(rows, 1):
        if len(row) != 6:
            raise DataError(f"{path}: row {line_no} has {len(row)} columns, expected 6 (question, 4 choices, answer)")
        answer = row[5].strip()
        if answer.isdigit() and int(answer) < 4:
            answer = LETTERS[int(answer)]
        if answer not in LETTERS:
            raise DataError(f"{path}: row {line_no} answer {row[5]!r} is not A-D or 0-3")
        out.append((row[0], row[1:5], answer))
    return out


def mmlu_subject(path: Path) -> str:
    return re.sub(r"_(dev|val|test)$", "", path.stem)


def mmlu_question(question: str, choices: list[str]) -> str:
    return question.strip() + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=True))


def load_mmlu(path: str | Path, strict: bool = False) -> tuple[list[SFTExample], LoadReport]:
    """MMLU dev CSVs (a file or a folder); difficulty = question length in words (a scored difficulty)."""
    path, report = Path(path), LoadReport()
    files = _file_or_folder(path, ".csv", "MMLU data", "a subject .csv")
    examples = []
    for file in files:
        try:
            rows = read_mmlu_csv(file)
        except DataError as error:
            _reject(report, strict, str(error))
            continue
        subject = mmlu_subject(file)
        system = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
        for question, choices, answer in rows:
            prompt = mmlu_question(question, choices)
            difficulty = float(len(prompt.split()))
            examples.append(SFTExample(_chat(prompt, answer, system=system), f"mmlu/{subject}", difficulty, answer))
    report.loaded = len(examples)
    return examples, report


def builtin_example(record: Record) -> SFTExample:
    """A built-in record as a reasoning conversation: the worked solution inside <think>, the answer after."""
    reasoning = None
    if record.domain == "math":
        solution = record.text.split("\nAnswer: ", 1)[1].rsplit("\n####", 1)[0]
        reasoning = solution if solution != f"{record.answer}" else None
    elif record.domain == "logic" and "The answer is" in record.text:
        reasoning = record.text.split("\nA: ", 1)[1].split(" The answer is", 1)[0]
    task = f"builtin/{record.domain}"
    return SFTExample(_chat(record.prompt, record.answer, reasoning), task, float(record.difficulty), record.answer)


def load_builtin(
    num_records: int, seed: int = 0, domains: tuple[str, ...] = DOMAINS, max_difficulty: int | None = None
) -> tuple[list[SFTExample], LoadReport]:
    records = builtin_corpus(num_records, seed, domains)
    examples = [builtin_example(r) for r in records if max_difficulty is None or r.difficulty <= max_difficulty]
    return examples, LoadReport(loaded=len(examples))


LOADERS: dict[str, Callable[..., tuple[list[SFTExample], LoadReport]]] = {
    "jsonl": load_jsonl,
    "gsm8k": load_gsm8k,
    "mbpp": load_mbpp,
    "bbh": load_bbh,
    "mmlu": load_mmlu,
}


def load_source(spec: SourceSpec, strict: bool = False) -> tuple[list[SFTExample], LoadReport]:
    """The examples of one typed source spec (its format decides the reader); `task` renames their task."""
    if isinstance(spec, BuiltinSource):
        examples, report = load_builtin(spec.num_records, spec.seed, tuple(spec.domains), spec.max_difficulty)
    elif isinstance(spec, FileSource) and spec.FORMAT in LOADERS:
        examples, report = LOADERS[spec.FORMAT](spec.path, strict=strict)
    else:
        raise DataError(f"unknown SFT source format {spec.format!r}; allowed: {list(FORMATS)}")
    if spec.task is not None:
        for example in examples:
            example.task = spec.task
    return examples, report


def length_difficulty(examples: list[SFTExample]) -> None:
    """Score difficulty as the conversation's length in characters (when the source gives none)."""
    for example in examples:
        example.difficulty = float(sum(len(m["content"]) + len(m.get("reasoning", "")) for m in example.messages))

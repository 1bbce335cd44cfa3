"""`moelm quickstart`: the R1 recipe end to end on a laptop, in one command, with a report.

Stages, each in its own directory under OUT and each resumable: pre-train the tiny preset on the built-in
corpus -> curriculum SFT (math, from easy to hard, with R1-style reasoning available in the chat format) -> GRPO
on verifiable level-1 arithmetic -> the built-in evaluation (the same held-out problems, per domain and level)
after every stage -> routing analytics of the final model -> OUT/report.html (static, opens from disk) and
OUT/report.json with every number. Step budgets scale with --minutes (the default 15 was sized on 2 CPU cores);
a stage whose model exists is not run again, a stage with checkpoints continues from them.
"""

from __future__ import annotations

import functools
import html
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moelm.files import atomic_write_text

if TYPE_CHECKING:
    from moelm.infer.text import TextGenerator
    from moelm.train.recipe import Recipe

STAGES = ("pretrain", "sft", "grpo")
# Steps and evaluation size at the default 15 minutes; scaled linearly (with floors) for other budgets.
BASE_STEPS = {"pretrain": 300, "sft": 200, "grpo": 150}
BASE_EVAL_PROBLEMS = 200
DEFAULT_MINUTES = 15.0


def budget(minutes: float) -> tuple[dict[str, int], int]:
    """Steps per stage and evaluation problems for a time budget."""
    scale = minutes / DEFAULT_MINUTES
    steps = {stage: max(2, round(base * scale)) for stage, base in BASE_STEPS.items()}
    return steps, max(20, round(BASE_EVAL_PROBLEMS * min(scale, 1.0)))


def stage_recipe(stage: str, steps: int, seed: int = 0) -> Recipe:
    """The recipe of one stage, built as objects (the same recipe `moelm pretrain|sft|grpo` would read)."""
    from moelm.config import MoEOptions
    from moelm.data.source_specs import BuiltinSource
    from moelm.train.recipe import DataSection, GRPOSection, OptimSection, Recipe, SFTSection, TrainSection

    every = max(1, steps // 3)
    train = TrainSection(
        seed=seed,
        max_steps=steps,
        batch_size=8 if stage == "grpo" else 16,
        save_every=every,
        eval_every=every,
        log_every=max(1, min(10, steps // 10)),
        keep_last=1,
    )
    if stage == "pretrain":
        return Recipe(
            moe=MoEOptions(bias_update_rate=0.001),
            data=DataSection(source="builtin", builtin_records=6000, vocab_size=2048, seq_len=128),
            optim=OptimSection(lr=3e-3, warmup_steps=20),
            train=train,
        )
    if stage == "sft":
        sources = [BuiltinSource(num_records=6000, seed=1, domains=["math", "code", "logic", "language"])]
        return Recipe(
            data=DataSection(seq_len=128),
            optim=OptimSection(lr=1e-3, warmup_steps=10),
            train=train,
            sft=SFTSection(
                sources=sources,
                difficulty="source",
                pacing="linear",
                pacing_start=0.25,
                pacing_full_at=0.7,
                val_examples=100,
            ),
        )
    return Recipe(
        optim=OptimSection(lr=5e-5, warmup_steps=5, weight_decay=0.0),  # 2e-4 / 5e-4 cost logic 7-18 points
        train=train,
        grpo=GRPOSection(
            # Math and logic, every level (math levels 3-4 are the ones the SFT model sometimes passes): RL on
            # math alone cost logic 4-7 points here.
            sources=[BuiltinSource(num_records=3000, seed=2, domains=["math", "logic"])],
            chat_template=True,
            num_generations=8,
            max_completion_tokens=48,
            rewards={"accuracy": 1.0, "format": 0.1},
            aggregation="dapo",
            dynamic_sampling=True,
            difficulty_sampling=True,
            beta=0.04,  # k3 KL to the SFT model: without it logic fell 1.5 points more in the sweep
            eval_prompts=32,
        ),
    )


def run_stage(
    stage: str, out: Path, steps: int, base_model: Path | None, echo: Callable[[str], None], seed: int = 0
) -> Path:
    """Train one stage into OUT/stage (skipped when its model exists, continued when it has checkpoints)."""
    from moelm.train.grpo import GRPOTrainer
    from moelm.train.sft import SFTTrainer
    from moelm.train.trainer import Trainer

    stage_dir = out / stage
    if (stage_dir / "model" / "config.json").is_file():
        echo(f"{stage}: done already ({stage_dir / 'model'})")
        return stage_dir / "model"
    recipe = stage_recipe(stage, steps, seed)
    silent = lambda _line: None  # noqa: E731 - the stage's own sample printing stays out of the summary
    if stage == "pretrain":
        trainer = Trainer(recipe, stage_dir, echo=silent)
    elif stage == "sft":
        trainer = SFTTrainer(recipe, stage_dir, base_model=base_model, echo=silent)
    else:
        trainer = GRPOTrainer(recipe, stage_dir, base_model=base_model, echo=silent)
    resume = stage_dir.is_dir() and any(stage_dir.iterdir())
    trainer.run(resume=resume)
    return stage_dir / "model"


def _check_run_settings(out: Path, settings: dict[str, float]) -> None:
    """Record the run's seed and budget in OUT/run.json; resuming with other values would mix two runs."""
    path = out / "run.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        for key, value in settings.items():
            if key in recorded and recorded[key] != value:
                flag = "--seed" if key == "seed" else "--minutes"
                raise ValueError(
                    f"{flag} {value} differs from this quickstart's {recorded[key]} ({path}); use another --out"
                )
    atomic_write_text(path, json.dumps(settings))


@functools.lru_cache(maxsize=1)
def _stage_generator(model_dir: Path) -> TextGenerator:
    """The stage's model, loaded once for its greedy and its sampled evaluation."""
    from moelm.infer.text import TextGenerator

    generator = TextGenerator.from_pretrained(model_dir)
    generator.skip_special_tokens = False  # </think> must reach the answer extraction
    return generator


def evaluate_stage(model_dir: Path, out: Path, problems: int) -> dict[str, float]:
    """Greedy accuracy on the held-out built-in problems, per domain and level (cached in OUT/eval-STAGE.json)."""
    from moelm.eval import builtin
    from moelm.eval.common import EvalSettings
    from moelm.eval.lm import EvalModel

    if out.is_file():
        return json.loads(out.read_text())
    generator = _stage_generator(model_dir)
    chat = (model_dir / "tokenizer_config.json").is_file() and model_dir.parent.name != "pretrain"
    settings = EvalSettings(limit=problems, max_new_tokens=64, apply_chat_template=chat)
    result = builtin.evaluate(EvalModel(generator, batch_size=16), None, settings)
    metrics = dict(result.metrics)
    atomic_write_text(out, json.dumps(metrics, indent=1))
    return metrics


PASS_AT = 8  # samples per held-out math problem for pass@k (temperature 1, as GRPO samples)


def math_pass_at_k(model_dir: Path, out: Path, problems: int, k: int = PASS_AT) -> dict[str, float]:
    """Sampled accuracy on the held-out math problems through the chat template: pass@1 (the mean over k samples
    at temperature 1) and pass@k (any of the k right), the quantities RL is said to move (cached in OUT)."""
    from moelm.data.builtin import builtin_corpus
    from moelm.eval.builtin import DOMAINS, HELD_OUT_SEED
    from moelm.eval.exact_match import final_answer, normalise
    from moelm.eval.lm import EvalModel

    if out.is_file():
        return json.loads(out.read_text())
    records = [r for r in builtin_corpus(problems, seed=HELD_OUT_SEED, domains=DOMAINS) if r.domain == "math"]
    generator = _stage_generator(model_dir)
    model = EvalModel(generator, batch_size=16)
    prompts = [generator.chat_prompt([{"role": "user", "content": r.prompt}]) for r in records for _ in range(k)]
    completions = model.generate(prompts, 64, ["<|user|>"], temperature=1.0, seed=0, skip_special=False)
    right = [final_answer(c) == normalise(records[i // k].answer) for i, c in enumerate(completions)]
    per_problem = [right[i * k : (i + 1) * k] for i in range(len(records))]
    metrics = {
        "math_pass@1": sum(right) / max(len(right), 1),
        f"math_pass@{k}": sum(any(p) for p in per_problem) / max(len(per_problem), 1),
    }
    atomic_write_text(out, json.dumps(metrics, indent=1))
    return metrics


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def write_report(out: Path, evaluations: dict[str, dict[str, float]], analysis: dict[str, Any], times: dict) -> Path:
    """OUT/report.json and OUT/report.html with the figures beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {stage: _metrics(out / stage) for stage in STAGES}
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for axis, stage in zip(axes, STAGES, strict=True):
        key = "reward" if stage == "grpo" else "loss"
        points = [(r["step"], r[key]) for r in curves[stage] if key in r]
        axis.plot([p[0] for p in points], [p[1] for p in points])
        axis.set_title(f"{stage}: {key}")
        axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(out / "curves.png")
    plt.close(figure)

    domains = sorted({k.split("/")[1] for m in evaluations.values() for k in m if k.count("/") == 1})
    figure, axis = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / max(len(evaluations), 1)
    for i, (stage, metrics) in enumerate(evaluations.items()):
        axis.bar(
            [d + i * width for d in range(len(domains))],
            [metrics.get(f"accuracy/{name}", 0.0) for name in domains],
            width,
            label=f"after {stage}",
        )
    axis.set_xticks([d + width for d in range(len(domains))], domains)
    axis.set_ylabel("held-out accuracy (greedy)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "accuracy.png")
    plt.close(figure)

    run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    report = {
        "run": run,
        "evaluations": evaluations,
        "analysis": analysis.get("mean_over_layers", {}),
        "stage_seconds": times,
    }
    report["analysis_per_layer"] = {
        layer: {k: v for k, v in values.items() if k in ("mi_bits", "mi_shuffled_bits", "load_max_over_mean")}
        for layer, values in analysis.get("layers", {}).items()
    }
    report["final"] = {stage: (curves[stage][-1] if curves[stage] else {}) for stage in STAGES}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))

    sampled = ("math_pass@1", f"math_pass@{PASS_AT}")
    rows = "".join(
        f"<tr><td>{html.escape(stage)}</td><td>{m.get('accuracy', 0):.3f}</td>"
        + "".join(f"<td>{m.get(f'accuracy/{d}', 0):.3f}</td>" for d in domains)
        + "".join(f"<td>{m[key]:.3f}</td>" if key in m else "<td>-</td>" for key in sampled)
        + "</tr>"
        for stage, m in evaluations.items()
    )
    mean = report["analysis"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>moelm quickstart</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}td,th{{padding:2px 8px}}
img{{max-width:100%}}</style></head><body><h1>moelm quickstart</h1>
<h2>Held-out built-in accuracy after each stage</h2>
<table><tr><th>after</th><th>all</th>{"".join(f"<th>{html.escape(d)}</th>" for d in domains)}
<th>math pass@1 (T=1)</th><th>math pass@{PASS_AT}</th></tr>{rows}</table>
<img src="accuracy.png" alt="accuracy per domain"><h2>Training curves</h2><img src="curves.png" alt="curves">
<h2>What the experts learned</h2><p>Mean over MoE layers of the final model: I(domain; expert) =
{mean.get("mi_bits", 0):.4f} bits against {mean.get("mi_shuffled_bits", 0):.4f} with shuffled domain labels;
expert load max/mean {mean.get("load_max_over_mean", 0):.3f}. Full analysis:
<a href="analysis/report.html">analysis/report.html</a>.</p>
<img src="analysis/specialisation.png" alt="specialisation"><img src="analysis/expert_load.png" alt="load">
<img src="analysis/load_over_time.png" alt="load over time"></body></html>"""
    atomic_write_text(out / "report.html", page)
    return out / "report.html"


def quickstart(out: Path, minutes: float = DEFAULT_MINUTES, echo: Callable[[str], None] = print, seed: int = 0) -> Path:
    """Run every stage (skipping finished ones), evaluate, analyse and report; returns the report's path.

    `seed` seeds every stage's initialisation and data order (train.seed); the held-out problems stay the same
    for every seed, so runs with different seeds are compared on the same questions.
    """
    from moelm.analysis.report import analyze

    steps, problems = budget(minutes)
    out.mkdir(parents=True, exist_ok=True)
    _check_run_settings(out, {"seed": seed, "minutes": minutes})
    evaluations: dict[str, dict[str, float]] = {}
    times: dict[str, float] = {}
    model_dir: Path | None = None
    for stage in STAGES:
        start = time.perf_counter()
        model_dir = run_stage(stage, out, steps[stage], model_dir, echo, seed)
        evaluations[stage] = evaluate_stage(model_dir, out / f"eval-{stage}.json", problems)
        if stage != "pretrain":  # chat-format stages: sampled pass@1 / pass@k on the math problems
            evaluations[stage].update(math_pass_at_k(model_dir, out / f"passk-{stage}.json", problems))
        times[stage] = round(time.perf_counter() - start, 1)
        last = (_metrics(out / stage) or [{}])[-1]
        shown = "reward" if stage == "grpo" else "loss"
        value = last.get(shown)
        echo(f"{stage}: {steps[stage]} steps, {shown} {value:.3f}" if isinstance(value, float) else f"{stage}: done")
        echo(f"{stage}: held-out accuracy {evaluations[stage]['accuracy']:.3f} ({times[stage]:.0f} s)")
    metrics = out / "pretrain" / "metrics.jsonl"
    analysis = analyze(model_dir, out / "analysis", metrics=metrics, limit=200, overwrite=True)  # derived: redo
    return write_report(out, evaluations, analysis, times)

"""Why GRPO does not move the quickstart's tiny model: what its SFT policy solves when sampling, and the GRPO
stage's settings tried on the way to the shipped one, each scored on the quickstart's own held-out problems.

1. pass@1 / pass@k of the SFT model on built-in math *training* prompts (seed 2, the GRPO draw), per level:
   `--per-level` prompts x k samples at temperature 1 through the chat template.
2. For each variant, the quickstart's GRPO stage (`moelm.quickstart.stage_recipe("grpo", steps)` plus the
   variant's changes) from the same SFT model, then greedy accuracy per domain on the 200 held-out problems.

    python benchmarks/probes/grpo_stage.py --model runs/quickstart/sft/model [--steps 150 --variants ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from moelm.data.builtin import builtin_corpus
from moelm.eval.exact_match import final_answer, normalise
from moelm.infer.text import TextGenerator
from moelm.quickstart import evaluate_stage, stage_recipe
from moelm.train.grpo import GRPOTrainer

MATH = {"domains": ["math"]}
VARIANTS: dict[str, dict] = {
    "math_lr2e-4": {"optim": {"lr": 2e-4}, "grpo": {"beta": 0.0}, "sources": MATH},
    "math_logic_lr2e-4": {"optim": {"lr": 2e-4}, "grpo": {"beta": 0.0}},
    "math_logic_lr5e-5": {"grpo": {"beta": 0.0}},
    "shipped": {},  # math and logic, lr 5e-5, KL 0.04
    # LoRA under RL (rank 16 on attention, experts and shared experts; the base frozen, so the other domains keep
    # more of the SFT model), at learning rates 6-20x the full-weight one
    "lora_r16_lr1e-3": {"lora": {"rank": 16, "alpha": 32.0}, "optim": {"lr": 1e-3}, "grpo": {"beta": 0.0}},
    "lora_r16_lr3e-4": {"lora": {"rank": 16, "alpha": 32.0}, "optim": {"lr": 3e-4}, "grpo": {"beta": 0.0}},
    "lora_math_r16_lr1e-3": {
        "lora": {"rank": 16, "alpha": 32.0},
        "optim": {"lr": 1e-3},
        "grpo": {"beta": 0.0},
        "sources": MATH,
    },
    "shipped_300_steps": {"steps": 300},  # the budget the 15-minute main job leaves room for
    "lora_math_r16_lr1e-3_300_steps": {
        "lora": {"rank": 16, "alpha": 32.0},
        "optim": {"lr": 1e-3},
        "grpo": {"beta": 0.0},
        "sources": MATH,
        "steps": 300,
    },
    "lora_math_r16_lr3e-3": {
        "lora": {"rank": 16, "alpha": 32.0},
        "optim": {"lr": 3e-3},
        "grpo": {"beta": 0.0},
        "sources": MATH,
    },
}


def sampled_pass_rates(model: Path, per_level: int, k: int) -> dict[str, float]:
    generator = TextGenerator.from_pretrained(model)
    by_level = defaultdict(list)
    for record in builtin_corpus(600, seed=2, domains=("math",)):
        by_level[record.difficulty].append(record)
    results = {}
    for level, records in sorted(by_level.items()):
        records = records[:per_level]
        prompts = [generator.chat_prompt([{"role": "user", "content": r.prompt}]) for r in records for _ in range(k)]
        replies: list[str] = []
        for first in range(0, len(prompts), 64):
            chunk = prompts[first : first + 64]
            replies += generator.generate(chunk, 48, temperature=1.0, seed=first, skip_special_tokens=False)
        right = [final_answer(reply) == normalise(records[i // k].answer) for i, reply in enumerate(replies)]
        results[f"level{level}_pass@1"] = sum(right) / len(right)
        results[f"level{level}_pass@{k}"] = sum(any(right[i * k : (i + 1) * k]) for i in range(len(records))) / len(
            records
        )
    return results


def stage_variant(model: Path, name: str, steps: int) -> dict[str, float]:
    changes = dict(VARIANTS[name])
    recipe = stage_recipe("grpo", changes.pop("steps", steps), 0)
    sources = changes.pop("sources", None)
    if sources is not None:
        spec = recipe.grpo.sources[0]
        changes["grpo"] = {**changes.get("grpo", {}), "sources": [{**spec.to_mapping(), **sources}]}
    recipe = recipe.replace(**changes, log={"progress": False})
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        GRPOTrainer(recipe, Path(out), echo=lambda _: None, base_model=model).run()
        result = Path(out) / ("adapter" if recipe.lora.rank else "model")
        metrics = evaluate_stage(result, Path(out) / "eval.json", 200)
        seconds = time.perf_counter() - start
    picked = {k: v for k, v in metrics.items() if k.count("/") <= 1 and k != "n"}
    return {**{f"{name}_{k}": v for k, v in picked.items()}, f"{name}_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the quickstart's SFT model")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--per-level", type=int, default=24, help="0 skips the sampled pass rates")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    args = parser.parse_args()
    before = evaluate_stage(args.model, Path(tempfile.mkdtemp()) / "eval.json", 200)
    results: dict[str, float] = {f"sft_{k}": v for k, v in before.items() if k.count("/") <= 1 and k != "n"}
    if args.per_level:
        results.update(sampled_pass_rates(args.model, args.per_level, args.k))
    for name in filter(None, args.variants.split(",")):
        results.update(stage_variant(args.model, name, args.steps))
        shown = {k: round(v, 3) for k, v in results.items() if k.startswith(name + "_")}
        print(f"{name} done: {json.dumps(shown)}", flush=True)
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
    main()

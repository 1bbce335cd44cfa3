"""GRPO on the built-in arithmetic: held-out greedy exact match before and after, per seed and variant.

Starts from an SFT model (the README's SFT command, or the quickstart's `runs/quickstart/sft/model`), runs
`configs/grpo-tiny.yaml` for a fixed number of steps per seed and variant, and scores the same held-out problems
(built-in seed 1000, never trained on) before and after, greedily through the chat template, per difficulty level.
Variants: `plain` (the recipe), `dynamic` (+ DAPO dynamic sampling and online prompt difficulty), `replay`
(dynamic + routing replay). Per run it reports the reward curve (PNG), the share of zero-variance groups drawn
and kept, the share of wall time spent in rollouts, the routing drift between rollout and training forwards and
the clip fractions, then the rollout engine's tokens/s against plain `generate` of the same batch shape.

    python benchmarks/grpo_builtin.py --model runs/quickstart/sft/model [--steps 60 --seeds 0,1 --problems 200
        --variants plain,dynamic,replay --set grpo.num_iterations=2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

from common import timed

from moelm.data.builtin import builtin_corpus
from moelm.eval.exact_match import final_answer, normalise
from moelm.infer.text import TextGenerator
from moelm.train.grpo import GRPOTrainer
from moelm.train.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "grpo-tiny.yaml"
DRIFT = "grpo.routing_drift=true"
VARIANTS = {
    "plain": [DRIFT],
    "dynamic": [DRIFT, "grpo.dynamic_sampling=true", "grpo.difficulty_sampling=true"],
    "replay": [DRIFT, "grpo.dynamic_sampling=true", "grpo.difficulty_sampling=true", "grpo.routing_replay=true"],
}


def mean(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if key in r]
    return sum(values) / len(values) if values else float("nan")


def held_out_accuracy(generator: TextGenerator, problems: list, max_new_tokens: int) -> dict[str, float]:
    """Greedy exact match on the problems, overall and per level."""
    prompts = [generator.chat_prompt([{"role": "user", "content": r.prompt}]) for r in problems]
    replies: list[str] = []
    for first in range(0, len(prompts), 32):
        replies += generator.generate(prompts[first : first + 32], max_new_tokens, skip_special_tokens=False)
    per_level: dict[str, list[bool]] = defaultdict(list)
    for record, reply in zip(problems, replies, strict=True):
        correct = final_answer(reply) == normalise(record.answer)
        per_level["accuracy"].append(correct)
        per_level[f"accuracy/level{record.difficulty}"].append(correct)
    return {name: sum(v) / len(v) for name, v in sorted(per_level.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the SFT model (runs/sft-tiny/model)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default="plain,dynamic,replay", help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--plot", type=Path, default=Path("grpo_reward.png"))
    parser.add_argument("--set", action="append", default=[], help="recipe override, as for moelm grpo")
    args = parser.parse_args()
    problems = list(builtin_corpus(args.problems, seed=1000, domains=("math",)))
    recipe = load_recipe(RECIPE, args.set)
    max_new = recipe.grpo.max_completion_tokens
    base = TextGenerator.from_pretrained(args.model)
    base.model.eval()
    before = held_out_accuracy(base, problems, max_new)
    results: dict[str, float] = {f"before_{k}": v for k, v in before.items()}
    curves = {}
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            overrides = [f"train.seed={seed}", f"train.max_steps={args.steps}", "train.log_every=1"]
            overrides += ["log.progress=false", *VARIANTS[variant], *args.set]
            with tempfile.TemporaryDirectory() as out:
                recipe = load_recipe(RECIPE, overrides)
                trainer = GRPOTrainer(recipe, out, echo=lambda _: None, base_model=args.model)
                wall, model = timed(trainer.run)
                records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
                records = [r for r in records if "reward" in r]
                tuned = TextGenerator(model.eval(), base.tokenizer, base.chat_template)
                after = held_out_accuracy(tuned, problems, max_new)
            run = f"{variant}_seed{seed}"
            curves[run] = [r["reward"] for r in records]
            results.update({f"{run}_after_{k}": v for k, v in after.items()})
            results[f"{run}_gain_points"] = 100 * (after["accuracy"] - before["accuracy"])
            results[f"{run}_rollout_share"] = sum(r["rollout_seconds"] for r in records) / wall
            results[f"{run}_rollout_tok_s"] = mean(records, "rollout_tokens_per_s")
            results[f"{run}_zero_std_drawn"] = mean(records, "frac_reward_zero_std_drawn")
            results[f"{run}_zero_std_kept"] = mean(records, "frac_reward_zero_std")
            results[f"{run}_sampling_rounds"] = mean(records, "sampling_rounds")
            results[f"{run}_routing_drift"] = mean(records, "routing_drift")
            results[f"{run}_clip_low"] = mean(records, "clip_low")
            results[f"{run}_clip_high"] = mean(records, "clip_high")
            results[f"{run}_reward_first10"] = sum(curves[run][:10]) / max(len(curves[run][:10]), 1)
            results[f"{run}_reward_last10"] = sum(curves[run][-10:]) / max(len(curves[run][-10:]), 1)
            results[f"{run}_seconds"] = wall
            print(f"{run}: accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} in {wall:.0f} s", flush=True)
    # the engine alone on the rollout shape: 8 prompts x 8 samples, sampled at temperature 1
    prompts = [base.chat_prompt([{"role": "user", "content": r.prompt}]) for r in problems[:8] for _ in range(8)]
    seconds, texts = timed(lambda: base.generate(prompts, max_new, temperature=1.0, seed=0))
    tokens = sum(len(base.tokenizer.encode(t).ids) for t in texts)
    results["generate_tok_s"] = tokens / seconds
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for run, curve in curves.items():
            plt.plot(range(1, len(curve) + 1), curve, label=run)
        plt.xlabel("step")
        plt.ylabel("mean reward of the rollouts")
        plt.legend()
        plt.savefig(args.plot, dpi=100)
        results["plot"] = str(args.plot)
    except ImportError:
        pass
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()

"""GRPO on the built-in arithmetic: held-out greedy exact match before and after, per seed, with the reward curve.

Starts from the SFT model of the README's SFT command, runs `configs/grpo-tiny.yaml` for a fixed number of steps
per seed, and scores the same held-out problems (built-in seed 1000, never trained on) before and after, greedily
through the chat template, per difficulty level. Also reports the share of wall time spent in rollouts and the
rollout engine's tokens/s against plain `generate` of the same batch shape.

    python benchmarks/grpo_builtin.py --model runs/sft-tiny/model [--steps 60 --seeds 0,1 --problems 200]
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
    for seed in (int(s) for s in args.seeds.split(",")):
        overrides = [f"train.seed={seed}", f"train.max_steps={args.steps}", "train.log_every=1", "log.progress=false"]
        overrides += args.set
        with tempfile.TemporaryDirectory() as out:
            trainer = GRPOTrainer(load_recipe(RECIPE, overrides), out, echo=lambda _: None, base_model=args.model)
            wall, model = timed(trainer.run)
            records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            tuned = TextGenerator(model.eval(), base.tokenizer, base.chat_template)
            after = held_out_accuracy(tuned, problems, max_new)
        curves[seed] = [r["reward"] for r in records]
        rollout = sum(r["rollout_seconds"] for r in records)
        results.update({f"seed{seed}_after_{k}": v for k, v in after.items()})
        results[f"seed{seed}_gain_points"] = 100 * (after["accuracy"] - before["accuracy"])
        results[f"seed{seed}_rollout_share"] = rollout / wall
        results[f"seed{seed}_rollout_tok_s"] = sum(r["rollout_tokens_per_s"] for r in records) / len(records)
        print(f"seed {seed}: accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} in {wall:.0f} s", flush=True)
    # the engine alone on the rollout shape: 8 prompts x 8 samples, sampled at temperature 1
    prompts = [base.chat_prompt([{"role": "user", "content": r.prompt}]) for r in problems[:8] for _ in range(8)]
    seconds, texts = timed(lambda: base.generate(prompts, max_new, temperature=1.0, seed=0))
    tokens = sum(len(base.tokenizer.encode(t).ids) for t in texts)
    results["generate_tok_s"] = tokens / seconds
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for seed, curve in curves.items():
            plt.plot(range(1, len(curve) + 1), curve, label=f"seed {seed}")
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

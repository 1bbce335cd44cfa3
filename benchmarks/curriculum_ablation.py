"""Curriculum vs no curriculum (and anti-curriculum) at equal steps, judged by held-out exact match.

Fine-tunes the same base model with configs/sft-tiny.yaml three times, changing only sft.pacing /
sft.anti_curriculum, and scores the same held-out built-in math problems (levels 1-4) with greedy decoding.
Needs a base model: `moelm pretrain --config configs/pretrain-tiny.yaml --out runs/tiny` (about 2.5 minutes).

    python benchmarks/curriculum_ablation.py --model runs/tiny/model [--steps 300]

Last line: JSON with exact match overall and per level for each arm.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

from moelm.eval.exact_match import chat_exact_match
from moelm.infer.text import TextGenerator
from moelm.train.recipe import load_recipe
from moelm.train.sft import SFTTrainer

ROOT = Path(__file__).resolve().parent.parent
ARMS = {
    "none": ["sft.pacing=none"],
    "linear": ["sft.pacing=linear"],
    "anti": ["sft.pacing=linear", "sft.anti_curriculum=true"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seed", type=int, default=0, help="train.seed: data order and held-out split")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm in args.arms.split(","):
            overrides = [*ARMS[arm], f"train.max_steps={args.steps}", f"train.seed={args.seed}", "log.progress=false"]
            overrides.append("train.eval_every=100000")
            overrides.append("sft.eval_exact_match=false")
            recipe = load_recipe(ROOT / "configs/sft-tiny.yaml", overrides)
            trainer = SFTTrainer(recipe, Path(tmp) / arm, echo=lambda _: None, base_model=args.model)
            model = trainer.run()
            generator = TextGenerator(model.eval(), trainer.prepare_tokenizer(), trainer.chat_template())
            metrics, samples = chat_exact_match(generator, trainer.held_out, recipe.sft.max_new_tokens, 25)
            per_level = defaultdict(list)
            for sample in samples:
                per_level[int(sample["difficulty"])].append(sample["correct"])
            results[arm] = {
                "exact_match": metrics["exact_match"],
                **{f"level{k}": sum(v) / len(v) for k, v in sorted(per_level.items())},
                "final_loss": trainer.history[-1]["loss"],
                "held_out": len(samples),
            }
            print(arm, json.dumps(results[arm]), flush=True)
    print(json.dumps({"steps": args.steps, "seed": args.seed, **results}))


if __name__ == "__main__":
    main()

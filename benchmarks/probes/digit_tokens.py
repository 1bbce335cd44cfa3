"""Does a tokenizer that splits digits give the quickstart a policy RL can improve at math?

Runs `moelm quickstart` (default budget) with the shipped tokenizer and with data.split_digits=true in the
pre-training stage (the later stages inherit the tokenizer), per seed, and prints each stage's held-out accuracy
per domain and the sampled math pass@1 / pass@8 after SFT and GRPO as one JSON object.

    python benchmarks/probes/digit_tokens.py --out runs/digit-probe [--seeds 0 1] [--minutes 15]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import moelm.quickstart as quickstart_module
from moelm.quickstart import quickstart

SHIPPED_RECIPE = quickstart_module.stage_recipe


def with_split_digits(stage: str, steps: int, seed: int = 0):  # noqa: ANN201 - Recipe
    recipe = SHIPPED_RECIPE(stage, steps, seed)
    return recipe.replace(data={"split_digits": True}) if stage == "pretrain" else recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--variants", nargs="+", default=["shipped", "split_digits"])
    args = parser.parse_args()
    results = {}
    for seed in args.seeds:
        for variant in args.variants:
            quickstart_module.stage_recipe = with_split_digits if variant == "split_digits" else SHIPPED_RECIPE
            out = args.out / f"{variant}-seed{seed}"
            quickstart(out, args.minutes, echo=lambda line: None, seed=seed)
            report = json.loads((out / "report.json").read_text())
            results[f"{variant}/seed{seed}"] = {
                stage: {k: round(v, 3) for k, v in metrics.items() if k.startswith(("accuracy/", "math_pass"))}
                for stage, metrics in report["evaluations"].items()
            }
    quickstart_module.stage_recipe = SHIPPED_RECIPE
    print(json.dumps(results))


if __name__ == "__main__":
    main()

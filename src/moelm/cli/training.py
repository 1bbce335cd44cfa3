"""`moelm pretrain`, `sft`, `grpo` and `quickstart`: recipes into output directories."""

from __future__ import annotations

import argparse
from pathlib import Path

from moelm.cli import common


def cmd_quickstart(args: argparse.Namespace) -> None:
    """Pre-train -> SFT -> GRPO -> evaluation after each -> routing analytics -> report, in one command."""
    from moelm.quickstart import quickstart

    if args.out.is_dir() and any(args.out.iterdir()) and not args.resume:
        raise ValueError(f"--out {args.out} is not empty; pass --resume to continue that quickstart or choose another")
    report = quickstart(args.out, args.minutes, seed=args.seed)
    print(f"report: {report}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    """Pre-train from a recipe into OUT (checkpoints, metrics.jsonl, model/), optionally resuming."""
    from moelm.train.recipe import load_recipe
    from moelm.train.trainer import Trainer

    recipe = load_recipe(args.config, args.set)
    Trainer(recipe, args.out).run(args.resume, args.overwrite, args.allow_recipe_change)
    print(f"model saved to {args.out / 'model'}; metrics in {args.out / 'metrics.jsonl'}")


def cmd_sft(args: argparse.Namespace) -> None:
    """Fine-tune a model directory on a multi-task, curriculum-paced SFT recipe."""
    from moelm.train.recipe import load_recipe
    from moelm.train.sft import SFTTrainer

    recipe = load_recipe(args.config, args.set)
    SFTTrainer(recipe, args.out, base_model=args.model).run(args.resume, args.overwrite, args.allow_recipe_change)
    print(_saved(recipe, args.out))


def cmd_grpo(args: argparse.Namespace) -> None:
    """Reinforce a model directory with GRPO on verifiable rewards (recipe section `grpo`)."""
    from moelm.train.grpo import GRPOTrainer
    from moelm.train.recipe import load_recipe

    recipe = load_recipe(args.config, args.set)
    GRPOTrainer(recipe, args.out, base_model=args.model).run(args.resume, args.overwrite, args.allow_recipe_change)
    print(_saved(recipe, args.out))


def _saved(recipe, out: Path) -> str:  # noqa: ANN001 - a Recipe
    """Where a fine-tuning run left its result: the model, or for LoRA the adapter directory."""
    if recipe.lora.rank:
        return (
            f"LoRA adapter saved to {out / 'adapter'} (PEFT format; --model {out / 'adapter'} runs it on its base, "
            f"`moelm export --merge-lora` writes a plain model); metrics in {out / 'metrics.jsonl'}"
        )
    return f"model saved to {out / 'model'}; metrics in {out / 'metrics.jsonl'}"


def register(sub: argparse._SubParsersAction) -> None:
    """The quickstart, pretrain, sft and grpo subcommands."""
    quick = sub.add_parser("quickstart", help="the R1 pipeline on a laptop: pretrain, SFT, GRPO, eval, report")
    quick.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    quick.add_argument("--minutes", type=common.POSITIVE_FLOAT, default=15.0, help="time budget the steps are sized to")
    quick.add_argument("--resume", action="store_true", help="continue a quickstart in --out")
    quick.add_argument("--seed", type=common.SEED, default=0, help="seed of every stage (held-out problems stay fixed)")
    quick.set_defaults(func=cmd_quickstart)

    pretrain = sub.add_parser("pretrain", help="pre-train a model from a YAML recipe")
    common.add_recipe_args(pretrain)
    pretrain.set_defaults(func=cmd_pretrain)

    sft = sub.add_parser("sft", help="multi-task fine-tuning with a curriculum from a YAML recipe")
    sft.add_argument("--model", type=Path, required=True, help="base model directory (with tokenizer.json)")
    common.add_recipe_args(sft)
    sft.set_defaults(func=cmd_sft)

    grpo = sub.add_parser("grpo", help="reinforcement learning with verifiable rewards (GRPO) from a YAML recipe")
    grpo.add_argument("--model", type=Path, required=True, help="policy to start from (model directory)")
    common.add_recipe_args(grpo)
    grpo.set_defaults(func=cmd_grpo)

"""`moelm plan`: per-rank memory, traffic and a step-time bound of a layout, before launching it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moelm.cli import common

GPU_NAMES = ("h100", "h800", "h200", "a100")  # moelm.dist.plan.GPUS, kept import-free for --help


def layout_from_recipe(recipe, gpus: int, sharding: str | None, gpus_per_node: int):  # noqa: ANN001, ANN201
    """The recipe's parallel and train sections as a plan Layout on `gpus` GPUs."""
    from moelm.dist.plan import Layout

    parallel, train = recipe.parallel, recipe.train
    fsdp = parallel.fsdp if parallel.fsdp is not None else gpus > 1
    return Layout(
        gpus=gpus,
        pipeline_degree=parallel.pipeline_degree,
        expert_degree=parallel.expert_degree,
        sharding=sharding or ("fsdp" if fsdp else "none"),
        schedule=parallel.pipeline_schedule,
        virtual_stages=parallel.virtual_stages,
        batch_size=train.batch_size,
        grad_accum=train.grad_accum,
        seq_len=recipe.data.seq_len,
        checkpointing=recipe.moe.activation_checkpointing,
        activation_bytes=2 if train.dtype == "bfloat16" else 4,
        reshard_after_forward=parallel.reshard_after_forward,
        gpus_per_node=gpus_per_node,
    )


def cmd_plan(args: argparse.Namespace) -> None:
    """Print the plan of the recipe's layout; when it does not fit, the fastest layouts that do."""
    from moelm.config import load_config
    from moelm.dist.plan import format_plan, layouts_that_fit, make_plan
    from moelm.train.recipe import apply_overrides, load_yaml, recipe_from_dict

    # --model replaces the recipe's model section; `--set model.KEY=VALUE` still applies to it.
    raw = load_yaml(Path(args.recipe).read_text()) or {} if args.recipe else {}
    if not isinstance(raw, dict):
        raise ValueError(f"{args.recipe}: a recipe is a mapping of sections")
    raw["model"] = load_config(args.model).to_dict()
    recipe = recipe_from_dict(apply_overrides(raw, args.set))
    config = recipe.model
    layout = layout_from_recipe(recipe, args.gpus, args.sharding, args.gpus_per_node)
    plan = make_plan(config, layout, args.gpu, args.link_gbps, name=str(args.model))
    alternatives = [] if plan.fits else layouts_that_fit(config, layout, args.gpu, args.link_gbps)[:3]
    if args.json:
        print(json.dumps({**plan.to_dict(), "fitting_layouts": [a.to_dict()["layout"] for a in alternatives]}))
        return
    print(format_plan(plan))
    if not plan.fits:
        if not alternatives:
            print(
                "no pipeline x expert degree with FSDP fits this batch on these GPUs: more GPUs, a smaller "
                "micro-batch (train.batch_size) or moe.activation_checkpointing=full"
            )
        for other in alternatives:
            o = other.layout
            print(
                f"fits: --set parallel.pipeline_degree={o.pipeline_degree} --set parallel.expert_degree="
                f"{o.expert_degree} (FSDP): peak {other.peak_memory / 2**30:.2f} GiB, step >= {other.step_s:.3f} s"
            )


def register(sub: argparse._SubParsersAction) -> None:
    """The plan subcommand."""
    plan = sub.add_parser("plan", help="per-rank memory, traffic and step time of a parallel layout")
    plan.add_argument("--model", required=True, help="preset, YAML, config.json or model directory")
    plan.add_argument("--recipe", default=None, help="the training recipe (its parallel/train/data sections)")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    plan.add_argument("--gpus", type=common.POSITIVE_INT, required=True, help="GPUs in the run")
    plan.add_argument("--gpu", choices=GPU_NAMES, default="h100", help="GPU model (spec-sheet figures)")
    plan.add_argument("--link-gbps", type=common.POSITIVE_FLOAT, default=400.0, help="network per GPU, Gb/s")
    plan.add_argument("--gpus-per-node", type=common.POSITIVE_INT, default=8, help="GPUs joined by NVLink")
    plan.add_argument("--sharding", choices=("fsdp", "zero1", "none"), default=None, help="default: the recipe's")
    plan.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    plan.set_defaults(func=cmd_plan)

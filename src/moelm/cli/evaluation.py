"""`moelm eval` and `moelm lm-eval`: benchmarks as lm-evaluation-harness runs them, or through the harness itself."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moelm.cli import common


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a model on benchmark tasks, or score a file of precomputed completions."""
    from moelm.eval.common import EvalSettings
    from moelm.eval.harness import (
        check_task_data,
        parse_tasks,
        results_table,
        run_tasks,
        score_predictions,
        write_results,
    )

    if args.predictions is not None:
        if not args.task:
            raise ValueError("--predictions needs --task humaneval|mbpp|gsm8k")
        document = score_predictions(args.task, args.predictions, args.data_dir)
    else:
        if args.model is None:
            raise ValueError("moelm eval needs --model DIR (or --task and --predictions FILE)")
        from moelm.eval.lm import EvalModel

        tasks = parse_tasks(args.task or args.tasks)
        check_task_data(tasks, args.data_dir)  # every task's files, before the model is even loaded
        settings = EvalSettings(
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            samples=args.samples,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            fewshot_seed=args.fewshot_seed,
            max_new_tokens=args.max_new_tokens,
            apply_chat_template=args.apply_chat_template,
        )
        if settings.samples > 1 and settings.temperature == 0:
            print("moelm: note: several samples with temperature 0 are identical", file=sys.stderr)
        generator = common.load_generator(args)
        bar = common.progress_bar("requests")
        model = EvalModel(generator, args.batch_size, bar.update if bar is not None else None)
        model.prefix_caching = not args.no_prefix_caching
        if bar is not None:
            model.expect = lambda count: common.grow_total(bar, count)
        document = run_tasks(model, str(args.model), tasks, args.data_dir, settings)
        if bar is not None:
            bar.close()
    print(results_table(document))
    if args.output is not None:
        write_results(document, args.output)
        print(f"results written to {args.output}")
    failed = document.get("failed") or {}
    if failed:
        kept = f"; the finished tasks' results are in {args.output}" if args.output is not None else ""
        details = "; ".join(f"{name}: {message}" for name, message in failed.items())
        raise common.EvalTaskError(f"task(s) {', '.join(failed)} failed ({details}){kept}")


def cmd_lm_eval(args: argparse.Namespace) -> None:
    """Hand the command line to lm-eval after registering moelm as its `moelm` model backend."""
    try:
        from moelm.eval.lm_eval_backend import main as lm_eval_main
    except ImportError as error:
        raise ValueError(f"moelm lm-eval needs lm-evaluation-harness: pip install moelm[lm-eval] ({error})") from None
    forwarded = list(args.harness_args)
    lm_eval_main(forwarded[1:] if forwarded[:1] == ["--"] else forwarded)


def register(sub: argparse._SubParsersAction) -> None:
    """The eval and lm-eval subcommands."""
    harness = sub.add_parser(
        "lm-eval",
        help="lm-evaluation-harness's CLI with the `moelm` backend registered (--model moelm)",
        add_help=False,
    )
    harness.add_argument("harness_args", nargs=argparse.REMAINDER, help="lm_eval's own arguments")
    harness.set_defaults(func=cmd_lm_eval)

    evaluate = sub.add_parser("eval", help="evaluate on GSM8K/MMLU/BBH/HumanEval/MBPP/built-in tasks")
    evaluate.add_argument("--model", type=Path, default=None, help="model directory with tokenizer.json")
    common.add_device_args(evaluate)
    evaluate.add_argument(
        "--tasks",
        default="builtin",
        help="comma-separated: gsm8k,gsm8k_cot,gsm8k_reasoning,mmlu,bbh,humaneval,mbpp,builtin",
    )
    evaluate.add_argument("--task", default=None, help="one task (with --predictions: humaneval|mbpp|gsm8k)")
    evaluate.add_argument("--predictions", type=Path, default=None, help="JSONL of {task_id, completion} to score")
    evaluate.add_argument("--data-dir", type=Path, default=None, help="folder with gsm8k/ mmlu/ bbh/ humaneval/ mbpp/")
    evaluate.add_argument(
        "--limit", type=common.POSITIVE_INT, default=None, help="first N documents per task (MMLU: per subject)"
    )
    evaluate.add_argument(
        "--num-fewshot",
        type=common.NON_NEGATIVE_INT,
        default=None,
        help="override the task's shot count (lm-eval's default)",
    )
    evaluate.add_argument("--samples", type=common.POSITIVE_INT, default=1, help="completions per problem (pass@k)")
    evaluate.add_argument("--compile", action="store_true", help="compile the decode step (long generation runs)")
    evaluate.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="prefill every prompt in full (default: prompt blocks shared by few-shot prompts are computed once)",
    )
    evaluate.add_argument("--temperature", type=common.NON_NEGATIVE_FLOAT, default=0.0)
    evaluate.add_argument("--top-p", type=common.TOP_P, default=1.0)
    evaluate.add_argument("--seed", type=common.SEED, default=1234)
    evaluate.add_argument(
        "--fewshot-seed", type=common.SEED, default=1234, help="seed of the harness's random few-shot sampler (gsm8k)"
    )
    evaluate.add_argument("--max-new-tokens", type=common.POSITIVE_INT, default=None)
    evaluate.add_argument("--batch-size", type=common.POSITIVE_INT, default=8)
    evaluate.add_argument("--apply-chat-template", action="store_true", help="wrap prompts in the chat template")
    evaluate.add_argument("--output", type=Path, default=None, help="results JSON (metrics, settings, samples)")
    evaluate.set_defaults(func=cmd_eval)

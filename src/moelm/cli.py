"""`moelm` command line: each subcommand parses arguments and calls the Python API, nothing more."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from moelm.config import ConfigError, ModelConfig, load_config, preset_names
from moelm.model.hf import CheckpointError
from moelm.model.transformer import MoELM

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float8": 1}


def model_summary(model: MoELM) -> dict[str, float]:
    """Parameter counts (total, active per token, MTP) and weight memory per dtype, for reports."""
    total = model.num_parameters()
    summary: dict[str, float] = {
        "total_parameters": total,
        "active_parameters": model.num_active_parameters(),
        "mtp_parameters": model.num_parameters(include_mtp=True) - total,
    }
    for dtype, nbytes in DTYPE_BYTES.items():
        summary[f"weights_gib_{dtype}"] = model.num_parameters(include_mtp=True) * nbytes / 1024**3
    return summary


def _format_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _print_summary(config: ModelConfig, model: MoELM) -> None:
    summary = model_summary(model)
    layers = config.num_hidden_layers
    moe_layers = sum(config.is_moe_layer(i) for i in range(layers))
    print(
        f"layers: {layers} ({moe_layers} MoE, {layers - moe_layers} dense)  attention: {config.attention}  "
        f"experts: {config.n_routed_experts} routed (top-{config.num_experts_per_tok}, "
        f"{config.n_group} groups keep {config.topk_group}) + {config.n_shared_experts} shared, "
        f"scoring: {config.scoring_func}  MTP depths: {config.num_nextn_predict_layers}"
    )
    print(f"total parameters:  {_format_count(summary['total_parameters'])}  (excluding MTP)")
    print(f"active per token:  {_format_count(summary['active_parameters'])}")
    print(f"MTP parameters:    {_format_count(summary['mtp_parameters'])}")
    for dtype in DTYPE_BYTES:
        print(f"weights in {dtype:<9} {summary[f'weights_gib_{dtype}']:.3f} GiB")


def cmd_info(args: argparse.Namespace) -> None:
    """Print configuration, parameter counts and weight memory of a preset, YAML, config.json or model dir."""
    config = load_config(args.model)
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")
    with torch.device("meta"):
        model = MoELM(config)
    _print_summary(config, model)


def cmd_demo(args: argparse.Namespace) -> None:
    """Build a model from a preset, report its size and run one forward pass with a loss."""
    config = load_config(args.preset)
    torch.manual_seed(args.seed)
    model = MoELM(config).eval()
    _print_summary(config, model)
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    start = time.perf_counter()
    with torch.no_grad():
        out = model(tokens, labels=tokens)
    elapsed = time.perf_counter() - start
    loads = {layer: r.tokens_per_expert_E.tolist() for layer, r in out.routing.items()}
    mtp = f", MTP loss {out.mtp_loss.item():.4f}" if out.mtp_loss is not None else ""
    print(
        f"forward {args.batch_size}x{args.seq_len}: logits {tuple(out.logits.shape)}, "
        f"LM loss {out.lm_loss.item():.4f}{mtp} (random init: ln(vocab) = {math.log(config.vocab_size):.4f})"
    )
    print(f"  {args.batch_size * args.seq_len / elapsed:,.0f} tokens/s; tokens per expert by layer: {loads}")
    if args.save:
        model.save_pretrained(args.save)
        print(f"saved HF DeepseekV3 directory to {args.save}")


def _sampling(args: argparse.Namespace):  # noqa: ANN202 - SamplingParams
    from moelm.infer.sampling import SamplingParams

    return SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)


def _load_generator(args: argparse.Namespace):  # noqa: ANN202 - TextGenerator
    """The model directory as a TextGenerator, its decode step compiled when --compile asks for it."""
    from moelm.infer.generate import compile_decode
    from moelm.infer.text import TextGenerator

    generator = TextGenerator.from_pretrained(args.model)
    generator.model.eval()
    if args.compile:
        compile_decode(generator.model)
    return generator


def cmd_generate(args: argparse.Namespace) -> None:
    """Complete one prompt (streamed with --stream), then report tokens/s."""
    from moelm.infer.generate import GenerationStats

    generator = _load_generator(args)
    if args.compile:  # compile this shape untimed, so tokens/s reports the compiled step
        print("moelm: compiling the decode step...", file=sys.stderr)
        for _ in generator.stream(args.prompt, args.max_new_tokens, _sampling(args), args.stop, args.seed):
            pass
    stats = GenerationStats()
    start = time.perf_counter()
    pieces = generator.stream(
        args.prompt, args.max_new_tokens, _sampling(args), args.stop, args.seed, stats, args.speculative
    )
    if args.stream:
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
    else:
        print("".join(pieces))
    elapsed = time.perf_counter() - start
    extra = f", draft acceptance {stats.acceptance_rate:.0%}" if args.speculative else ""
    print(f"[{stats.new_tokens} tokens, {stats.new_tokens / elapsed:.1f} tokens/s{extra}]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    """Interactive chat: role template, <think> shown dimmed (or hidden), tokens/s after each answer."""
    from moelm.infer.generate import GenerationStats
    from moelm.infer.text import render_thinking

    generator = _load_generator(args)
    generator.skip_special_tokens = False  # keep <think> tags so reasoning can be dimmed or hidden
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("moelm chat: empty line or Ctrl-D to leave", file=sys.stderr)
    first_answer = True
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        stats, answer, inside = GenerationStats(), [], False
        start = time.perf_counter()
        for piece in generator.stream(
            generator.chat_prompt(messages), args.max_new_tokens, _sampling(args), ["<|"], args.seed, stats
        ):
            answer.append(piece)
            shown, inside = render_thinking(piece, not args.hide_think, inside)
            print(shown, end="", flush=True)
        elapsed = time.perf_counter() - start
        note = ", includes compiling" if args.compile and first_answer else ""  # its shape compiled meanwhile
        first_answer = False
        print(f"\n[{stats.new_tokens / max(elapsed, 1e-9):.1f} tokens/s{note}]", file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(answer).split("</think>")[-1].strip()})


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model directory with tokenizer.json")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def cmd_pretrain(args: argparse.Namespace) -> None:
    """Pre-train from a recipe into OUT (checkpoints, metrics.jsonl, model/), optionally resuming."""
    from moelm.train.recipe import load_recipe
    from moelm.train.trainer import Trainer

    recipe = load_recipe(args.config, args.set)
    Trainer(recipe, args.out).run(resume=args.resume)
    print(f"model saved to {args.out / 'model'}; metrics in {args.out / 'metrics.jsonl'}")


def cmd_sft(args: argparse.Namespace) -> None:
    """Fine-tune a model directory on a multi-task, curriculum-paced SFT recipe."""
    from moelm.train.recipe import load_recipe
    from moelm.train.sft import SFTTrainer

    recipe = load_recipe(args.config, args.set)
    SFTTrainer(recipe, args.out, base_model=args.model).run(resume=args.resume)
    print(f"model saved to {args.out / 'model'}; metrics in {args.out / 'metrics.jsonl'}")


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a model on benchmark tasks, or score a file of precomputed completions."""
    from moelm.eval.common import EvalSettings
    from moelm.eval.harness import parse_tasks, results_table, run_tasks, score_predictions, write_results

    if args.predictions is not None:
        if not args.task:
            raise ValueError("--predictions needs --task humaneval|mbpp|gsm8k")
        document = score_predictions(args.task, args.predictions, args.data_dir)
    else:
        if args.model is None:
            raise ValueError("moelm eval needs --model DIR (or --task and --predictions FILE)")
        from moelm.eval.lm import EvalModel

        tasks = parse_tasks(args.task or args.tasks)
        settings = EvalSettings(
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            samples=args.samples,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            apply_chat_template=args.apply_chat_template,
        )
        if settings.samples > 1 and settings.temperature == 0:
            print("moelm: note: several samples with temperature 0 are identical", file=sys.stderr)
        generator = _load_generator(args)
        bar = _progress_bar("requests")
        model = EvalModel(generator, args.batch_size, bar.update if bar is not None else None)
        document = run_tasks(model, str(args.model), tasks, args.data_dir, settings)
        if bar is not None:
            bar.close()
    print(results_table(document))
    if args.output is not None:
        write_results(document, args.output)
        print(f"results written to {args.output}")


def _progress_bar(unit: str):  # noqa: ANN202 - tqdm or None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(unit=unit, dynamic_ncols=True, file=sys.stderr, mininterval=1.0)


def cmd_data_builtin(args: argparse.Namespace) -> None:
    """Write the built-in corpus as JSONL (text, domain, difficulty, prompt, answer)."""
    import json

    from moelm.data.builtin import builtin_corpus

    with open(args.out, "w") as handle:
        for record in builtin_corpus(args.num_records, seed=args.seed):
            handle.write(json.dumps(record.to_dict()) + "\n")
    print(f"wrote {args.num_records} records to {args.out}")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    """Train a byte-level BPE tokenizer on a data source and save tokenizer.json."""
    from moelm.data.sources import iter_documents
    from moelm.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(iter_documents(args.data, args.text_field), vocab_size=args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out / "tokenizer.json"))
    print(f"tokenizer with {tokenizer.get_vocab_size()} tokens saved to {args.out / 'tokenizer.json'}")


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="recipe YAML (default: built-in defaults)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="moelm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="configuration, parameter counts and memory of a model")
    info.add_argument("model", help=f"preset ({', '.join(preset_names())}), YAML, config.json or model dir")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="build a preset model, print its size and run a forward pass")
    demo.add_argument("--preset", default="tiny", help="preset name or YAML file")
    demo.add_argument("--batch-size", type=int, default=2)
    demo.add_argument("--seq-len", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--save", type=Path, default=None, help="also write the model as an HF directory")
    demo.set_defaults(func=cmd_demo)

    generate = sub.add_parser("generate", help="complete a prompt with a model directory")
    _add_sampling_args(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    generate.add_argument("--speculative", action="store_true", help="draft with the model's MTP head")
    compile_help = "capture the decode step as one compiled graph (tens of seconds once; several times faster)"
    generate.add_argument("--compile", action="store_true", help=compile_help)
    generate.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with a model directory")
    _add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--compile", action="store_true", help=compile_help)
    chat.add_argument("--hide-think", action="store_true", help="hide <think> reasoning instead of dimming it")
    chat.set_defaults(func=cmd_chat)

    pretrain = sub.add_parser("pretrain", help="pre-train a model from a YAML recipe")
    _add_recipe_args(pretrain)
    pretrain.set_defaults(func=cmd_pretrain)

    sft = sub.add_parser("sft", help="multi-task fine-tuning with a curriculum from a YAML recipe")
    sft.add_argument("--model", type=Path, required=True, help="base model directory (with tokenizer.json)")
    _add_recipe_args(sft)
    sft.set_defaults(func=cmd_sft)

    evaluate = sub.add_parser("eval", help="evaluate on GSM8K/MMLU/BBH/HumanEval/MBPP/built-in tasks")
    evaluate.add_argument("--model", type=Path, default=None, help="model directory with tokenizer.json")
    evaluate.add_argument(
        "--tasks",
        default="builtin",
        help="comma-separated: gsm8k,gsm8k_cot,gsm8k_reasoning,mmlu,bbh,humaneval,mbpp,builtin",
    )
    evaluate.add_argument("--task", default=None, help="one task (with --predictions: humaneval|mbpp|gsm8k)")
    evaluate.add_argument("--predictions", type=Path, default=None, help="JSONL of {task_id, completion} to score")
    evaluate.add_argument("--data-dir", type=Path, default=None, help="folder with gsm8k/ mmlu/ bbh/ humaneval/ mbpp/")
    evaluate.add_argument("--limit", type=int, default=None, help="first N documents per task (MMLU: per subject)")
    evaluate.add_argument("--num-fewshot", type=int, default=None, help="override the task's standard shot count")
    evaluate.add_argument("--samples", type=int, default=1, help="completions per problem (pass@k)")
    evaluate.add_argument("--compile", action="store_true", help="compile the decode step (long generation runs)")
    evaluate.add_argument("--temperature", type=float, default=0.0)
    evaluate.add_argument("--top-p", type=float, default=1.0)
    evaluate.add_argument("--seed", type=int, default=1234)
    evaluate.add_argument("--max-new-tokens", type=int, default=None)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--apply-chat-template", action="store_true", help="wrap prompts in the chat template")
    evaluate.add_argument("--output", type=Path, default=None, help="results JSON (metrics, settings, samples)")
    evaluate.set_defaults(func=cmd_eval)

    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    builtin = data.add_parser("builtin", help="write the built-in multi-domain corpus as JSONL")
    builtin.add_argument("--out", type=Path, required=True)
    builtin.add_argument("--num-records", type=int, default=1000)
    builtin.add_argument("--seed", type=int, default=0)
    builtin.set_defaults(func=cmd_data_builtin)

    tok = sub.add_parser("tokenizer", help="tokenizer utilities").add_subparsers(dest="tok_command", required=True)
    tok_train = tok.add_parser("train", help="train a byte-level BPE tokenizer")
    tok_train.add_argument("--data", required=True, help="'builtin', a .jsonl/.txt file or a folder")
    tok_train.add_argument("--text-field", default="text")
    tok_train.add_argument("--vocab-size", type=int, default=2048)
    tok_train.add_argument("--out", type=Path, required=True)
    tok_train.set_defaults(func=cmd_tokenizer_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `moelm` console script; user errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"moelm: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`moelm` command line: each subcommand parses arguments and calls the Python API, nothing more.

torch and the model are imported inside the commands, so `--help`, `--version` and argument errors answer at
once; every numeric flag is checked by the parser, so a bad value is a one-line usage error, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from moelm import __version__
from moelm.config import load_config, preset_names
from moelm.schema import DEVICE_ALLOWED, DEVICE_PATTERN

if TYPE_CHECKING:
    from moelm.config import ModelConfig
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
    import torch

    from moelm.model.transformer import MoELM

    config = load_config(args.model)
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")
    with torch.device("meta"):
        model = MoELM(config)
    _print_summary(config, model)
    if Path(args.model).is_dir():
        _print_directory(Path(args.model))


def _print_directory(path: Path) -> None:
    """Architecture, quantisation and files of a model directory, read from its metadata only."""
    import json

    from moelm.model.fp8 import block_size

    raw = json.loads((path / "config.json").read_text())
    block = block_size(raw)
    files = sorted(path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    quantised = f"FP8 e4m3, {block[0]}x{block[1]} block scales" if block else "none"
    print(f"architecture:      {raw.get('model_type', 'unknown')} ({', '.join(raw.get('architectures') or [])})")
    print(f"quantisation:      {quantised}  stored dtype: {raw.get('torch_dtype', 'unknown')}")
    print(f"weight files:      {len(files)} ({size / 1024**3:.3f} GiB on disk)")


def cmd_demo(args: argparse.Namespace) -> None:
    """Build a model from a preset, report its size and run one forward pass with a loss."""
    import torch

    from moelm.model.transformer import MoELM

    config = load_config(args.preset)
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's {config.max_position_embeddings} positions")
    torch.manual_seed(args.seed)
    model = MoELM(config).eval()
    _print_summary(config, model)
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    start = time.perf_counter()
    with torch.no_grad():
        out = model(tokens, labels=tokens)
    elapsed = time.perf_counter() - start
    mtp = f", MTP loss {out.mtp_loss.item():.4f}" if out.mtp_loss is not None else ""
    print(
        f"forward {args.batch_size}x{args.seq_len}: logits {tuple(out.logits.shape)}, "
        f"LM loss {out.lm_loss.item():.4f}{mtp} (random init: ln(vocab) = {math.log(config.vocab_size):.4f})"
    )
    print(f"  {args.batch_size * args.seq_len / elapsed:,.0f} tokens/s; tokens per expert (max/mean load):")
    for layer, routing in out.routing.items():
        counts = routing.tokens_per_expert_E
        shown = " ".join(str(int(c)) for c in counts.tolist())
        print(f"  layer {layer}: {shown}  ({(counts.max() / counts.mean()).item():.2f})")
    if args.save:
        model.save_pretrained(args.save)
        print(f"saved HF DeepseekV3 directory to {args.save}")


def _device(spec: str):  # noqa: ANN202 - torch.device
    """--device checked against this machine before the model loads."""
    from moelm.devices import resolve_device

    return resolve_device(spec)


def _sampling(args: argparse.Namespace):  # noqa: ANN202 - SamplingParams
    from moelm.infer.sampling import SamplingParams

    return SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)


def _load_generator(args: argparse.Namespace):  # noqa: ANN202 - TextGenerator
    """The model directory as a TextGenerator, its decode step compiled when --compile asks for it."""
    from moelm.infer.text import TextGenerator

    generator = TextGenerator.from_pretrained(args.model, dtype=_dtype(args.dtype), device=_device(args.device))
    generator.model.eval()
    if args.compile:
        generator.compile()
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


def use_colour(stream: object = None) -> bool:
    """ANSI colour only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    stream = stream if stream is not None else sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


NO_TEMPLATE_NOTE = (
    "note: {model} has no chat template (it was never chat-tuned); moelm's default template is used, so replies "
    "may be empty or off-format: fine-tune it with `moelm sft` first"
)
EMPTY_ANSWER_NOTE = "[empty answer: the model ended its turn without text]"


def cmd_chat(args: argparse.Namespace) -> None:
    """Interactive chat: role template, <think> shown dimmed (or hidden), tokens/s after each answer."""
    from moelm.infer.generate import GenerationStats
    from moelm.infer.text import render_thinking

    generator = _load_generator(args)
    generator.skip_special_tokens = False  # keep <think> tags so reasoning can be dimmed or hidden
    colour = use_colour()
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    if not generator.chat_tuned:
        print(NO_TEMPLATE_NOTE.format(model=args.model), file=sys.stderr)
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
            shown, inside = render_thinking(piece, not args.hide_think, inside, dim=colour)
            print(shown, end="", flush=True)
        elapsed = time.perf_counter() - start
        note = ", includes compiling" if args.compile and first_answer else ""  # its shape compiled meanwhile
        first_answer = False
        if not "".join(answer).split("</think>")[-1].strip():
            print(EMPTY_ANSWER_NOTE, file=sys.stderr)
        print(f"\n[{stats.new_tokens / max(elapsed, 1e-9):.1f} tokens/s{note}]", file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(answer).split("</think>")[-1].strip()})


DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: str | None):  # noqa: ANN202 - torch.dtype or None
    """The torch dtype a --dtype flag names (None: the checkpoint's default)."""
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def _number(kind: type, allowed: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: parse as `kind`, then check the range; the message says what is allowed."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    parse.__name__ = allowed  # argparse names the type in some messages
    return parse


POSITIVE_INT = _number(int, "a positive integer", lambda v: v > 0)


def DEVICE(text: str) -> str:  # noqa: N802 - an argparse type, named like the others
    """--device: auto, cpu, cuda or cuda:N (whether it exists here is checked when the model loads)."""
    if re.fullmatch(DEVICE_PATTERN, text) is None:
        raise argparse.ArgumentTypeError(f"must be {DEVICE_ALLOWED}, got {text!r}")
    return text


PORT = _number(int, "a port number in 1..65535", lambda v: 0 < v < 65536)
NON_NEGATIVE_INT = _number(int, "a non-negative integer", lambda v: v >= 0)
NON_NEGATIVE_FLOAT = _number(float, "a non-negative number", lambda v: v >= 0)
POSITIVE_FLOAT = _number(float, "a positive number", lambda v: v > 0)
TOP_P = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
MIN_P = _number(float, "a number in [0, 1)", lambda v: 0 <= v < 1)
SEED = _number(int, "an integer in 0..2**63-1", lambda v: 0 <= v < 2**63)


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model directory with tokenizer.json")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="load the weights in this dtype")
    parser.add_argument("--device", type=DEVICE, default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64)
    parser.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=NON_NEGATIVE_INT, default=0, help="0 = off")
    parser.add_argument("--top-p", type=TOP_P, default=1.0)
    parser.add_argument("--min-p", type=MIN_P, default=0.0)
    parser.add_argument("--repetition-penalty", type=POSITIVE_FLOAT, default=1.0)
    parser.add_argument("--seed", type=SEED, default=None)


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve a model directory over the OpenAI HTTP API until interrupted."""
    try:
        from moelm.serve.app import ServerConfig, serve
    except ImportError as error:
        raise RuntimeError(
            f"serving needs the serve extra ({error.name} is missing): pip install 'moelm[serve]'"
        ) from None
    from moelm.infer.text import TextGenerator

    generator = TextGenerator.from_pretrained(args.model, dtype=_dtype(args.dtype), device=_device(args.device))
    config = ServerConfig(
        model_name=args.served_model_name or args.model.resolve().name,
        api_key=args.api_key or None,
        max_batch=args.max_batch,
        max_model_len=args.max_model_len,
        max_waiting=args.max_waiting,
    )
    print(f"moelm: serving {args.model} as '{config.model_name}' on http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(generator, config, args.host, args.port, args.log_level)


def cmd_export(args: argparse.Namespace) -> None:
    """Write a training checkpoint (verified against its manifest) as an HF model directory."""
    import shutil

    from moelm.files import DamagedFileError, verify_manifest
    from moelm.model.transformer import MoELM

    checkpoint = args.checkpoint
    if not (checkpoint / "model" / "config.json").is_file():
        raise ValueError(f"--checkpoint {checkpoint}: not a moelm checkpoint (expected {checkpoint}/model/config.json)")
    if (checkpoint / "manifest.json").is_file():
        try:
            verify_manifest(checkpoint)
        except DamagedFileError as error:
            raise ValueError(f"--checkpoint {checkpoint}: {error}") from None
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {args.out} is not empty; pass --overwrite to replace the model files in it")
    model = MoELM.from_pretrained(checkpoint / "model", dtype=_dtype(args.dtype))
    model.save_pretrained(args.out, max_shard_bytes=args.max_shard_size, quantization=args.quantization)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (checkpoint / "model" / name).is_file():
            shutil.copyfile(checkpoint / "model" / name, args.out / name)
    if (checkpoint / "run.json").is_file():  # provenance: the recipe and versions that produced these weights
        shutil.copyfile(checkpoint / "run.json", args.out / "run.json")
    print(f"exported {checkpoint} to {args.out}")


def cmd_quickstart(args: argparse.Namespace) -> None:
    """Pre-train -> SFT -> GRPO -> evaluation after each -> routing analytics -> report, in one command."""
    from moelm.quickstart import quickstart

    if args.out.is_dir() and any(args.out.iterdir()) and not args.resume:
        raise ValueError(f"--out {args.out} is not empty; pass --resume to continue that quickstart or choose another")
    report = quickstart(args.out, args.minutes, seed=args.seed)
    print(f"report: {report}")


def cmd_analyze(args: argparse.Namespace) -> None:
    """Routing analytics of one model (report.html, report.json, PNGs), or several side by side."""
    from moelm.analysis.report import analyze, compare

    if args.compare:
        summaries = {}
        for index, model_dir in enumerate(args.compare):
            summary = analyze(model_dir, args.out / f"run{index}", args.data, None, args.limit, args.overwrite)
            summaries[f"run{index} {model_dir}"] = summary
        print(compare(summaries))
        print(f"reports in {args.out}/run*/report.html")
        return
    if args.model is None:
        raise ValueError("moelm analyze needs --model DIR or --compare DIR1 DIR2 ...")
    summary = analyze(args.model, args.out, args.data, args.metrics, args.limit, args.overwrite)
    mean = summary["mean_over_layers"]
    print(
        f"{summary['tokens']} tokens; mean over MoE layers: load max/mean {mean['load_max_over_mean']:.3f}, "
        f"routing entropy {mean['routing_entropy']:.3f}, I(domain; expert) {mean['mi_bits']:.4f} bits "
        f"(shuffled domains {mean['mi_shuffled_bits']:.4f})"
    )
    print(f"report: {args.out / 'report.html'}")


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
    print(f"model saved to {args.out / 'model'}; metrics in {args.out / 'metrics.jsonl'}")


def cmd_grpo(args: argparse.Namespace) -> None:
    """Reinforce a model directory with GRPO on verifiable rewards (recipe section `grpo`)."""
    from moelm.train.grpo import GRPOTrainer
    from moelm.train.recipe import load_recipe

    recipe = load_recipe(args.config, args.set)
    GRPOTrainer(recipe, args.out, base_model=args.model).run(args.resume, args.overwrite, args.allow_recipe_change)
    print(f"model saved to {args.out / 'model'}; metrics in {args.out / 'metrics.jsonl'}")


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
        generator = _load_generator(args)
        bar = _progress_bar("requests")
        model = EvalModel(generator, args.batch_size, bar.update if bar is not None else None)
        if bar is not None:
            model.expect = lambda count: _grow_total(bar, count)
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
        raise EvalTaskError(f"task(s) {', '.join(failed)} failed ({details}){kept}")


def cmd_lm_eval(args: argparse.Namespace) -> None:
    """Hand the command line to lm-eval after registering moelm as its `moelm` model backend."""
    try:
        from moelm.eval.lm_eval_backend import main as lm_eval_main
    except ImportError as error:
        raise ValueError(f"moelm lm-eval needs lm-evaluation-harness: pip install moelm[lm-eval] ({error})") from None
    forwarded = list(args.harness_args)
    lm_eval_main(forwarded[1:] if forwarded[:1] == ["--"] else forwarded)


class EvalTaskError(RuntimeError):
    """Some tasks of an evaluation failed after others finished (their results are kept)."""


def _grow_total(bar, count: int) -> None:  # noqa: ANN001 - tqdm
    """Tasks build their requests one after another: the bar's total grows as each announces its count."""
    bar.total = (bar.total or 0) + count
    bar.refresh()


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
    from moelm.files import atomic_write_text

    records = builtin_corpus(args.num_records, seed=args.seed)
    atomic_write_text(args.out, "".join(json.dumps(record.to_dict()) + "\n" for record in records))
    print(f"wrote {args.num_records} records to {args.out}")


def cmd_data_traces(args: argparse.Namespace) -> None:
    """Rejection sampling: G completions per prompt from a teacher, verified, kept as SFT records."""
    from moelm.train.traces import sample_traces, trace_prompts, write_traces

    prompts = trace_prompts(args.source, args.data_dir, args.num_prompts, args.seed)
    generator = _load_generator(args)
    records = sample_traces(
        generator, prompts, args.samples, args.temperature, args.max_new_tokens, args.keep, args.seed
    )
    counts = write_traces(records, args.out)
    summary = ", ".join(f"{name} {count}" for name, count in sorted(counts.items())) or "nothing kept"
    print(
        f"{len(prompts)} prompts x {args.samples} samples -> {sum(counts.values())} records in {args.out} ({summary})"
    )


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    """Train a byte-level BPE tokenizer on a data source and save tokenizer.json."""
    from moelm.data.sources import iter_documents
    from moelm.data.tokenizer import save_tokenizer_file, train_tokenizer

    tokenizer = train_tokenizer(iter_documents(args.data, args.text_field), vocab_size=args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    save_tokenizer_file(tokenizer, args.out / "tokenizer.json")
    print(f"tokenizer with {tokenizer.get_vocab_size()} tokens saved to {args.out / 'tokenizer.json'}")


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="recipe YAML (default: built-in defaults)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the latest intact checkpoint in --out")
    mode.add_argument("--overwrite", action="store_true", help="delete the run already in --out and start over")
    parser.add_argument(
        "--allow-recipe-change",
        action="store_true",
        help="with --resume: accept recipe changes beyond cadence, length, device and layout (recorded in run.json)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="moelm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"moelm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="configuration, parameter counts and memory of a model")
    info.add_argument("model", help=f"preset ({', '.join(preset_names())}), YAML, config.json or model dir")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="build a preset model, print its size and run a forward pass")
    demo.add_argument("--preset", default="tiny", help="preset name or YAML file")
    demo.add_argument("--batch-size", type=POSITIVE_INT, default=2)
    demo.add_argument("--seq-len", type=POSITIVE_INT, default=64)
    demo.add_argument("--seed", type=SEED, default=0)
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

    server = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    server.add_argument("--model", required=True, type=Path, help="model directory with tokenizer.json")
    server.add_argument("--dtype", choices=DTYPES, default=None, help="load the weights in this dtype")
    server.add_argument("--device", type=DEVICE, default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    server.add_argument("--port", type=PORT, default=8000)
    server.add_argument(
        "--api-key", default=os.environ.get("MOELM_API_KEY"), help="require this bearer key (default $MOELM_API_KEY)"
    )
    server.add_argument("--served-model-name", default=None, help="model id clients send (default: the dir name)")
    server.add_argument("--max-batch", type=POSITIVE_INT, default=16, help="requests decoded together")
    server.add_argument("--max-model-len", type=POSITIVE_INT, default=None, help="prompt + completion tokens")
    server.add_argument("--max-waiting", type=POSITIVE_INT, default=256, help="queued requests before 429")
    server.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    server.set_defaults(func=cmd_serve)

    export = sub.add_parser("export", help="write a training checkpoint as an HF model directory")
    export.add_argument("--checkpoint", required=True, type=Path, help="OUT/checkpoints/step-N")
    export.add_argument("--out", required=True, type=Path, help="the HF directory to write")
    export.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in --out")
    export.add_argument("--dtype", choices=DTYPES, default=None, help="store the weights in this dtype")
    export.add_argument("--max-shard-size", default="5GB", help="split into shards of at most this size")
    export.add_argument("--quantization", choices=("fp8",), default=None, help="DeepSeek's block-scaled FP8")
    export.set_defaults(func=cmd_export)

    quick = sub.add_parser("quickstart", help="the R1 pipeline on a laptop: pretrain, SFT, GRPO, eval, report")
    quick.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    quick.add_argument("--minutes", type=POSITIVE_FLOAT, default=15.0, help="time budget the steps are sized to")
    quick.add_argument("--resume", action="store_true", help="continue a quickstart in --out")
    quick.add_argument("--seed", type=SEED, default=0, help="seed of every stage (held-out problems stay fixed)")
    quick.set_defaults(func=cmd_quickstart)

    analyze = sub.add_parser("analyze", help="routing analytics: expert load, co-selection, specialisation")
    analyze.add_argument("--model", type=Path, default=None, help="model directory with tokenizer.json")
    analyze.add_argument("--data", default="builtin", help="builtin, or a JSONL file with text and domain fields")
    analyze.add_argument("--metrics", type=Path, default=None, help="a run's metrics.jsonl (load over time)")
    analyze.add_argument("--out", type=Path, default=Path("analysis"), help="where the report goes")
    analyze.add_argument("--limit", type=POSITIVE_INT, default=400, help="documents to route")
    analyze.add_argument("--compare", type=Path, nargs="+", default=None, help="several model directories")
    analyze.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    analyze.set_defaults(func=cmd_analyze)

    pretrain = sub.add_parser("pretrain", help="pre-train a model from a YAML recipe")
    _add_recipe_args(pretrain)
    pretrain.set_defaults(func=cmd_pretrain)

    sft = sub.add_parser("sft", help="multi-task fine-tuning with a curriculum from a YAML recipe")
    sft.add_argument("--model", type=Path, required=True, help="base model directory (with tokenizer.json)")
    _add_recipe_args(sft)
    sft.set_defaults(func=cmd_sft)

    grpo = sub.add_parser("grpo", help="reinforcement learning with verifiable rewards (GRPO) from a YAML recipe")
    grpo.add_argument("--model", type=Path, required=True, help="policy to start from (model directory)")
    _add_recipe_args(grpo)
    grpo.set_defaults(func=cmd_grpo)

    harness = sub.add_parser(
        "lm-eval",
        help="lm-evaluation-harness's CLI with the `moelm` backend registered (--model moelm)",
        add_help=False,
    )
    harness.add_argument("harness_args", nargs=argparse.REMAINDER, help="lm_eval's own arguments")
    harness.set_defaults(func=cmd_lm_eval)

    evaluate = sub.add_parser("eval", help="evaluate on GSM8K/MMLU/BBH/HumanEval/MBPP/built-in tasks")
    evaluate.add_argument("--model", type=Path, default=None, help="model directory with tokenizer.json")
    evaluate.add_argument("--dtype", choices=DTYPES, default=None, help="load the weights in this dtype")
    evaluate.add_argument("--device", type=DEVICE, default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    evaluate.add_argument(
        "--tasks",
        default="builtin",
        help="comma-separated: gsm8k,gsm8k_cot,gsm8k_reasoning,mmlu,bbh,humaneval,mbpp,builtin",
    )
    evaluate.add_argument("--task", default=None, help="one task (with --predictions: humaneval|mbpp|gsm8k)")
    evaluate.add_argument("--predictions", type=Path, default=None, help="JSONL of {task_id, completion} to score")
    evaluate.add_argument("--data-dir", type=Path, default=None, help="folder with gsm8k/ mmlu/ bbh/ humaneval/ mbpp/")
    evaluate.add_argument(
        "--limit", type=POSITIVE_INT, default=None, help="first N documents per task (MMLU: per subject)"
    )
    evaluate.add_argument(
        "--num-fewshot", type=NON_NEGATIVE_INT, default=None, help="override the task's shot count (lm-eval's default)"
    )
    evaluate.add_argument("--samples", type=POSITIVE_INT, default=1, help="completions per problem (pass@k)")
    evaluate.add_argument("--compile", action="store_true", help="compile the decode step (long generation runs)")
    evaluate.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=0.0)
    evaluate.add_argument("--top-p", type=TOP_P, default=1.0)
    evaluate.add_argument("--seed", type=SEED, default=1234)
    evaluate.add_argument(
        "--fewshot-seed", type=SEED, default=1234, help="seed of the harness's random few-shot sampler (gsm8k)"
    )
    evaluate.add_argument("--max-new-tokens", type=POSITIVE_INT, default=None)
    evaluate.add_argument("--batch-size", type=POSITIVE_INT, default=8)
    evaluate.add_argument("--apply-chat-template", action="store_true", help="wrap prompts in the chat template")
    evaluate.add_argument("--output", type=Path, default=None, help="results JSON (metrics, settings, samples)")
    evaluate.set_defaults(func=cmd_eval)

    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    builtin = data.add_parser("builtin", help="write the built-in multi-domain corpus as JSONL")
    builtin.add_argument("--out", type=Path, required=True)
    builtin.add_argument("--num-records", type=POSITIVE_INT, default=1000)
    builtin.add_argument("--seed", type=SEED, default=0)
    builtin.set_defaults(func=cmd_data_builtin)

    traces = data.add_parser("traces", help="rejection-sample verified reasoning traces from a model (SFT records)")
    traces.add_argument("--model", type=Path, required=True, help="teacher model directory")
    traces.add_argument("--dtype", choices=DTYPES, default=None, help="load the weights in this dtype")
    traces.add_argument("--device", type=DEVICE, default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    traces.add_argument("--source", default="builtin", help="builtin, gsm8k, mbpp (with --data-dir) or a JSONL file")
    traces.add_argument("--data-dir", type=Path, default=None)
    traces.add_argument("--num-prompts", type=POSITIVE_INT, default=200)
    traces.add_argument("--samples", type=POSITIVE_INT, default=4, help="completions per prompt (G)")
    traces.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=1.0)
    traces.add_argument("--max-new-tokens", type=POSITIVE_INT, default=96)
    traces.add_argument("--keep", choices=["correct", "best", "all"], default="correct")
    traces.add_argument("--seed", type=SEED, default=0)
    traces.add_argument("--compile", action="store_true", help=compile_help)
    traces.add_argument("--out", type=Path, required=True, help="JSONL of {prompt, reasoning, response, verdict}")
    traces.set_defaults(func=cmd_data_traces)

    tok = sub.add_parser("tokenizer", help="tokenizer utilities").add_subparsers(dest="tok_command", required=True)
    tok_train = tok.add_parser("train", help="train a byte-level BPE tokenizer")
    tok_train.add_argument("--data", required=True, help="'builtin', a .jsonl/.txt file or a folder")
    tok_train.add_argument("--text-field", default="text")
    tok_train.add_argument("--vocab-size", type=POSITIVE_INT, default=2048)
    tok_train.add_argument("--out", type=Path, required=True)
    tok_train.set_defaults(func=cmd_tokenizer_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `moelm` console script.

    User errors print one line and exit 2, a failed evaluation task 1, an interrupted run 130 (SIGINT) or 143
    (SIGTERM) after saying where it can resume from.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # every later argument is lm-eval's own, --help included
        argv = ["lm-eval", "--", *argv[1:]] if len(argv) > 1 else argv
    args = build_parser().parse_args(argv)
    from moelm.train.interrupt import TrainingInterrupted

    try:
        args.func(args)
    except TrainingInterrupted as stop:
        print(f"moelm: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("\nmoelm: interrupted", file=sys.stderr)
        return 130
    except EvalTaskError as error:
        print(f"moelm: error: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as error:  # ConfigError, CheckpointError, DataError, ...
        print(f"moelm: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

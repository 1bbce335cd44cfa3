"""`moelm generate`, `chat` and `serve`: text from a model directory, one prompt, a conversation or over HTTP."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from moelm.cli import common


def cmd_generate(args: argparse.Namespace) -> None:
    """Complete one prompt (streamed with --stream), then report tokens/s."""
    from moelm.infer.generate import GenerationStats

    generator = common.load_generator(args)
    if args.compile:  # compile this shape untimed, so tokens/s reports the compiled step
        print("moelm: compiling the decode step...", file=sys.stderr)
        for _ in generator.stream(args.prompt, args.max_new_tokens, common.sampling(args), args.stop, args.seed):
            pass
    stats = GenerationStats()
    start = time.perf_counter()
    pieces = generator.stream(
        args.prompt, args.max_new_tokens, common.sampling(args), args.stop, args.seed, stats, args.speculative
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

    generator = common.load_generator(args)
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
            generator.chat_prompt(messages), args.max_new_tokens, common.sampling(args), ["<|"], args.seed, stats
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


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve a model directory over the OpenAI HTTP API until interrupted."""
    try:
        from moelm.serve.app import ServerConfig, serve
    except ImportError as error:
        raise RuntimeError(
            f"serving needs the serve extra ({error.name} is missing): pip install 'moelm[serve]'"
        ) from None
    from moelm.infer.text import TextGenerator

    generator = TextGenerator.from_pretrained(
        args.model,
        dtype=common.dtype(args.dtype),
        device=common.device(args.device),
        activation_dtype=args.activation_dtype,
        quantize=args.quantize,
    )
    if args.compile:
        generator.compile()
    config = ServerConfig(
        model_name=args.served_model_name or args.model.resolve().name,
        api_key=args.api_key or None,
        max_batch=args.max_batch,
        max_model_len=args.max_model_len,
        max_waiting=args.max_waiting,
        prefix_caching=not args.no_prefix_caching,
        adapters=_adapters(args.lora, args.served_model_name or args.model.resolve().name),
    )
    print(f"moelm: serving {args.model} as '{config.model_name}' on http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(generator, config, args.host, args.port, args.log_level)


def _adapters(items: list[str], base_name: str) -> dict[str, Path]:
    """--lora NAME=DIR values as a mapping, each directory checked to be a LoRA adapter."""
    from moelm.model.peft_format import is_adapter_dir

    adapters: dict[str, Path] = {}
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--lora {item!r}: expected NAME=DIR (the name requests send as model, an adapter dir)")
        if name == base_name or name in adapters:
            raise ValueError(f"--lora {item!r}: the name {name!r} is already served")
        if not is_adapter_dir(directory):
            raise ValueError(f"--lora {item!r}: {directory} is not a LoRA adapter directory (no adapter_config.json)")
        adapters[name] = Path(directory)
    return adapters


def register(sub: argparse._SubParsersAction) -> None:
    """The generate, chat and serve subcommands."""
    generate = sub.add_parser("generate", help="complete a prompt with a model directory")
    common.add_sampling_args(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    generate.add_argument("--speculative", action="store_true", help="draft with the model's MTP head")
    generate.add_argument("--compile", action="store_true", help=common.COMPILE_HELP)
    generate.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with a model directory")
    common.add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--compile", action="store_true", help=common.COMPILE_HELP)
    chat.add_argument("--hide-think", action="store_true", help="hide <think> reasoning instead of dimming it")
    chat.set_defaults(func=cmd_chat)

    server = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    server.add_argument("--model", required=True, type=Path, help="model directory with tokenizer.json")
    common.add_device_args(server)
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    server.add_argument("--port", type=common.PORT, default=8000)
    server.add_argument(
        "--api-key", default=os.environ.get("MOELM_API_KEY"), help="require this bearer key (default $MOELM_API_KEY)"
    )
    server.add_argument("--served-model-name", default=None, help="model id clients send (default: the dir name)")
    server.add_argument("--max-batch", type=common.POSITIVE_INT, default=16, help="requests decoded together")
    server.add_argument("--max-model-len", type=common.POSITIVE_INT, default=None, help="prompt + completion tokens")
    server.add_argument("--max-waiting", type=common.POSITIVE_INT, default=256, help="queued requests before 429")
    server.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve a LoRA adapter of the model as NAME (repeatable; a request's model picks it)",
    )
    server.add_argument(
        "--compile",
        action="store_true",
        help="decode through compiled graphs, one per bucket of rows and cache slots, each built on first use "
        "and kept on disk (see README: faster per step, minutes to build the first time)",
    )
    server.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="prefill every prompt in full (default: blocks of 16 prompt tokens seen before are reused)",
    )
    server.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    server.set_defaults(func=cmd_serve)
